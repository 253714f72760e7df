"""P3.3 Position State Brain: each rule with its reason code, the order they run in, and the safe close quantity."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantum_trader.domain import reasons
from quantum_trader.domain.brain import RULES, BrainInputs, BrainPolicy, BrainVerdict, decide
from quantum_trader.domain.brain.close_qty import safe_close_qty
from quantum_trader.domain.brain.snapshot_age import behind_ledger
from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.domain.models import Ledger, Plan, Snapshot

D = Decimal
NOW = 1_700_000_000.0
PLAN_ID = "0123456789abcdef"
OTHER_PLAN = "fedcba9876543210"

POLICY = BrainPolicy(
    managed=frozenset({"BTCUSDT", "ETHUSDT"}),
    snapshot_max_age_s=10.0,
    qty_tolerance_pct=D("1"),
    cooldown_s=15.0,
)
FILTERS = SymbolFilters(symbol="BTCUSDT", step_size=D("0.001"), min_qty=D("0.001"), max_qty=D("120"))


def plan(**changes: Any) -> Plan:
    values: dict[str, Any] = {
        "plan_id": PLAN_ID,
        "proposal_id": "prop-1",
        "symbol": "BTCUSDT",
        "side": "LONG",
        "action": "FULL_CLOSE",
        "qty": D("1"),
        "decision": "EXECUTE",
        "reason": "ready",
        "steps": "[]",
        "plan_hash": "0" * 64,
        "created_at": NOW,
    }
    values.update(changes)
    return Plan(**values)


def snapshot(amt: str = "1", ts: float = NOW - 1) -> Snapshot:
    return Snapshot(position_amt=D(amt), entry_price=D("60000"), mark_price=D("60100"), ts=ts)


def ledger(amt: str = "1", last_exec_at: float = 0.0) -> Ledger:
    return Ledger(last_known_amt=D(amt), updated_at=NOW - 100, source="reconcile", last_exec_at=last_exec_at)


def inputs(**changes: Any) -> BrainInputs:
    values: dict[str, Any] = {
        "snapshot": snapshot(),
        "ledger": ledger(),
        "in_flight_plan": None,
        "filters": FILTERS,
    }
    values.update(changes)
    return BrainInputs(**values)


def reason(p: Plan | None = None, i: BrainInputs | None = None, policy: BrainPolicy = POLICY) -> str:
    return decide(p or plan(), i or inputs(), policy, NOW).reason


def test_allow_with_sanity_checks_passed() -> None:
    verdict = decide(plan(), inputs(), POLICY, NOW)
    assert verdict == BrainVerdict(True, "sanity_checks_passed", D("1.000"), D("1"), D("1"))


def test_allow_short() -> None:
    verdict = decide(plan(side="SHORT"), inputs(snapshot=snapshot("-2.5"), ledger=ledger("-2.5")), POLICY, NOW)
    assert verdict.allow
    assert verdict.reason == reasons.SANITY_CHECKS_PASSED
    assert verdict.safe_close_qty == D("2.5")
    assert verdict.exchange_position_amt == D("-2.5")
    assert verdict.ledger_amt == D("-2.5")


def test_deny_carries_amounts_and_zero_qty() -> None:
    verdict = decide(plan(), inputs(snapshot=snapshot("2"), ledger=ledger("1")), POLICY, NOW)
    assert verdict == BrainVerdict(False, reasons.QTY_MISMATCH, D(0), D("2"), D("1"))
    no_snap = decide(plan(), inputs(snapshot=None, ledger=None), POLICY, NOW)
    assert no_snap == BrainVerdict(False, reasons.STALE_SNAPSHOT, D(0), D(0), None)


# --- each rule --------------------------------------------------------------------------------------------


def test_symbol_not_managed() -> None:
    assert reason(plan(symbol="SOLUSDT")) == "symbol_not_managed"


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (0.0, "sanity_checks_passed"),
        (9.999, "sanity_checks_passed"),
        (10.0, "sanity_checks_passed"),  # exactly at the boundary is still fresh
        (10.001, "stale_snapshot"),
        (3600.0, "stale_snapshot"),
        (-5.0, "sanity_checks_passed"),  # a snapshot stamped slightly in the future is not stale
    ],
)
def test_stale_snapshot_boundary(age: float, expected: str) -> None:
    assert reason(i=inputs(snapshot=snapshot(ts=NOW - age))) == expected


def test_missing_snapshot_is_stale() -> None:
    assert reason(i=inputs(snapshot=None)) == "stale_snapshot"


def test_no_position() -> None:
    assert reason(i=inputs(snapshot=snapshot("0"), ledger=ledger("0"))) == "no_position"
    assert reason(plan(side="SHORT"), inputs(snapshot=snapshot("0.000"), ledger=ledger("0"))) == "no_position"


@pytest.mark.parametrize(("side", "amt"), [("LONG", "-1"), ("SHORT", "1")])
def test_plan_side_mismatch(side: str, amt: str) -> None:
    assert reason(plan(side=side), inputs(snapshot=snapshot(amt), ledger=ledger(amt))) == "plan_side_mismatch"


def test_ledger_missing() -> None:
    assert reason(i=inputs(ledger=None)) == "ledger_missing"


@pytest.mark.parametrize(("ledger_amt", "exchange_amt"), [("-1", "1"), ("1", "-1"), ("-0.001", "5")])
def test_side_mismatch(ledger_amt: str, exchange_amt: str) -> None:
    side = "LONG" if D(exchange_amt) > 0 else "SHORT"
    verdict = decide(plan(side=side), inputs(snapshot=snapshot(exchange_amt), ledger=ledger(ledger_amt)), POLICY, NOW)
    assert verdict.reason == "side_mismatch"


@pytest.mark.parametrize(
    ("ledger_amt", "exchange_amt", "expected"),
    [
        ("100", "100", "sanity_checks_passed"),
        ("100", "99", "sanity_checks_passed"),  # exactly 1 % of the larger
        ("99", "100", "sanity_checks_passed"),
        ("100", "99.01", "sanity_checks_passed"),  # just under 1 %
        ("100", "98.99", "qty_mismatch"),  # just over 1 %
        ("98.99", "100", "qty_mismatch"),
        ("-100", "-98.99", "qty_mismatch"),
        ("-100", "-99.5", "sanity_checks_passed"),
        ("0", "1", "qty_mismatch"),  # a ledger at zero against an open position is 100 % off
    ],
)
def test_qty_mismatch_around_one_percent(ledger_amt: str, exchange_amt: str, expected: str) -> None:
    side = "LONG" if D(exchange_amt) > 0 else "SHORT"
    i = inputs(snapshot=snapshot(exchange_amt), ledger=ledger(ledger_amt))
    assert reason(plan(side=side), i) == expected


def test_qty_tolerance_is_the_policy_value() -> None:
    i = inputs(snapshot=snapshot("95"), ledger=ledger("100"))
    assert reason(i=i) == "qty_mismatch"
    assert reason(i=i, policy=replace(POLICY, qty_tolerance_pct=D("5"))) == "sanity_checks_passed"
    strict = replace(POLICY, qty_tolerance_pct=D("0"))
    assert reason(i=inputs(snapshot=snapshot("1.001"), ledger=ledger("1"))) == "sanity_checks_passed"
    assert reason(i=inputs(snapshot=snapshot("1.001"), ledger=ledger("1")), policy=strict) == "qty_mismatch"


def test_order_in_flight_for_another_plan() -> None:
    assert reason(i=inputs(in_flight_plan=OTHER_PLAN)) == "order_in_flight"


def test_in_flight_for_the_same_plan_is_allowed() -> None:
    # P3.3 deciding the same plan again (redelivery) finds its own hold: not a conflict.
    assert reason(i=inputs(in_flight_plan=PLAN_ID)) == "sanity_checks_passed"


@pytest.mark.parametrize(
    ("since_exec", "expected"),
    [
        (0.0, "cooldown_active"),
        (14.999, "cooldown_active"),
        (15.0, "sanity_checks_passed"),
        (60.0, "sanity_checks_passed"),
    ],
)
def test_cooldown_active(since_exec: float, expected: str) -> None:
    assert reason(i=inputs(ledger=ledger(last_exec_at=NOW - since_exec))) == expected


def test_no_cooldown_without_an_executed_close() -> None:
    assert reason(i=inputs(ledger=ledger(last_exec_at=0.0))) == "sanity_checks_passed"


def test_no_symbol_filters() -> None:
    assert reason(i=inputs(filters=None)) == "no_symbol_filters"


def test_qty_zero_after_rounding() -> None:
    i = inputs(snapshot=snapshot("0.0009"), ledger=ledger("0.0009"))
    assert reason(i=i) == "qty_zero_after_rounding"
    partial = plan(action="PARTIAL_CLOSE", qty=D("0.0005"))
    assert reason(partial) == "qty_zero_after_rounding"


def test_below_min_qty() -> None:
    filters = replace(FILTERS, min_qty=D("0.01"))
    partial = plan(action="PARTIAL_CLOSE", qty=D("0.005"))
    assert reason(partial, inputs(filters=filters)) == "below_min_qty"
    exactly_min = plan(action="PARTIAL_CLOSE", qty=D("0.01"))
    assert decide(exactly_min, inputs(filters=filters), POLICY, NOW).safe_close_qty == D("0.01")


def test_rule_order() -> None:
    """Break every rule, then fix them one at a time: the reason follows the documented order."""
    p = plan(symbol="SOLUSDT", action="PARTIAL_CLOSE", qty=D("0.0001"))
    i = inputs(snapshot=None, ledger=None, in_flight_plan=OTHER_PLAN, filters=None)
    seen = [reason(p, i)]
    p = replace_plan(p, symbol="BTCUSDT")
    seen.append(reason(p, i))
    i = replace(i, snapshot=snapshot("0"))
    seen.append(reason(p, i))
    i = replace(i, snapshot=snapshot("-1"))
    seen.append(reason(p, i))
    i = replace(i, snapshot=snapshot("1"))
    seen.append(reason(p, i))
    i = replace(i, ledger=ledger("-1", last_exec_at=NOW))
    seen.append(reason(p, i))
    i = replace(i, ledger=ledger("2", last_exec_at=NOW))
    seen.append(reason(p, i))
    i = replace(i, ledger=ledger("1", last_exec_at=NOW))
    seen.append(reason(p, i))
    i = replace(i, in_flight_plan=None)
    seen.append(reason(p, i))
    i = replace(i, ledger=ledger("1"))
    seen.append(reason(p, i))
    i = replace(i, filters=replace(FILTERS, min_qty=D("0.01")))
    seen.append(reason(p, i))
    p = replace_plan(p, qty=D("0.005"))
    seen.append(reason(p, i))
    p = replace_plan(p, qty=D("0.5"))
    seen.append(reason(p, i))
    assert seen == [
        "symbol_not_managed",
        "stale_snapshot",
        "no_position",
        "plan_side_mismatch",
        "ledger_missing",
        "side_mismatch",
        "qty_mismatch",
        "order_in_flight",
        "cooldown_active",
        "no_symbol_filters",
        "qty_zero_after_rounding",
        "below_min_qty",
        "sanity_checks_passed",
    ]
    assert len(RULES) == 5


def replace_plan(p: Plan, **changes: Any) -> Plan:
    return msgspec.structs.replace(p, **changes)


# --- safe close quantity ----------------------------------------------------------------------------------


def test_safe_close_qty_examples() -> None:
    assert safe_close_qty(plan(), D("0.0567"), FILTERS) == D("0.056")
    assert safe_close_qty(plan(), D("-0.0567"), FILTERS) == D("0.056")
    assert safe_close_qty(plan(action="PARTIAL_CLOSE", qty=D("0.02")), D("0.0567"), FILTERS) == D("0.020")
    assert safe_close_qty(plan(action="PARTIAL_CLOSE", qty=D("5")), D("0.0567"), FILTERS) == D("0.056")
    assert safe_close_qty(plan(), D("500"), FILTERS) == D("120")  # clamped to the market order maximum
    assert safe_close_qty(plan(), D("1"), None) == reasons.NO_SYMBOL_FILTERS


def test_full_close_ignores_plan_qty() -> None:
    # The plan's qty was Apply's view of the position; P3.3 sizes a FULL_CLOSE from the snapshot.
    assert safe_close_qty(plan(qty=D("9")), D("0.5"), FILTERS) == D("0.5")
    assert safe_close_qty(plan(qty=D("0.1")), D("0.5"), FILTERS) == D("0.5")


_steps = st.sampled_from([D("1"), D("0.1"), D("0.01"), D("0.001"), D("0.0001"), D("0.5"), D("0.25"), D("5"), D("10")])
# Quantities with up to 6 decimals and magnitudes spread evenly from 1e-6 to 1e6 (decimals() favours tiny values).
_positive = st.builds(lambda m, e: D(m).scaleb(e), st.integers(1, 999_999), st.sampled_from(range(-6, 1)))
_amounts = st.builds(lambda q, negative: -q if negative else q, _positive, st.booleans())


@settings(max_examples=200)
@given(
    action=st.sampled_from(["FULL_CLOSE", "PARTIAL_CLOSE"]),
    plan_qty=_positive,
    exchange_amt=_amounts,
    step=_steps,
    max_qty=_positive,
    min_qty=st.sampled_from([D(0), D("0.001"), D("0.1"), D("1"), D("10")]),
)
def test_safe_close_qty_properties(
    action: str, plan_qty: Decimal, exchange_amt: Decimal, step: Decimal, max_qty: Decimal, min_qty: Decimal
) -> None:
    filters = SymbolFilters(symbol="BTCUSDT", step_size=step, min_qty=min_qty, max_qty=max_qty)
    got = safe_close_qty(plan(action=action, qty=plan_qty), exchange_amt, filters)

    wanted = abs(exchange_amt) if action == "FULL_CLOSE" else min(plan_qty, abs(exchange_amt))
    bound = Fraction(min(wanted, max_qty))
    largest = (bound // Fraction(step)) * Fraction(step)  # largest multiple of step not above the bound

    if largest <= 0:
        assert got == reasons.QTY_ZERO_AFTER_ROUNDING
        return
    if largest < min_qty:
        assert got == reasons.BELOW_MIN_QTY
        return
    assert isinstance(got, Decimal)
    assert got > 0
    assert got <= abs(exchange_amt)
    if action == "PARTIAL_CLOSE":
        assert got <= plan_qty
    assert got <= max_qty
    assert got % step == 0
    assert Fraction(got) == largest
    assert got >= min_qty


def test_safe_close_qty_never_above_requested_with_long_decimals() -> None:
    requested = D("9.999999999999999999999999999")
    filters = SymbolFilters(symbol="BTCUSDT", step_size=D("5"), min_qty=D("5"), max_qty=D("1000"))
    got = safe_close_qty(plan(action="PARTIAL_CLOSE", qty=requested), D("20"), filters)
    # 9.999... rounded down to a step of 5 is 5; 28-digit arithmetic would round the quotient up to 2 (10)
    assert got == D("5")
    assert isinstance(got, Decimal) and got.as_tuple() == D("5").as_tuple()


def test_a_snapshot_taken_before_the_ledgers_last_fill_is_stale() -> None:
    behind = inputs(snapshot=snapshot(ts=NOW - 2), ledger=replace_ledger(updated_at=NOW - 1))
    assert reason(i=behind) == reasons.STALE_SNAPSHOT
    ahead = inputs(snapshot=snapshot(ts=NOW - 1), ledger=replace_ledger(updated_at=NOW - 2))
    assert reason(i=ahead) == reasons.SANITY_CHECKS_PASSED


def test_a_snapshot_taken_when_the_ledger_last_changed_is_not_stale() -> None:
    """Equal times are fresh: a snapshot's time is when its request was sent, so it shows every fill before
    then (docs/design-notes.md, P3.3), and only one *older* than the ledger's last change is behind it. A
    reconcile dates the ledger with the very time of the snapshot written with it (services/brain/snapshots.py), so
    treating equal as stale would deny every plan after a reconcile until the next poll."""
    same = inputs(snapshot=snapshot(ts=NOW - 1), ledger=replace_ledger(updated_at=NOW - 1))
    assert behind_ledger(same.snapshot, same.ledger) is False
    assert reason(i=same) == reasons.SANITY_CHECKS_PASSED
    # a millisecond earlier is behind
    behind = inputs(snapshot=snapshot(ts=NOW - 1.001), ledger=replace_ledger(updated_at=NOW - 1))
    assert behind_ledger(behind.snapshot, behind.ledger) is True
    assert reason(i=behind) == reasons.STALE_SNAPSHOT


def test_a_snapshot_that_shows_the_ledgers_last_fill_is_not_behind_it_whatever_the_local_times() -> None:
    """A pushed position often arrives (and is written) before the fill's result is recorded in the ledger:
    by the exchange's clock it shows that fill, so it is not behind. Only for a ledger moved by results, only
    when the fill's time is known, and never when the snapshot shows less than the latest fill."""
    fill_ms = 1_796_000_000_500
    moved = replace_ledger(updated_at=NOW - 1, source="result", last_fill_ms=fill_ms)
    pushed = msgspec.structs.replace(snapshot(ts=NOW - 1.005), synced_ms=fill_ms)
    assert behind_ledger(pushed, moved) is False
    assert reason(i=inputs(snapshot=pushed, ledger=moved)) == reasons.SANITY_CHECKS_PASSED
    short = msgspec.structs.replace(pushed, synced_ms=fill_ms - 1)  # a millisecond short of the fill
    assert behind_ledger(short, moved) is True
    unknown = msgspec.structs.replace(moved, last_fill_ms=0)  # no fill time: the local times decide
    assert behind_ledger(pushed, unknown) is True
    reconciled = msgspec.structs.replace(moved, source="reconcile")  # set from the exchange: local times decide
    assert behind_ledger(pushed, reconciled) is True


