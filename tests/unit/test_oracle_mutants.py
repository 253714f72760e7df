"""Tests written to kill domain/oracle.py mutants that survived `make mutation` (docs/mutation.md): each pins a
piece of the oracle's behaviour that tests/unit/test_oracle.py left open. The mutants each test kills are named
in its docstring (``oracle.<function>__mutmut_<n>``).

Permits are real: built as the issuers build them and HMAC-signed with domain/permits.py ``sign()``; a document
no permit struct can hold (a non-finite safe_close_qty, a created_at of the wrong type) is signed with the same
MAC the issuers use (``permits._mac``), so only the property under test is wrong.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec
import pytest
from test_oracle import KEYS, NOW, PLAN, a_plan, governor_raw, p33_raw  # the same real permits as there

from quantum_trader.domain import oracle
from quantum_trader.domain.models import Plan, to_fields
from quantum_trader.domain.oracle import (
    Findings,
    check_orders,
    check_results,
    plan_hash_of,
    verify_permit,
)
from quantum_trader.domain.permits import _mac

COID = f"qt-{PLAN.proposal_id}"
HASHES = frozenset({PLAN.plan_hash})


def resigned(raw: str, key: bytes, drop: tuple[str, ...] = (), **changes: Any) -> str:
    """The permit document with ``changes`` (and without ``drop``), MAC'd again with the issuer's key: genuine."""
    doc = {k: v for k, v in msgspec.json.decode(raw).items() if k not in drop}
    doc.update(changes)
    doc["sig"] = _mac(key, doc)
    return msgspec.json.encode(doc).decode()


def tampered(raw: str, **changes: Any) -> str:
    doc = msgspec.json.decode(raw)
    doc.update(changes)
    return msgspec.json.encode(doc).decode()


def consumed(slot: str, raw: str | bytes, plan: Plan = PLAN, **changes: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "plan_id": plan.plan_id,
        "issuer": "apply",
        "decision": "consumed",
        "reason": slot,
        "subject": slot,
        "at": repr(NOW),
        "symbol": plan.symbol,
        "permit": raw,
    }
    line.update(changes)
    return line


def both_consumed(plan: Plan = PLAN) -> list[dict[str, Any]]:
    return [consumed("governor", governor_raw(plan), plan), consumed("p33", p33_raw(plan), plan)]


def an_order(plan: Plan = PLAN, qty: str = "0.500", order_id: int = 1, **changes: Any) -> dict[str, Any]:
    order: dict[str, Any] = {
        "orderId": order_id,
        "symbol": plan.symbol,
        "clientOrderId": f"qt-{plan.proposal_id}",
        "side": "SELL",  # closes the long
        "origQty": qty,
        "executedQty": qty,
        "status": "FILLED",
        "reduceOnly": True,
    }
    return {**order, **changes}


def a_result(plan: Plan = PLAN, executed: bool = True, filled: str = "0.500") -> dict[str, str]:
    return {
        "plan_id": plan.plan_id,
        "symbol": plan.symbol,
        "side": plan.side,
        "executed": "true" if executed else "false",
        "filled_qty": filled if executed else "0",
        "error": "" if executed else "permit_timeout",
    }


def orders_check(
    orders: list[dict[str, Any]],
    audit: list[dict[str, Any]] | None = None,
    plans: list[dict[str, str]] | None = None,
    ttl_s: float | None = None,
) -> Findings:
    return check_orders(
        orders,
        both_consumed() if audit is None else audit,
        [to_fields(PLAN)] if plans is None else plans,
        KEYS,
        ttl_s=ttl_s,
    )


def verify(slot: str, raw: str, **kwargs: Any) -> tuple[dict[str, Any] | None, str]:
    return verify_permit(slot, raw, PLAN.plan_id, HASHES, KEYS.of(slot), **kwargs)


# --- verify_permit ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slot", ["governor", "p33"])
def test_a_valid_permit_verifies_with_no_reason_and_no_symbol_given(slot: str) -> None:
    """verify_permit__mutmut_1 (symbol's default "" made "XXXX": the P3.3 symbol is then checked against it) and
    __mutmut_103 (the reason of a valid permit made "XXXX")."""
    raw = governor_raw() if slot == "governor" else p33_raw()
    assert verify(slot, raw) == (msgspec.json.decode(raw), "")


REFUSED: dict[str, tuple[str, str, str]] = {
    # case: (slot, raw permit, the exact reason)
    "not JSON": ("governor", "\x00not json", "not JSON"),  # __mutmut_4..6
    "a JSON array": ("governor", "[1, 2]", "not a JSON object"),  # __mutmut_8..10
    "an empty sig": ("governor", tampered(governor_raw(), sig=""), "unsigned"),  # __mutmut_15 (bad MAC), 18, 19
    "a sig that is no string": ("governor", tampered(governor_raw(), sig=5), "unsigned"),  # __mutmut_15 (raises)
    "a MAC of another key": ("governor", governor_raw(key=b"attacker"), "bad MAC"),  # __mutmut_38..40
    "a wrong issuer": ("governor", governor_raw(issuer="apply"), "issuer 'apply' in the governor slot"),  # 45..47
    "a deny": ("governor", governor_raw(granted=False), "not an allow"),  # __mutmut_51, 52
    "another plan": ("governor", governor_raw(a_plan(2)), f"for plan {a_plan(2).plan_id!r}"),  # __mutmut_57..59
    "an unpublished hash": ("governor", governor_raw(plan_hash="0" * 64), "plan hash of no published plan"),  # 64, 65
    "another symbol": ("p33", p33_raw(symbol="ETHUSDT"), "for symbol 'ETHUSDT'"),  # __mutmut_74..76
    # __mutmut_82 (`and`: a negative safe close passes, a missing one raises), 86, 87
    "a negative safe close": ("p33", resigned(p33_raw(), KEYS.p33, safe_close_qty="-1"), "no safe_close_qty"),
    "no safe close": ("p33", resigned(p33_raw(), KEYS.p33, drop=("safe_close_qty",)), "no safe_close_qty"),
    # _decimal__mutmut_7 (a non-finite number kept: Infinity passes, NaN raises on `< 0`)
    "an infinite safe close": ("p33", resigned(p33_raw(), KEYS.p33, safe_close_qty="Infinity"), "no safe_close_qty"),
    "a NaN safe close": ("p33", resigned(p33_raw(), KEYS.p33, safe_close_qty="NaN"), "no safe_close_qty"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_refused_permit_says_exactly_why(case: str) -> None:
    """verify_permit's reasons, word for word (they are the oracle's examples): the mutants named in REFUSED."""
    slot, raw, why = REFUSED[case]
    assert verify(slot, raw, symbol=PLAN.symbol) == (None, why)


@pytest.mark.parametrize(
    ("created_at", "drop"),
    [("soon", ()), (True, ()), (None, ()), (0, ("created_at",))],
    ids=["text", "bool", "null", "missing"],
)
def test_a_permit_whose_age_cannot_be_read_is_expired_when_a_ttl_is_given(
    created_at: Any, drop: tuple[str, ...]
) -> None:
    """verify_permit__mutmut_96 (`and` between the type tests: text/null/missing then raise on the subtraction, a
    bool True passes as 1 s old), __mutmut_101, 102 (the reason's text)."""
    raw = resigned(governor_raw(), KEYS.governor, drop=drop, **({} if drop else {"created_at": created_at}))
    assert verify("governor", raw, consumed_at=1.0, ttl_s=60.0) == (None, "expired when consumed")


def test_a_permit_exactly_ttl_old_when_consumed_is_still_valid() -> None:
    """verify_permit__mutmut_100 (`>=`: a permit consumed exactly ttl_s after its creation refused)."""
    raw = governor_raw(created_at=NOW - 60.0)
    assert verify("governor", raw, consumed_at=NOW, ttl_s=60.0) == (msgspec.json.decode(raw), "")
    assert verify("governor", raw, consumed_at=NOW + 0.5, ttl_s=60.0) == (None, "expired when consumed")


def test_a_zero_safe_close_is_a_valid_allow() -> None:
    """verify_permit__mutmut_84 (`safe <= 0`: P3.3 may allow a plan with nothing safe to close; its order must
    then fill nothing, which check_orders judges, not the permit check)."""
    raw = p33_raw(safe_close_qty=Decimal(0))
    assert verify("p33", raw, symbol=PLAN.symbol) == (msgspec.json.decode(raw), "")


# --- check_orders: reading the evidence ---------------------------------------------------------------------


def test_a_permit_read_from_the_store_as_bytes_is_verified() -> None:
    """_text__mutmut_1 (bytes turned into "b'...'", which is not JSON)."""
    audit = [consumed("governor", governor_raw().encode()), consumed("p33", p33_raw().encode())]
    findings = orders_check([an_order()], audit)
    assert findings.ok, findings.describe()
    assert findings.orders_verified == 1


def test_a_consumed_line_without_a_time_is_verified_and_not_aged() -> None:
    """_float__mutmut_2 (float(None) raised instead of "no time known")."""
    audit = [{k: v for k, v in line.items() if k != "at"} for line in both_consumed()]
    findings = orders_check([an_order()], audit, ttl_s=60.0)
    assert findings.ok, findings.describe()
    assert findings.orders_verified == 1


def test_the_slot_is_the_lines_subject_whatever_its_reason() -> None:
    """check_orders__mutmut_46..49 (the slot taken from the reason although a subject is set)."""
    audit = [consumed("governor", governor_raw(), reason="consumed"), consumed("p33", p33_raw(), reason="consumed")]
    findings = orders_check([an_order()], audit)
    assert findings.ok, findings.describe()
    assert findings.orders_verified == 1


@pytest.mark.parametrize("subject", [None, ""], ids=["no_subject", "empty_subject"])
def test_without_a_subject_the_slot_is_the_lines_reason(subject: str | None) -> None:
    """check_orders__mutmut_50, 52, 54, 55 (the reason's key or value lost: the permit filed under no slot)."""
    audit = both_consumed()
    for line in audit:
        if subject is None:
            del line["subject"]
        else:
            line["subject"] = subject
    findings = orders_check([an_order()], audit)
    assert findings.ok, findings.describe()
    assert findings.orders_verified == 1


def test_an_order_without_a_client_order_id_is_named_by_the_empty_id() -> None:
    """check_orders__mutmut_77, 79, 83 (a missing id read as "None" / "XXXX") and __mutmut_96 (the example lost)."""
    stray = {k: v for k, v in an_order().items() if k != "clientOrderId"}
    findings = orders_check([stray])
    assert findings.broken == {oracle.ORDERS_WITHOUT_VERIFIED_PERMITS: 1}
    assert findings.examples[oracle.ORDERS_WITHOUT_VERIFIED_PERMITS] == [": not a plan's client order id"]
    assert findings.orders_checked == 1


def test_orders_of_every_client_order_id_are_counted_and_checked() -> None:
    """check_orders__mutmut_84 (orders_checked `=`: only the last id's orders counted) and __mutmut_99 (`break`
    after an order that is no plan's: the orders after it never checked)."""
    findings = orders_check([an_order(clientOrderId="manual-1"), an_order(order_id=2)])
    assert findings.broken == {oracle.ORDERS_WITHOUT_VERIFIED_PERMITS: 1}
    assert findings.examples[oracle.ORDERS_WITHOUT_VERIFIED_PERMITS] == ["manual-1: not a plan's client order id"]
    assert (findings.orders_checked, findings.orders_verified) == (2, 1)


def test_every_order_of_one_client_order_id_is_verified_on_its_own() -> None:
    """check_orders__mutmut_152 (`break` after an unverified order: the next order of the same id never checked)
    and __mutmut_153 (orders_verified `= 1`)."""
    first_bad = [an_order(symbol="ETHUSDT"), an_order(order_id=2, qty="0.000"), an_order(order_id=3, qty="0.000")]
    findings = orders_check(first_bad)
    assert findings.counts[oracle.DUPLICATE_ORDERS] == 1
    assert findings.examples[oracle.ORDERS_WITHOUT_VERIFIED_PERMITS] == [f"{COID}: p33 permit: for symbol 'BTCUSDT'"]
    assert (findings.orders_checked, findings.orders_verified) == (3, 2)


def test_a_plan_entry_and_an_order_both_without_a_symbol_agree() -> None:
    """check_orders__mutmut_114, 116, 119 (a plan's missing symbol read as None / "XXXX": the order, also without
    one, then unlike its plan) and __mutmut_123, 125, 128 (the order's missing symbol read as "None" / "XXXX":
    the P3.3 permit's symbol is then checked against it)."""
    entry = {k: v for k, v in to_fields(PLAN).items() if k != "symbol"}
    entry["plan_hash"] = plan_hash_of(entry)  # a valid record of a plan without a symbol field
    audit = [
        consumed("governor", governor_raw(plan_hash=entry["plan_hash"])),
        consumed("p33", p33_raw(plan_hash=entry["plan_hash"])),
    ]
    order = {k: v for k, v in an_order().items() if k != "symbol"}
    findings = orders_check([order], audit, [entry])
    assert findings.ok, findings.describe()
    assert findings.orders_verified == 1


def test_an_order_without_a_symbol_is_unlike_its_plan() -> None:
    """check_orders__mutmut_123, 125, 128: the missing symbol is "", which the P3.3 permit's symbol check skips
    and the plan's symbol does not match (read as "None" it fails the permit instead)."""
    order = {k: v for k, v in an_order().items() if k != "symbol"}
    findings = orders_check([order])
    assert findings.broken == {oracle.ORDERS_UNLIKE_PLAN: 1}
    assert findings.examples[oracle.ORDERS_UNLIKE_PLAN] == [f"{COID}: SELL , plan ['BTCUSDT']"]


def test_an_order_that_filled_nothing_is_within_any_safe_close() -> None:
    """check_orders__mutmut_164 (Decimal(None) for a zero executed quantity: raises) and __mutmut_165 (a zero
    executed quantity read as 1, above the 0.5 safe close)."""
    findings = orders_check([an_order(qty="0", status="EXPIRED")])
    assert findings.ok, findings.describe()
    assert findings.orders_verified == 1


def test_a_zero_safe_close_makes_any_fill_too_much() -> None:
    """check_orders__mutmut_173 (Decimal(None) for a zero safe close: raises) and __mutmut_174 (a zero safe close
    read as 1, above the 0.5 filled)."""
    audit = [consumed("governor", governor_raw()), consumed("p33", p33_raw(safe_close_qty=Decimal(0)))]
    findings = orders_check([an_order()], audit)
    assert findings.broken == {oracle.QTY_ABOVE_SAFE_CLOSE: 1}
    assert findings.examples[oracle.QTY_ABOVE_SAFE_CLOSE] == [f"{COID}: executed 0.500 > safe_close_qty 0"]


def test_an_order_on_the_wrong_side_is_described_with_its_side() -> None:
    """check_orders__mutmut_201 (the example lost) and __mutmut_204..206 (the order's side read from another key)."""
    findings = orders_check([an_order(side="BUY")])
    assert findings.broken == {oracle.ORDERS_UNLIKE_PLAN: 1}
    assert findings.examples[oracle.ORDERS_UNLIKE_PLAN] == [f"{COID}: BUY BTCUSDT, plan ['BTCUSDT']"]


# --- _unverified: why an order lacks its two permits ------------------------------------------------------------


@pytest.mark.parametrize(
    ("audit", "plans", "why"),
    [
        # _unverified__mutmut_2..4
        (None, [], "no published EXECUTE plan of its proposal id with a valid hash"),
        # __mutmut_20 (`if lines`: the missing slot not named, the present one named) and __mutmut_55 (`or`:
        # "different plan hashes" although only one permit verified)
        ([consumed("p33", p33_raw())], None, "no consumed governor permit"),
        # __mutmut_65 (the reasons joined with "XX, XX")
        ([], None, "no consumed governor permit, no consumed p33 permit"),
    ],
    ids=["unpublished", "no_governor", "nothing"],
)
def test_an_unverified_order_says_exactly_why(
    audit: list[dict[str, Any]] | None, plans: list[dict[str, str]] | None, why: str
) -> None:
    findings = orders_check([an_order()], audit, plans)
    assert findings.broken == {oracle.ORDERS_WITHOUT_VERIFIED_PERMITS: 1}
    assert findings.examples[oracle.ORDERS_WITHOUT_VERIFIED_PERMITS] == [f"{COID}: {why}"]


def test_permits_of_two_publications_say_so_exactly() -> None:
    """_unverified__mutmut_61 (the reason's text)."""
    again = msgspec.structs.replace(PLAN, created_at=NOW + 5)
    again = msgspec.structs.replace(again, plan_hash=plan_hash_of(to_fields(again)))
    audit = [consumed("governor", governor_raw(PLAN)), consumed("p33", p33_raw(again))]
    findings = orders_check([an_order()], audit, [to_fields(PLAN), to_fields(again)])
    assert findings.examples[oracle.ORDERS_WITHOUT_VERIFIED_PERMITS] == [
        f"{COID}: the two permits name different plan hashes"
    ]


# --- check_results --------------------------------------------------------------------------------------------


def test_the_fills_of_several_orders_of_a_plan_add_up() -> None:
    """check_results__mutmut_15 (`=`: only the last order's fill kept)."""
    twice = [an_order(qty="0.250", order_id=1), an_order(qty="0.250", order_id=2)]
    findings = check_results(twice, [a_result(filled="0.500")], expected=[PLAN.plan_id])
    assert findings.ok, findings.describe()


def test_an_order_that_filled_nothing_agrees_with_a_result_not_executed() -> None:
    """check_results__mutmut_26 (a zero executed quantity read as 1)."""
    findings = check_results([an_order(qty="0", status="EXPIRED")], [a_result(executed=False)], [PLAN.plan_id])
    assert findings.ok, findings.describe()
    assert findings.plans_checked == 1


def test_a_fill_the_oracle_cannot_read_as_wire_data_is_not_taken_for_one() -> None:
    """_decimal__mutmut_1 (the type guard made `and`, so any object whose str() is a number is read): only JSON's
    forms (text, int, float) are quantities; a Python Decimal object is no reply's content, and a result that
    claims the fill is then found disagreeing rather than vouched for."""
    findings = check_results([an_order(executedQty=Decimal("0.500"))], [a_result()], [PLAN.plan_id])
    assert findings.broken == {oracle.RESULTS_DISAGREEING: 1}


def test_a_result_without_a_plan_id_is_the_result_of_the_plan_named_by_the_empty_id() -> None:
    """check_results__mutmut_31, 33, 36 (a missing plan_id read as None / "XXXX"): as everywhere in the stream
    conventions, a missing field reads as empty."""
    result = {k: v for k, v in a_result(executed=False).items() if k != "plan_id"}
    findings = check_results([], [result], expected=[""])
    assert findings.ok, findings.describe()
    assert findings.plans_checked == 1


def test_every_expected_plan_is_checked_even_after_one_without_results() -> None:
    """check_results__mutmut_41 (plans_checked `= 1`) and __mutmut_52 (`break` after a plan without results)."""
    other = a_plan(2)
    findings = check_results([], [a_result(other)], expected=[PLAN.plan_id, other.plan_id])
    assert findings.broken == {oracle.PLANS_WITHOUT_ONE_RESULT: 1, oracle.RESULTS_DISAGREEING: 1}
    assert findings.examples[oracle.PLANS_WITHOUT_ONE_RESULT] == [f"{PLAN.plan_id}: 0 results"]
    assert findings.plans_checked == 2


def test_a_disagreeing_result_is_described_with_what_it_said() -> None:
    """check_results__mutmut_84 (the example lost) and __mutmut_87..92 (executed / filled_qty read from other keys)."""
    findings = check_results([an_order()], [a_result(executed=False)], expected=[PLAN.plan_id])
    assert findings.examples[oracle.RESULTS_DISAGREEING] == [
        f"{PLAN.plan_id}: executed=false filled_qty=0, exchange 0.500"
    ]


# --- Findings and plan_hash_of --------------------------------------------------------------------------------


def test_findings_keep_at_most_ten_examples_of_a_kind() -> None:
    """Findings.add__mutmut_9 (`<=`: eleven examples kept)."""
    findings = Findings()
    for n in range(15):
        findings.add(oracle.DUPLICATE_ORDERS, f"qt-{n}")
    assert findings.counts[oracle.DUPLICATE_ORDERS] == 15
    assert findings.examples[oracle.DUPLICATE_ORDERS] == [f"qt-{n}" for n in range(oracle.MAX_EXAMPLES)]


def test_merging_counts_a_kind_the_receiver_lacks_from_zero() -> None:
    """Findings.merge__mutmut_4, 6 (None + n: raises) and __mutmut_7 (counted from 1)."""
    other = Findings()
    other.add(oracle.DUPLICATE_ORDERS, "qt-1")
    other.add(oracle.DUPLICATE_ORDERS, "qt-2")
    merged = Findings(counts={}).merge(other)
    assert merged.counts == {**dict.fromkeys(oracle.KINDS, 0), oracle.DUPLICATE_ORDERS: 2}


def test_merging_adds_the_checked_and_verified_counts() -> None:
    """Findings.merge__mutmut_17, 19 (`-=`) and __mutmut_20 (plans_checked `=`)."""
    merged = Findings(orders_checked=3, orders_verified=2, plans_checked=4).merge(
        Findings(orders_checked=5, orders_verified=1, plans_checked=6)
    )
    assert (merged.orders_checked, merged.orders_verified, merged.plans_checked) == (8, 3, 10)


def test_describe_lists_each_broken_kind_with_its_examples() -> None:
    """Findings.describe__mutmut_1..6 (no test called it)."""
    findings = Findings()
    findings.add(oracle.DUPLICATE_ORDERS, "a")
    findings.add(oracle.DUPLICATE_ORDERS, "b")
    findings.add(oracle.QTY_ABOVE_SAFE_CLOSE, "c")
    assert findings.describe() == "qty_above_safe_close=1: ['c']; duplicate_orders=2: ['a', 'b']"
    assert Findings().describe() == ""
    # counts merged in without examples (a Findings built by hand) show an empty list, not None
    assert Findings(counts={oracle.DUPLICATE_ORDERS: 2}).describe() == "duplicate_orders=2: []"


def test_a_plan_entry_missing_a_field_hashes_as_if_it_were_empty() -> None:
    """plan_hash_of__mutmut_3, 5 (a missing field hashed as null) and __mutmut_6 (as "XXXX"): to_fields writes an
    absent value as "", and from_fields reads "" as absent."""
    fields = to_fields(PLAN)
    without = {k: v for k, v in fields.items() if k != "reason"}
    assert plan_hash_of(without) == plan_hash_of({**fields, "reason": ""})
    assert plan_hash_of(without) != plan_hash_of(fields)
