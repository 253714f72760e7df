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


# --- a fill the ledger already took from the exchange (a reconcile after the store forgot its result) ---------


def test_a_result_whose_fill_the_reconcile_already_counted_does_not_move_the_ledger_again() -> None:
    synced = reconcile(ledger("1.0"), D("0.6"), NOW, synced_at_ms=5_000)
    assert synced is not None and synced.last_known_amt == D("0.6") and synced.synced_at_ms == 5_000
    assert apply_result(synced, result(order_time_ms=5_000), "9-0", NOW) is None  # at the sync: in it
    assert apply_result(synced, result(order_time_ms=4_999), "9-0", NOW) is None  # before: in it
    later = apply_result(synced, result(order_time_ms=5_001), "9-0", NOW)  # after: not in it
    assert later is not None and later.last_known_amt == D("0.2") and later.synced_at_ms == 5_000


def test_a_result_without_an_order_time_always_counts() -> None:
    synced = reconcile(ledger("1.0"), D("0.6"), NOW, synced_at_ms=5_000)
    moved = apply_result(synced, result(order_time_ms=0), "9-0", NOW)
    assert moved is not None and moved.last_known_amt == D("0.2")


def test_a_reconcile_never_moves_the_sync_point_back() -> None:
    first = reconcile(ledger("1.0"), D("0.6"), NOW, synced_at_ms=9_000)
    assert first is not None
    second = reconcile(first, D("0.5"), NOW, synced_at_ms=3_000)
    assert second is not None and second.synced_at_ms == 9_000


def test_adopted_outside_growth_is_a_sync_too() -> None:
    grown = adopt_outside_growth(ledger("0.5"), D("0.8"), NOW, synced_at_ms=7_000)
    assert grown is not None and grown.last_known_amt == D("0.8") and grown.synced_at_ms == 7_000
    assert apply_result(grown, result(order_time_ms=6_000), "9-0", NOW) is None


@pytest.mark.parametrize(
    ("position_ms", "asked_ms", "expected"),
    [(10_000, 9_000.0, 10_000), (1_000, 9_000.0, 9_000 - 250), (0, 9_000.7, 9_000 - 250)],
)
def test_a_position_read_shows_every_fill_up_to_its_own_last_change_or_its_send_time(
    position_ms: int, asked_ms: float, expected: int
) -> None:
    from quantum_trader.domain.ledger import synced_at

    assert synced_at(position_ms, asked_ms) == expected
