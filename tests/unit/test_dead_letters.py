"""domain/dead_letters.py: a dead letter as people read it, with exact values (the mutation run's domain stage
found no test reaching this module)."""

from __future__ import annotations

from quantum_trader.bus.entries import Fields
from quantum_trader.domain.dead_letters import PREVIEW_CHARS, letter_row, newest_first

LETTER = {
    "error": "malformed_entry: qty: not a decimal",
    "source_stream": "quantum:stream:harvest.proposal",
    "source_id": "1700000000000-0",
    "service": "apply",
    "at": "1700000001.5",
    "orig.symbol": "BTCUSDT",
    "orig.qty": "abc",
    "raw_bytes": "42",
    "raw_truncated": "true",
}


def test_a_letter_becomes_one_flat_row_of_text() -> None:
    assert letter_row("quantum:stream:harvest.proposal.dlq", "1700000002000-0", LETTER) == {
        "id": "1700000002000-0",
        "dead_letter_stream": "quantum:stream:harvest.proposal.dlq",
        "at": 1700000001.5,
        "source_stream": "quantum:stream:harvest.proposal",
        "source_id": "1700000000000-0",
        "service": "apply",
        "error": "malformed_entry: qty: not a decimal",
        "fields": "symbol=BTCUSDT, qty=abc",
        "raw_bytes": 42,
        "raw_truncated": True,
    }


def test_a_letter_without_its_optional_parts_is_shown_with_empty_values() -> None:
    row = letter_row("dlq", "1700000003000-1", {"error": "poison"})
    assert row == {
        "id": "1700000003000-1",
        "dead_letter_stream": "dlq",
        "at": 1700000003.0,  # no "at": the entry id's time
        "source_stream": "",
        "source_id": "",
        "service": "",
        "error": "poison",
        "fields": "",
        "raw_bytes": None,
        "raw_truncated": False,
    }


def test_a_plain_letter_without_an_error_shows_none_and_no_unreadable_note() -> None:
    assert letter_row("dlq", "1-0", {"orig.k": "v"})["error"] == ""
    assert letter_row("dlq", "1-0", {"error": ""})["error"] == ""


def test_a_letter_time_that_is_not_a_number_falls_back_to_the_entry_id() -> None:
    assert letter_row("dlq", "1700000004000-0", {"at": "soon"})["at"] == 1700000004.0
    assert letter_row("dlq", "1700000004000-0", {"at": "1700000000.25"})["at"] == 1700000000.25


def test_raw_bytes_that_are_not_a_count_are_none_and_only_true_means_truncated() -> None:
    row = letter_row("dlq", "1-0", {"raw_bytes": "12a", "raw_truncated": "yes"})
    assert row["raw_bytes"] is None and row["raw_truncated"] is False
    assert letter_row("dlq", "1-0", {"raw_bytes": "0"})["raw_bytes"] == 0


def test_fields_that_are_not_originals_are_not_in_the_preview() -> None:
    row = letter_row("dlq", "1-0", {"orig.a": "1", "origin": "x", "b": "2", "orig.": "empty"})
    assert row["fields"] == "a=1, =empty"


def test_the_preview_is_cut_at_its_length_with_an_ellipsis() -> None:
    exact = {"orig.k": "v" * (PREVIEW_CHARS - 2)}  # "k=" + value: exactly the preview's length
    assert letter_row("dlq", "1-0", exact)["fields"] == "k=" + "v" * (PREVIEW_CHARS - 2)
    longer = {"orig.k": "v" * (PREVIEW_CHARS - 1)}
    assert letter_row("dlq", "1-0", longer)["fields"] == ("k=" + "v" * (PREVIEW_CHARS - 1))[:PREVIEW_CHARS] + "…"


def test_bytes_that_are_not_text_are_shown_escaped_everywhere() -> None:
    bad = "\udcff"  # a byte 0xff that is not UTF-8, as the readers keep it (surrogateescape)
    row = letter_row("dlq", "1-0", {"error": f"e{bad}", "service": bad, "orig.k": bad, f"orig.{bad}": "v"})
    assert row["error"] == "e\\xff" and row["service"] == "\\xff"
    assert row["fields"] == "k=\\xff, \\xff=v"


def test_an_unreadable_letter_says_so_with_its_defect() -> None:
    unreadable = Fields([("junk", "1")], defect="field names repeat")
    assert letter_row("dlq", "1-0", unreadable)["error"] == "unreadable dead letter: field names repeat"
    with_error = Fields([("error", "poison")], defect="field names repeat")
    assert letter_row("dlq", "1-0", with_error)["error"] == "poison"  # its own error comes first


def test_newest_first_orders_by_time_and_keeps_the_limit() -> None:
    rows = [{"at": 2.0, "id": "b"}, {"at": 3.0, "id": "c"}, {"at": 1.0, "id": "a"}]
    assert [r["id"] for r in newest_first(rows, 2)] == ["c", "b"]
    assert [r["id"] for r in newest_first(rows, 10)] == ["c", "b", "a"]
    assert newest_first(rows, 0) == []