def test_a_result_moves_the_ledgers_latest_fill_time_forward_only() -> None:
    """Results commute (applied in any order): the latest fill's time is the largest seen, and a reconcile or
    an adoption keeps it."""
    from quantum_trader.domain.ledger import adopt_outside_growth, apply_result
    from quantum_trader.domain.ledger import reconcile as reconcile_ledger
    from quantum_trader.domain.models import Result

    def fill(ms: int) -> Result:
        return Result(plan_id="a" * 32, symbol="BTCUSDT", side="LONG", executed=True, filled_qty=D("0.1"),
                      order_time_ms=ms)  # fmt: skip

    start = ledger("1")
    later = apply_result(start, fill(2_000), "1-0", NOW)
    assert later is not None and later.last_fill_ms == 2_000
    earlier = apply_result(later, fill(1_000), "2-0", NOW)
    assert earlier is not None and earlier.last_fill_ms == 2_000
    reconciled = reconcile_ledger(earlier, D("5"), NOW)
    assert reconciled is not None and reconciled.last_fill_ms == 2_000
    adopted = adopt_outside_growth(earlier, D("9"), NOW)
    assert adopted is not None and adopted.last_fill_ms == 2_000
    unknown = apply_result(earlier, fill(0), "3-0", NOW)  # a fill whose time the exchange did not give
    assert unknown is not None and unknown.last_fill_ms == 0  # no snapshot can be shown to include it now
    after = apply_result(unknown, fill(3_000), "4-0", NOW)
    assert after is not None and after.last_fill_ms == 3_000


def test_a_pushed_position_older_than_the_ledgers_last_change_is_not_compared_with_it() -> None:
    """A fill's result can be recorded before the fill's push arrives: the pushed state then predates the
    ledger and would look like growth (a false adoption). Only a state at least as new as the ledger's latest
    fill (or, for a ledger taken from the exchange, newer than that read) is compared."""
    from quantum_trader.domain.ledger import pushed_is_newer

    by_results = replace_ledger(source="result", last_fill_ms=5_000)
    assert pushed_is_newer(by_results, 5_000) and pushed_is_newer(by_results, 6_000)
    assert not pushed_is_newer(by_results, 4_999)
    assert not pushed_is_newer(replace_ledger(source="result", last_fill_ms=0), 9_999)  # fill time unknown
    from_exchange = replace_ledger(source="reconcile", synced_at_ms=7_000)
    assert pushed_is_newer(from_exchange, 7_001) and not pushed_is_newer(from_exchange, 7_000)
    assert pushed_is_newer(None, 1)


def replace_ledger(**changes: Any) -> Ledger:
    return msgspec.structs.replace(ledger(), **changes)
