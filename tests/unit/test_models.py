"""Wire schemas: to_fields / from_fields round trips, and MalformedEntry messages that name the bad field."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.domain.models import (
    PROPOSAL_ID_PATTERN,
    AuditEntry,
    GovernorPermit,
    Ledger,
    MalformedEntry,
    P33Permit,
    Plan,
    Proposal,
    Result,
    Snapshot,
    decode_json,
    encode_json,
    from_fields,
    to_fields,
)

D = Decimal
PLAN_ID = "0123456789abcdef"
HASH = "ab" * 32


def proposal_fields(**changes: str) -> dict[str, str]:
    fields = {"proposal_id": "prop-1", "symbol": "BTCUSDT", "action": "FULL_CLOSE"}
    fields.update(changes)
    return fields


def plan_fields(**changes: str) -> dict[str, str]:
    fields = {
        "plan_id": PLAN_ID,
        "proposal_id": "prop-1",
        "symbol": "BTCUSDT",
        "side": "LONG",
        "action": "FULL_CLOSE",
        "qty": "0.5",
        "decision": "EXECUTE",
        "reason": "ready",
        "steps": "[]",
        "plan_hash": HASH,
        "created_at": "1700000000.5",
    }
    fields.update(changes)
    return fields


def result_fields(**changes: str) -> dict[str, str]:
    fields = {"plan_id": PLAN_ID, "symbol": "BTCUSDT", "side": "LONG", "executed": "true"}
    fields.update(changes)
    return fields


def malformed(cls: type[Any], fields: dict[str, str]) -> str:
    with pytest.raises(MalformedEntry) as info:
        from_fields(cls, fields)
    return str(info.value)


# --- round trips ------------------------------------------------------------------------------------------

GRANT = GovernorPermit(
    granted=True, plan_id=PLAN_ID, plan_hash=HASH, issuer="governor", reason="policy_passed", created_at=2.5
)
DENY = GovernorPermit(
    granted=False, plan_id=PLAN_ID, plan_hash=HASH, issuer="operator", reason="x", created_at=3.0, sig="ff" * 32
)
P33 = P33Permit(
    allow=True,
    symbol="BTCUSDT",
    safe_close_qty=Decimal("0.500"),
    exchange_position_amt=Decimal("-0.500"),
    ledger_amt=Decimal("-0.500"),
    created_at=4.0,
    reason="sanity_checks_passed",
    plan_id=PLAN_ID,
    plan_hash=HASH,
    issuer="p33",
    sig="00" * 32,
)

STRUCTS: list[msgspec.Struct] = [
    Proposal(proposal_id="p-1", symbol="BTCUSDT", action="FULL_CLOSE"),
    Proposal(
        proposal_id="p-2",
        symbol="ETHUSDT",
        action="PARTIAL_CLOSE",
        qty=D("0.125"),
        kill_score=0.73,
        source="harvest",
        created_at=1700000000.25,
    ),
    Proposal(proposal_id="p-3", symbol="SOLUSDT", action="PARTIAL_CLOSE", close_pct=D("33.5")),
    Plan(
        plan_id=PLAN_ID,
        proposal_id="p-1",
        symbol="BTCUSDT",
        side="SHORT",
        action="FULL_CLOSE",
        qty=D("1.234"),
        decision="EXECUTE",
        reason="ready",
        steps='[{"type":"MARKET","side":"BUY","qty":"1.234","reduce_only":true}]',
        plan_hash=HASH,
        created_at=1700000000.125,
    ),
    Plan(
        plan_id=PLAN_ID,
        proposal_id="p-1",
        symbol="BTCUSDT",
        side="NONE",
        action="FULL_CLOSE",
        qty=D(0),
        decision="SKIP",
        reason="no_position",
        steps="[]",
        plan_hash=HASH,
        created_at=1.0,
    ),
    GRANT,
    DENY,
    P33,
    AuditEntry(plan_id=PLAN_ID, issuer="governor", decision="allow", reason="policy_passed", at=5.0),
    AuditEntry(
        plan_id=PLAN_ID,
        issuer="apply",
        decision="rejected",
        reason="bad_signature",
        at=5.5,
        latency_ms=12.5,
        symbol="BTCUSDT",
        subject="p33",
    ),
    Result(plan_id=PLAN_ID, symbol="BTCUSDT", side="NONE", executed=False, error="skipped", reason="no_position"),
    Result(
        plan_id=PLAN_ID,
        symbol="BTCUSDT",
        side="LONG",
        executed=True,
        order_id="4095123456",
        client_order_id=f"qt-{PLAN_ID}",
        filled_qty=D("0.250"),
        avg_price=D("64120.1"),
        exchange_code=0,
        latency_ms=42.0,
        at=6.0,
    ),
    Result(
        plan_id=PLAN_ID,
        symbol="BTCUSDT",
        side="SHORT",
        executed=False,
        error="permit_timeout",
        missing="Governor,P3.3",
        exchange_code=-2019,
    ),
    Snapshot(position_amt=D("-0.003"), entry_price=D("64000.10"), mark_price=D("64123.45"), ts=7.0),
    Ledger(last_known_amt=D("1.5"), updated_at=8.0, source="result", last_plan_id=PLAN_ID, last_result_id="17-3"),
    Ledger(last_known_amt=D(0), updated_at=8.0, source="reconcile"),
]


@pytest.mark.parametrize("obj", STRUCTS, ids=lambda o: type(o).__name__)
def test_fields_round_trip(obj: msgspec.Struct) -> None:
    fields = to_fields(obj)
    assert all(isinstance(v, str) for v in fields.values())
    assert set(fields) == set(obj.__struct_fields__)
    assert from_fields(type(obj), fields) == obj


def test_every_wire_struct_has_a_round_trip_case() -> None:
    covered = {type(o) for o in STRUCTS}
    assert covered == {Proposal, Plan, GovernorPermit, P33Permit, AuditEntry, Result, Snapshot, Ledger}


def test_p33_permit_without_ledger_round_trips_through_fields() -> None:
    permit = P33Permit(
        allow=False,
        symbol="BTCUSDT",
        safe_close_qty=D(0),
        exchange_position_amt=D(0),
        ledger_amt=None,
        created_at=1.0,
        reason="ledger_missing",
        plan_id=PLAN_ID,
        plan_hash=HASH,
        issuer="p33",
    )
    assert from_fields(P33Permit, to_fields(permit)) == permit


def test_to_fields_text_forms() -> None:
    fields = to_fields(
        Proposal(proposal_id="p-2", symbol="ETHUSDT", action="PARTIAL_CLOSE", qty=D("0.125"), kill_score=0.73)
    )
    assert fields["qty"] == "0.125"
    assert fields["close_pct"] == ""  # None is written as an empty string
    assert fields["kill_score"] == "0.73"
    assert to_fields(GRANT)["granted"] == "true"
    assert to_fields(DENY)["granted"] == "false"
    assert to_fields(P33)["safe_close_qty"] == "0.500"  # the decimal exactly as P3.3 rounded it
    # Decimals never use exponent notation on the wire.
    assert to_fields(Snapshot(position_amt=D("1E+3"), entry_price=D("1E-7"), mark_price=D(0), ts=0.0)) == {
        "position_amt": "1000",
        "entry_price": "0.0000001",
        "mark_price": "0",
        "ts": "0.0",
        "synced_ms": "0",
    }


def test_empty_strings_fall_back_to_defaults() -> None:
    proposal = from_fields(Proposal, proposal_fields(qty="", close_pct="", kill_score="", source=""))
    assert proposal.qty is None
    assert proposal.close_pct is None
    assert proposal.kill_score is None
    assert proposal.source == "unknown"


def test_unknown_fields_are_ignored() -> None:
    assert from_fields(Proposal, proposal_fields(extra="whatever")).proposal_id == "prop-1"


def test_json_round_trip_of_permits() -> None:
    for permit in (GRANT, DENY, P33):
        assert decode_json(type(permit), encode_json(permit)) == permit


def test_decode_json_malformed_names_the_field() -> None:
    with pytest.raises(MalformedEntry, match="plan_id"):
        decode_json(
            GovernorPermit,
            b'{"granted":true,"plan_id":"XYZ","plan_hash":"h","issuer":"governor","reason":"r","created_at":1}',
        )
    with pytest.raises(MalformedEntry):
        decode_json(GovernorPermit, b"not json")


@given(
    proposal_id=st.from_regex(PROPOSAL_ID_PATTERN, fullmatch=True),
    symbol=st.from_regex(r"[A-Z0-9]{5,20}", fullmatch=True),
    qty=st.decimals(min_value=0, max_value=10**9, places=8, allow_nan=False, allow_infinity=False),
    kill_score=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    source=st.text(min_size=1, max_size=256),
    created_at=st.floats(allow_nan=False, allow_infinity=False),
)
def test_proposal_round_trip_property(
    proposal_id: str, symbol: str, qty: Decimal, kill_score: float | None, source: str, created_at: float
) -> None:
    proposal = Proposal(
        proposal_id=proposal_id,
        symbol=symbol,
        action="PARTIAL_CLOSE",
        qty=qty,
        kill_score=kill_score,
        source=source,
        created_at=created_at,
    )
    assert from_fields(Proposal, to_fields(proposal)) == proposal


@given(
    amt=st.decimals(min_value=-(10**9), max_value=10**9, places=8, allow_nan=False, allow_infinity=False),
    updated_at=st.floats(min_value=0, max_value=4e9),
    result_id=st.from_regex(r"[0-9]{1,13}-[0-9]{1,4}", fullmatch=True),
)
def test_ledger_round_trip_property(amt: Decimal, updated_at: float, result_id: str) -> None:
    ledger = Ledger(last_known_amt=amt, updated_at=updated_at, source="result", last_result_id=result_id)
    assert from_fields(Ledger, to_fields(ledger)) == ledger


# --- malformed entries name the field ---------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["proposal_id", "symbol", "action"])
def test_missing_field_is_named(missing: str) -> None:
    fields = proposal_fields()
    del fields[missing]
    assert missing in malformed(Proposal, fields)


def test_missing_field_given_as_empty_string_is_named() -> None:
    assert "symbol" in malformed(Proposal, proposal_fields(symbol=""))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("qty", "abc"),
        ("qty", "1,5"),
        ("close_pct", "ten"),
        ("kill_score", "high"),
        ("created_at", "yesterday"),
    ],
)
def test_bad_number_is_named(field: str, value: str) -> None:
    extra = {"action": "PARTIAL_CLOSE"} if field in ("qty", "close_pct") else {}
    assert malformed(Proposal, proposal_fields(**extra, **{field: value})).startswith(f"{field}")


def test_bad_numbers_in_other_structs_are_named() -> None:
    assert malformed(Result, result_fields(exchange_code="x")).startswith("exchange_code")
    assert malformed(Result, result_fields(filled_qty="1..2")).startswith("filled_qty")
    assert malformed(Plan, plan_fields(created_at="soon")).startswith("created_at")
    snap = {"position_amt": "1", "entry_price": "1", "mark_price": "one", "ts": "1"}
    assert malformed(Snapshot, snap).startswith("mark_price")


@pytest.mark.parametrize("value", ["NaN", "nan", "sNaN", "inf", "Infinity", "-inf", "-Infinity"])
@pytest.mark.parametrize("field", ["qty", "close_pct"])
def test_non_finite_quantities_rejected(field: str, value: str) -> None:
    message = malformed(Proposal, proposal_fields(action="PARTIAL_CLOSE", **{field: value}))
    assert field in message
    assert "finite" in message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_rejected(value: str) -> None:
    assert "kill_score" in malformed(Proposal, proposal_fields(kill_score=value))
    assert "created_at" in malformed(Proposal, proposal_fields(created_at=value))
    assert "qty" in malformed(Plan, plan_fields(qty=value))


@pytest.mark.parametrize("value", ["NaN", "inf"])
def test_non_finite_permit_quantity_rejected(value: str) -> None:
    fields = {**to_fields(P33), "safe_close_qty": value}
    assert "safe_close_qty" in malformed(P33Permit, fields)


def test_negative_qty_rejected() -> None:
    message = malformed(Proposal, proposal_fields(action="PARTIAL_CLOSE", qty="-0.001"))
    assert message.startswith("qty")
    assert ">= 0" in message
    assert "qty" in malformed(Plan, plan_fields(qty="-1", decision="SKIP"))


def test_zero_qty_allowed_on_proposals() -> None:
    # A zero close is a planning SKIP (close_qty_zero), not a malformed entry.
    assert from_fields(Proposal, proposal_fields(action="PARTIAL_CLOSE", qty="0")).qty == 0


@pytest.mark.parametrize("value", ["100.0001", "101", "-0.5", "1e3"])
def test_close_pct_out_of_range(value: str) -> None:
    message = malformed(Proposal, proposal_fields(action="PARTIAL_CLOSE", close_pct=value))
    assert message.startswith("close_pct")
    assert "0..100" in message


@pytest.mark.parametrize("value", ["0", "100", "100.000", "0.0001"])
def test_close_pct_bounds_inclusive(value: str) -> None:
    assert from_fields(Proposal, proposal_fields(action="PARTIAL_CLOSE", close_pct=value)).close_pct == D(value)


@pytest.mark.parametrize("value", ["OPEN", "full_close", "CLOSE", "FULL_CLOSE "])
def test_unknown_action(value: str) -> None:
    message = malformed(Proposal, proposal_fields(action=value))
    assert message.startswith("action")


@pytest.mark.parametrize(
    "value",
    [
        "0123456789ABCDEF",  # upper case
        "0123456789abcde",  # 15
        "0123456789abcdef0",  # 17
        "0123456789abcdeg",  # not hex
        " 0123456789abcdef",
        "０１２３４５６７８９ａｂｃｄｅｆ",  # full-width
        "x",
    ],
)
def test_bad_plan_id(value: str) -> None:
    assert malformed(Result, result_fields(plan_id=value)).startswith("plan_id")
    assert malformed(Plan, plan_fields(plan_id=value)).startswith("plan_id")


@pytest.mark.parametrize(
    "value",
    ["btcusdt", "BTC", "BTC-USDT", "BTC USDT", "A" * 21, "BTCUSDT ", "ＢＴＣＵＳＤＴ", "BTCUSDTé"],
)
def test_bad_symbol(value: str) -> None:
    assert malformed(Proposal, proposal_fields(symbol=value)).startswith("symbol")
    assert malformed(Result, result_fields(symbol=value)).startswith("symbol")


@pytest.mark.parametrize(("field", "value"), [("plan_id", PLAN_ID + "\n"), ("symbol", "BTCUSDT\n")])
def test_trailing_newline_rejected(field: str, value: str) -> None:
    malformed(Result, result_fields(**{field: value}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("false", False), ("1", True), ("0", False), ("TRUE", True), ("False", False)],
)
def test_bool_fields(text: str, expected: bool) -> None:
    assert from_fields(Result, result_fields(executed=text)).executed is expected
    permit = from_fields(
        GovernorPermit,
        {
            "granted": text,
            "plan_id": PLAN_ID,
            "plan_hash": HASH,
            "issuer": "governor",
            "reason": "r",
            "created_at": "1",
        },
    )
    assert permit.granted is expected


@pytest.mark.parametrize("text", ["yes", "no", "2", "-1", "t", " true", "true ", "on", "null"])
def test_bool_junk_rejected(text: str) -> None:
    message = malformed(Result, result_fields(executed=text))
    assert message.startswith("executed:")
    assert "true/false" in message


def test_bool_missing_is_named() -> None:
    assert "executed" in malformed(Result, result_fields(executed=""))


def test_partial_close_needs_exactly_one_of_qty_or_close_pct() -> None:
    neither = malformed(Proposal, proposal_fields(action="PARTIAL_CLOSE"))
    both = malformed(Proposal, proposal_fields(action="PARTIAL_CLOSE", qty="1", close_pct="50"))
    for message in (neither, both):
        assert message == "PARTIAL_CLOSE needs exactly one of qty or close_pct"
    assert from_fields(Proposal, proposal_fields(action="PARTIAL_CLOSE", qty="1")).qty == 1
    assert from_fields(Proposal, proposal_fields(action="PARTIAL_CLOSE", close_pct="50")).close_pct == 50


def test_full_close_may_carry_qty_and_close_pct() -> None:
    proposal = from_fields(Proposal, proposal_fields(qty="1", close_pct="50"))
    # kept as given (the planner ignores both for a full close), the rest at the schema's defaults
    assert proposal == Proposal(
        proposal_id="prop-1",
        symbol="BTCUSDT",
        action="FULL_CLOSE",
        qty=D("1"),
        close_pct=D("50"),
        kill_score=None,
        source="unknown",
        created_at=0.0,
    )


@pytest.mark.parametrize(("side", "qty"), [("NONE", "1"), ("LONG", "0"), ("SHORT", "0.000")])
def test_execute_plan_needs_side_and_positive_qty(side: str, qty: str) -> None:
    assert malformed(Plan, plan_fields(side=side, qty=qty)) == "an EXECUTE plan needs a side and a positive qty"


def test_skip_plan_may_have_no_side_and_zero_qty() -> None:
    plan = from_fields(Plan, plan_fields(side="NONE", qty="0", decision="SKIP"))
    assert plan == Plan(
        plan_id=PLAN_ID,
        proposal_id="prop-1",
        symbol="BTCUSDT",
        side="NONE",
        action="FULL_CLOSE",
        qty=D("0"),
        decision="SKIP",
        reason="ready",
        steps="[]",
        plan_hash=HASH,
        created_at=1700000000.5,
    )


def test_bad_plan_hash_and_decision() -> None:
    assert malformed(Plan, plan_fields(plan_hash="AB" * 32)).startswith("plan_hash")
    assert malformed(Plan, plan_fields(plan_hash=HASH[:-1])).startswith("plan_hash")
    assert malformed(Plan, plan_fields(decision="MAYBE")).startswith("decision")
    assert malformed(Plan, plan_fields(side="FLAT")).startswith("side")


# --- huge and unicode strings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "limit"),
    [("proposal_id", 32), ("source", 256)],
)
def test_over_long_text_rejected(field: str, limit: int) -> None:
    assert from_fields(Proposal, proposal_fields(**{field: "x" * limit})) is not None
    message = malformed(Proposal, proposal_fields(**{field: "x" * (limit + 1)}))
    assert message.startswith(field)


def test_huge_strings_give_short_messages() -> None:
    huge = "x" * 1_000_000
    for field in ("proposal_id", "symbol", "source"):
        message = malformed(Proposal, proposal_fields(**{field: huge}))
        assert message.startswith(field)
        assert len(message) < 300
    assert malformed(Proposal, proposal_fields(action=huge)).startswith("action")  # msgspec echoes enum values
    message = malformed(Result, result_fields(executed=huge))
    assert message.startswith("executed")
    assert len(message) < 300  # the bad value is truncated in the message
    assert malformed(Plan, plan_fields(steps="[" * 5000)).startswith("steps")
    assert malformed(Result, result_fields(reason=huge)).startswith("reason")


def test_unicode_text_round_trips() -> None:
    proposal = from_fields(Proposal, proposal_fields(source="stratégie 🚀"))
    assert proposal.source == "stratégie 🚀"
    assert from_fields(Proposal, to_fields(proposal)) == proposal
    result = from_fields(Result, result_fields(reason="Ошибка: маржа недостаточна"))
    assert result.reason == "Ошибка: маржа недостаточна"


def test_unicode_length_is_counted_in_characters() -> None:
    assert from_fields(Proposal, proposal_fields(source="é" * 256)).source == "é" * 256
    assert malformed(Proposal, proposal_fields(source="é" * 257)).startswith("source")


@pytest.mark.parametrize(
    "proposal_id",
    ["a b", "提案-1", "x" * 33, "id\n", "semi;colon", "per%cent", "qt+1", "ü"],
)
def test_a_proposal_id_outside_binances_client_id_alphabet_or_over_32_is_refused(proposal_id: str) -> None:
    """The id travels in the order's client id ("qt-" + id, Binance allows 36 of [.A-Za-z0-9:/_-])."""
    assert malformed(Proposal, proposal_fields(proposal_id=proposal_id)).startswith("proposal_id")


@pytest.mark.parametrize("proposal_id", ["a", "0123456789abcdef0123456789abcdef", "strat.A:1/2_x-y", "01J9Z3Q8"])
def test_uuids_ulids_and_the_whole_alphabet_are_proposal_ids(proposal_id: str) -> None:
    assert from_fields(Proposal, proposal_fields(proposal_id=proposal_id)).proposal_id == proposal_id


def test_the_close_quantity_travels_as_a_decimal_string_never_a_float() -> None:
    from quantum_trader.domain.permits import encode_permit

    doc = json.loads(encode_permit(P33))
    assert doc["safe_close_qty"] == "0.500" and doc["exchange_position_amt"] == "-0.500"
    assert decode_json(P33Permit, encode_permit(P33)).safe_close_qty == Decimal("0.500")  # the exact text back


def test_from_fields_refuses_text_that_was_not_utf8() -> None:
    bad = b"BTC\xffUSDT".decode("utf-8", "surrogateescape")
    with pytest.raises(MalformedEntry, match="not valid UTF-8"):
        from_fields(Proposal, {"proposal_id": "p", "symbol": "BTCUSDT", "action": "FULL_CLOSE", "source": bad})
