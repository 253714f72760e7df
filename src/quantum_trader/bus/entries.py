"""Stream entries as the services see them: text fields, or why they are unusable, with their exact bytes.

Anyone who can XADD to a stream can write any bytes: names and values that are not UTF-8, the same name twice,
an empty name, ten thousand fields, a megabyte value. None of that may crash a reader or drop other work, so
every client of the system (``bus.connection.make_client``) decodes replies with ``surrogateescape`` (a byte
that is not UTF-8 arrives as a lone surrogate, and no decode can fail) and parses stream replies here, into
``Fields``: a plain ``dict`` of text for a usable entry, or, for a defective one, a dict of printable text
(for observers), the ``defect`` that makes it unusable and its ``raw`` bytes (for the dead letter).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from quantum_trader.domain.text import is_text, printable, to_bytes

# Limits of an entry that can be read as text at all. The widest entry the chain writes has ~16 fields, a dead
# letter ~45; beyond these it can only be an attack or a bug. Values are held to each schema's own, much
# tighter limits where they are validated (a megabyte ``source`` is refused there, and dead-lettered with its
# bytes); this one only bounds what a letter can carry (its ``raw`` copy, base64) so a letter stays readable.
MAX_FIELDS = 64
MAX_NAME_CHARS = 128
MAX_VALUE_CHARS = 8 << 20

# What a dead letter keeps of a defective entry's bytes: all of them up to this size (base64 in the letter),
# beyond it the first this-many bytes plus the total size and SHA-256 of all of them. The source entry itself
# stays in its stream (it is acknowledged, never deleted) until the stream is trimmed.
RAW_KEEP_BYTES = 4 << 20
PREVIEW_CHARS = 4096  # each original value, as printable text, in the letter
PREVIEW_FIELDS = 32  # original fields shown as text in the letter (all of them are in ``raw``): a letter must
# itself stay a usable entry (at most MAX_FIELDS fields), or nobody could read it


class Fields(dict[str, str]):
    """One entry's fields. ``defect`` is "" for a usable entry; otherwise the dict holds printable text only
    (invalid bytes as ``\\xNN``; a repeated name once) and ``raw`` the exact (name, value) bytes in order."""

    __slots__ = ("defect", "raw")

    def __init__(
        self, items: Iterable[tuple[str, str]] = (), defect: str = "", raw: Sequence[tuple[bytes, bytes]] = ()
    ):
        super().__init__(items)
        self.defect = defect
        self.raw: tuple[tuple[bytes, bytes], ...] = tuple(raw)


def defect_of(flat: Sequence[str]) -> str:
    """Why a stream entry's flat [name, value, ...] list is unusable, or "" when it is fine."""
    if len(flat) % 2:
        return "odd number of field names and values"
    count = len(flat) // 2
    if count > MAX_FIELDS:
        return f"{count} fields (at most {MAX_FIELDS})"
    seen: set[str] = set()
    for n in range(count):
        name, value = flat[2 * n], flat[2 * n + 1]
        if not name:
            return f"field {n + 1} has an empty name"
        if not is_text(name):
            return f"field {n + 1} name is not valid UTF-8 ({printable(name)[:40]!r})"
        if len(name) > MAX_NAME_CHARS:
            return f"field {n + 1} name is {len(name)} characters long (at most {MAX_NAME_CHARS})"
        if name in seen:
            return f"field name {name!r} appears more than once"
        seen.add(name)
        if not is_text(value):
            return f"value of {name!r} is not valid UTF-8"
        if len(value) > MAX_VALUE_CHARS:
            return f"value of {name!r} is {len(value)} characters long (at most {MAX_VALUE_CHARS})"
    return ""


