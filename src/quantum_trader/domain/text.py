"""Text that came from the store: every client decodes with ``surrogateescape`` (bus/connection.py), so a byte
that is not UTF-8 arrives as a lone surrogate instead of failing the whole reply. These tell such text apart,
give its exact bytes back, and make it safe to print."""

from __future__ import annotations


def is_text(value: str) -> bool:
    """True when ``value`` came from valid UTF-8 (no surrogate stands in for an undecodable byte)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def to_bytes(value: str) -> bytes:
    """The exact bytes the store holds for a value decoded with ``surrogateescape``."""
    return value.encode("utf-8", "surrogateescape")


def printable(value: str) -> str:
    """``value`` as text any terminal, JSON encoder or page can show: undecodable bytes as ``\\xNN``."""
    return value if is_text(value) else to_bytes(value).decode("utf-8", "backslashreplace")
