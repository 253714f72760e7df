"""Dead letters as people read them (pure: `qt audit --dead-letters` and the dashboard fetch, this arranges).

A letter (bus/streams.py ``dead_letter``) holds the error, where the entry came from, the original fields as
printable text (``orig.<name>``) and, when those are not the whole truth, the exact bytes (``raw``, base64).
A letter that is itself unreadable (someone wrote into a dead-letter stream directly) is shown as such.
"""

from __future__ import annotations

from typing import Any

from quantum_trader.domain.story import entry_time
from quantum_trader.domain.text import printable

PREVIEW_CHARS = 160


def letter_row(dlq: str, entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """One letter as a flat row of text (every value printable)."""
    defect = getattr(fields, "defect", "")
    original = {k.removeprefix("orig."): v for k, v in fields.items() if k.startswith("orig.")}
    preview = ", ".join(f"{printable(k)}={printable(v)}" for k, v in original.items())
    return {
        "id": entry_id,
        "dead_letter_stream": dlq,
        "at": entry_time(entry_id, fields),
        "source_stream": printable(fields.get("source_stream", "")),
        "source_id": printable(fields.get("source_id", "")),
        "service": printable(fields.get("service", "")),
        "error": printable(fields.get("error") or (f"unreadable dead letter: {defect}" if defect else "")),
        "fields": preview[:PREVIEW_CHARS] + ("…" if len(preview) > PREVIEW_CHARS else ""),
        "raw_bytes": _count(fields.get("raw_bytes")),
        "raw_truncated": fields.get("raw_truncated") == "true",
    }


def _count(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def newest_first(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda row: row["at"], reverse=True)[:limit]
