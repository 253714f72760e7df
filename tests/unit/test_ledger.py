"""P3.3's ledger: executed results move it, reconcile sets it, outside growth is adopted."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.domain.ledger import adopt_outside_growth, apply_result, reconcile
from quantum_trader.domain.models import Ledger, Result

D = Decimal
NOW = 1_700_000_100.0
PLAN_ID = "0123456789abcdef"


def result(side: str = "LONG", filled: str = "0.4", executed: bool = True, **changes: Any) -> Result:
    values: dict[str, Any] = {
        "plan_id": PLAN_ID,
        "symbol": "BTCUSDT",
        "side": side,
        "executed": executed,
        "filled_qty": D(filled),
        "avg_price": D("60000"),
    }
    values.update(changes)
    return Result(**values)


def ledger(amt: str, last_result_id: str = "", **changes: Any) -> Ledger:
    values: dict[str, Any] = {
        "last_known_amt": D(amt),
        "updated_at": 1_700_000_000.0,
        "source": "reconcile",
        "last_plan_id": "fedcba9876543210",
        "last_result_id": last_result_id,
        "last_exec_at": 5.0,
    }
    values.update(changes)
    return Ledger(**values)


# --- apply_result -----------------------------------------------------------------------------------------


def test_long_fill_shrinks_the_position() -> None:
    after = apply_result(ledger("1.0"), result("LONG", "0.4"), "1700000000000-0", NOW)
    assert after == Ledger(
        last_known_amt=D("0.6"),
        updated_at=NOW,
        source="result",
        last_plan_id=PLAN_ID,
        last_result_id="1700000000000-0",
        last_exec_at=NOW,
    )


def test_short_fill_moves_towards_zero() -> None:
    after = apply_result(ledger("-1.0"), result("SHORT", "0.4"), "1700000000000-0", NOW)
    assert after is not None
    assert after.last_known_amt == D("-0.6")
    assert after.source == "result"
    assert after.last_exec_at == NOW


@pytest.mark.parametrize(("start", "side"), [("0.25", "LONG"), ("-0.25", "SHORT")])
def test_full_close_reaches_zero(start: str, side: str) -> None:
    after = apply_result(ledger(start), result(side, "0.25"), "1-0", NOW)
    assert after is not None
    assert after.last_known_amt == 0


def test_without_a_ledger_the_fill_is_applied_from_zero() -> None:
    after = apply_result(None, result("LONG", "0.4"), "1-0", NOW)
    assert after is not None
    assert after.last_known_amt == D("-0.4")  # and ledger_match then reports side_mismatch until reconcile


def test_an_applied_result_is_ignored() -> None:
    first = apply_result(ledger("1"), result("LONG", "0.4"), "1700000000000-5", NOW)
    assert first is not None
    again = apply_result(first, result("LONG", "0.4"), "1700000000000-5", NOW + 1, frozenset({"1700000000000-5"}))
    assert again is None


def test_results_apply_in_any_order() -> None:
    """A result claimed late from a dead brain arrives after a newer one: it must still count."""
    newer = apply_result(ledger("1"), result("LONG", "0.3"), "1700000000000-9", NOW)
    assert newer is not None
    older = apply_result(newer, result("LONG", "0.2"), "1700000000000-5", NOW, frozenset({"1700000000000-9"}))
    assert older is not None and older.last_known_amt == D("0.5")


@pytest.mark.parametrize(
    "res",
    [
        result(executed=False, error="permit_denied"),
        result(executed=False, filled="0.4", error="order_unknown"),
        result(filled="0"),
        result(side="NONE"),
    ],
)
def test_results_that_change_nothing_are_ignored(res: Result) -> None:
    assert apply_result(ledger("1"), res, "99-0", NOW) is None
    assert apply_result(None, res, "99-0", NOW) is None


@given(
    start=st.decimals(min_value=D("0.001"), max_value=D("1000"), places=3, allow_nan=False),
    fills=st.lists(st.decimals(min_value=D("0.001"), max_value=D("10"), places=3, allow_nan=False), max_size=6),
    side=st.sampled_from(["LONG", "SHORT"]),
    order=st.randoms(),
)
def test_replaying_the_result_stream_in_any_order_is_idempotent(
    start: Decimal, fills: list[Decimal], side: str, order: Any
) -> None:
    sign = 1 if side == "LONG" else -1
    state: Ledger | None = ledger(str(sign * start))
    stream = [(f"{1000 + i}-0", result(side, str(q))) for i, q in enumerate(fills)]
    delivered = stream + stream  # every result delivered twice (a redelivery after a crash)
    order.shuffle(delivered)
    applied: set[str] = set()
    for entry_id, res in delivered:
        after = apply_result(state, res, entry_id, NOW, frozenset(applied))
        if after is not None:
            state = after
            applied.add(entry_id)
    assert state is not None
    assert state.last_known_amt == sign * (start - sum(fills, D(0)))


# --- reconcile --------------------------------------------------------------------------------------------


def test_reconcile_no_change_when_equal() -> None:
    assert reconcile(ledger("1.5"), D("1.5"), NOW) is None
    assert reconcile(ledger("1.5"), D("1.50"), NOW) is None  # numerically equal
    assert reconcile(ledger("0"), D("0"), NOW) is None


def test_reconcile_change_sets_source_and_keeps_history() -> None:
    before = ledger("1.5", "17-3", source="result")
    after = reconcile(before, D("-0.2"), NOW)
    assert after == Ledger(
        last_known_amt=D("-0.2"),
        updated_at=NOW,
        source="reconcile",
        last_plan_id=before.last_plan_id,
        last_result_id="17-3",
        last_exec_at=before.last_exec_at,
    )


def test_reconcile_from_nothing() -> None:
    after = reconcile(None, D("0"), NOW)
    assert after == Ledger(last_known_amt=D(0), updated_at=NOW, source="reconcile")
    assert reconcile(None, D("2"), NOW) == Ledger(last_known_amt=D(2), updated_at=NOW, source="reconcile")


# --- adopt_outside_growth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "exchange", "adopted"),
    [
        ("0", "1", True),  # opened from flat
        ("0", "-1", True),
        ("1", "1.5", True),  # grew on the same side
        ("-1", "-1.5", True),
        ("1", "1", False),  # unchanged
        ("1", "0.5", False),  # reduction: drift, stays visible
        ("-1", "-0.5", False),
        ("1", "0", False),  # closed outside
        ("1", "-2", False),  # flip
        ("-1", "2", False),
        ("0", "0", False),
    ],
)
def test_adopt_outside_growth(before: str, exchange: str, adopted: bool) -> None:
    current = ledger(before, "17-3")
    after = adopt_outside_growth(current, D(exchange), NOW)
    if not adopted:
        assert after is None
        return
    assert after == Ledger(
        last_known_amt=D(exchange),
        updated_at=NOW,
        source="reconcile",
        last_plan_id=current.last_plan_id,
        last_result_id="17-3",
        last_exec_at=current.last_exec_at,
    )


def test_no_ledger_is_not_adopted() -> None:
    assert adopt_outside_growth(None, D("1"), NOW) is None
    assert adopt_outside_growth(None, D("0"), NOW) is None
