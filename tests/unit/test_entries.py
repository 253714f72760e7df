"""Stream entries from arbitrary bytes (bus/entries.py): what is usable, what a dead letter keeps of the rest."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.bus.entries import (
    MAX_FIELDS,
    PREVIEW_FIELDS,
    RAW_KEEP_BYTES,
    Fields,
    letter_fields,
    parse_autoclaim,
    parse_fields,
    parse_read,
    raw_pairs,
)
from quantum_trader.domain.text import is_text, printable, to_bytes


def decoded(*parts: bytes) -> list[str]:
    """What a client decoding with surrogateescape receives for these bytes."""
    return [part.decode("utf-8", "surrogateescape") for part in parts]


def test_a_usable_entry_is_plain_text() -> None:
    fields = parse_fields(decoded(b"symbol", b"BTCUSDT", b"qty", b"0.5"))
    assert fields == {"symbol": "BTCUSDT", "qty": "0.5"} and fields.defect == "" and fields.raw == ()


def test_an_entry_with_bytes_that_are_not_utf8_keeps_them_and_shows_them_escaped() -> None:
    fields = parse_fields(decoded(b"symbol", b"BTC\xffUSDT", b"n\xfe", b"1"))
    assert fields.defect == "value of 'symbol' is not valid UTF-8"
    assert fields == {"symbol": "BTC\\xffUSDT", "n\\xfe": "1"}  # printable for observers
    assert fields.raw == ((b"symbol", b"BTC\xffUSDT"), (b"n\xfe", b"1"))  # exact for the dead letter
    assert all(is_text(k) and is_text(v) for k, v in fields.items())


def test_a_repeated_name_is_a_defect_and_both_values_are_kept() -> None:
    fields = parse_fields(decoded(b"qty", b"1", b"qty", b"1000"))
    assert fields.defect == "field name 'qty' appears more than once"
    assert fields.raw == ((b"qty", b"1"), (b"qty", b"1000"))


@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=12)), min_size=1, max_size=MAX_FIELDS + 3))
def test_any_bytes_parse_and_a_letter_keeps_exactly_them(pairs: list[tuple[bytes, bytes]]) -> None:
    fields = parse_fields(decoded(*[part for pair in pairs for part in pair]))
    letter = letter_fields(fields)
    assert all(is_text(k) and is_text(v) for k, v in letter.items()), "a letter is text throughout"
    assert len(letter) <= PREVIEW_FIELDS + 6
    if fields.defect:
        assert raw_pairs(letter) == pairs
    else:
        assert dict(pairs) == {to_bytes(k): to_bytes(v) for k, v in fields.items()}


def test_a_letter_of_an_entry_too_big_to_keep_says_so() -> None:
    fields = Fields({"a": "x"}.items(), "too big", [(b"a", b"x" * (RAW_KEEP_BYTES + 10))])
    letter = letter_fields(fields)
    assert letter["raw_truncated"] == "true" and int(letter["raw_bytes"]) > RAW_KEEP_BYTES
    assert raw_pairs(letter) is None and len(letter["raw_sha256"]) == 64


def test_read_replies_parse_per_entry_and_trimmed_pending_entries_are_empty() -> None:
    reply = [["s", [["1-0", decoded(b"a", b"1")], ["2-0", None], ["3-0", decoded(b"", b"x")]]]]
    ((stream, entries),) = parse_read(reply)
    assert stream == "s" and [e[0] for e in entries] == ["1-0", "2-0", "3-0"]
    assert entries[0][1] == {"a": "1"} and entries[1][1] == {} and entries[2][1].defect == "field 1 has an empty name"
    assert parse_read(None) == []
    claimed = parse_autoclaim(["0-0", [["4-0", decoded(b"a", b"\xff")]], []])
    assert claimed[1][0][1].defect == "value of 'a' is not valid UTF-8"


def test_text_helpers() -> None:
    bad = b"ok\xff".decode("utf-8", "surrogateescape")
    assert not is_text(bad) and is_text("ünïcode") and to_bytes(bad) == b"ok\xff" and printable(bad) == "ok\\xff"