def parse_fields(flat: Sequence[str] | None) -> Fields:
    """One entry's field list as ``Fields`` (an entry trimmed while pending has none: empty, usable)."""
    if not flat:
        return Fields()
    defect = defect_of(flat)
    pairs = zip(flat[::2], flat[1::2], strict=True)
    if not defect:
        return Fields(pairs)
    pairs_list = list(zip(flat[::2], flat[1::2], strict=False))
    shown = ((printable(name), printable(value)) for name, value in pairs_list)
    return Fields(shown, defect, [(to_bytes(name), to_bytes(value)) for name, value in pairs_list])


# --- redis-py response callbacks (RESP2 shapes; bus.connection forces protocol 2) ----------------------------


def _entries(reply: Any) -> list[tuple[str, Fields]]:
    return [(entry[0], parse_fields(entry[1])) for entry in reply or () if entry is not None]


def parse_range(reply: Any, **_: Any) -> list[tuple[str, Fields]]:
    """XRANGE, XREVRANGE, XCLAIM: [[id, [name, value, ...]], ...]."""
    return _entries(reply)


def parse_read(reply: Any, **_: Any) -> list[list[Any]]:
    """XREAD, XREADGROUP: None or [[stream, [[id, fields], ...]], ...] (fields None for a trimmed pending one)."""
    return [[stream, _entries(entries)] for stream, entries in reply or ()]


def parse_claim(reply: Any, **options: Any) -> Any:
    """XCLAIM: entries, or ids only with JUSTID."""
    return reply if options.get("parse_justid") else _entries(reply)


def parse_autoclaim(reply: Any, **options: Any) -> Any:
    """XAUTOCLAIM: [next id, entries, deleted ids], or the ids only with JUSTID (as redis-py returns them)."""
    if options.get("parse_justid"):
        return reply[1]
    return [reply[0], _entries(reply[1]), *reply[2:]]


STREAM_CALLBACKS = {
    "XRANGE": parse_range,
    "XREVRANGE": parse_range,
    "XREAD": parse_read,
    "XREADGROUP": parse_read,
    "XCLAIM": parse_claim,
    "XAUTOCLAIM": parse_autoclaim,
}


# --- dead letters ---------------------------------------------------------------------------------------------


def letter_fields(fields: dict[str, str]) -> dict[str, str]:
    """What a dead letter records of the entry: each field as printable text (``orig.<name>``, cut to
    ``PREVIEW_CHARS``) and, when that is not the exact entry (a defect, a cut), its exact bytes (``raw``:
    base64 of a msgpack list of [name, value] byte pairs) with their size and SHA-256. Every value is text."""
    shown = list(fields.items())[:PREVIEW_FIELDS]
    letter = {f"orig.{printable(k)}"[:MAX_NAME_CHARS]: printable(v)[:PREVIEW_CHARS] for k, v in shown}
    raw = fields.raw if isinstance(fields, Fields) and fields.defect else ()
    cut = len(fields) > PREVIEW_FIELDS or any(
        len(v) > PREVIEW_CHARS or len(k) + 5 > MAX_NAME_CHARS for k, v in fields.items()
    )
    if raw or cut:
        pairs = raw or tuple((to_bytes(k), to_bytes(v)) for k, v in fields.items())
        packed = msgspec.msgpack.encode([list(pair) for pair in pairs])
        letter["raw"] = base64.b64encode(packed[:RAW_KEEP_BYTES]).decode()
        letter["raw_bytes"] = str(len(packed))
        letter["raw_sha256"] = hashlib.sha256(packed).hexdigest()
        letter["raw_truncated"] = "true" if len(packed) > RAW_KEEP_BYTES else "false"
        letter["orig_fields"] = str(len(pairs))
    return letter


def raw_pairs(letter: dict[str, str]) -> list[tuple[bytes, bytes]] | None:
    """The exact (name, value) bytes a dead letter kept, or None when it kept none (the ``orig.*`` fields are
    then the entry exactly) or they were cut at ``RAW_KEEP_BYTES``."""
    if "raw" not in letter or letter.get("raw_truncated") == "true":
        return None
    decoded = msgspec.msgpack.decode(base64.b64decode(letter["raw"]))
    return [(bytes(name), bytes(value)) for name, value in decoded]
