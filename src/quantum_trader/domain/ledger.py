"""P3.3's ledger: how executed results move it, and how it is reconciled to the exchange."""

from __future__ import annotations

from decimal import Decimal

from quantum_trader.domain.execution import CLOCK_MARGIN_MS
from quantum_trader.domain.models import Ledger, Result


def apply_result(
    ledger: Ledger | None, result: Result, result_id: str, now: float, applied: frozenset[str] = frozenset()
) -> Ledger | None:
    """The ledger after an executed close, or None when the result changes nothing or was applied already.

    A close reduces the position towards zero: a LONG shrinks by the filled quantity, a SHORT grows towards
    zero by it. ``applied`` holds the ids of results already in the ledger: fills commute, so results may be
    applied in any order (several brains share the result stream, and a claimed entry comes late), but each
    only once. A fill the ledger already has from the exchange itself (it happened before the ledger was last
    set from the exchange: a reconcile, say after the store forgot the result, then the result arrives) is
    not counted again.
    """
    if not result.executed or result.filled_qty <= 0 or result.side == "NONE" or result_id in applied:
        return None
    if ledger is not None and already_synced(ledger, result.order_time_ms):
        return None
    before = ledger.last_known_amt if ledger else Decimal(0)
    delta = -result.filled_qty if result.side == "LONG" else result.filled_qty
    return Ledger(
        last_known_amt=before + delta,
        updated_at=now,
        source="result",
        last_plan_id=result.plan_id,
        last_result_id=result_id,
        last_exec_at=now,
        synced_at_ms=ledger.synced_at_ms if ledger else 0,
        # a fill whose time is not known makes the latest one unknown: no snapshot can be shown to include it
        last_fill_ms=max(result.order_time_ms, ledger.last_fill_ms if ledger else 0) if result.order_time_ms else 0,
    )


def already_synced(ledger: Ledger, order_time_ms: int) -> bool:
    """A fill at ``order_time_ms`` (exchange clock; 0 = not known) is in the amount the ledger last took from
    the exchange."""
    return bool(order_time_ms) and order_time_ms <= ledger.synced_at_ms


def synced_at(position_time_ms: int, asked_at_ms: float) -> int:
    """Up to when (exchange ms) a position read shows every fill: the position's own last change, or the time
    the read was sent (minus the clock margin), whichever is later: a fill before either is in the reply."""
    return max(position_time_ms, int(asked_at_ms) - CLOCK_MARGIN_MS)


def reconcile(ledger: Ledger | None, exchange_amt: Decimal, now: float, synced_at_ms: int = 0) -> Ledger | None:
    """The ledger set to the exchange's position, or None when they already agree exactly."""
    if ledger is not None and ledger.last_known_amt == exchange_amt:
        return None
    return Ledger(
        last_known_amt=exchange_amt,
        updated_at=now,
        source="reconcile",
        last_plan_id=ledger.last_plan_id if ledger else "",
        last_result_id=ledger.last_result_id if ledger else "",
        last_exec_at=ledger.last_exec_at if ledger else 0.0,
        synced_at_ms=max(synced_at_ms, ledger.synced_at_ms if ledger else 0),
        last_fill_ms=ledger.last_fill_ms if ledger else 0,
    )


def pushed_is_newer(ledger: Ledger | None, transaction_ms: int) -> bool:
    """A pushed position (the state after the exchange's transaction at ``transaction_ms``) can be compared
    with ``ledger``: it is at least as new as the ledger's last change. A ledger moved by results is as new as
    its latest fill (unknown: never comparable, the poll decides); one taken from the exchange, as the time up
    to which it is the exchange's own. An older pushed state (a fill's result recorded before the fill's push
    arrived, or an earlier event) would show growth that is only the ledger being ahead."""
    if ledger is None:
        return True
    if ledger.source == "result":
        return bool(ledger.last_fill_ms) and transaction_ms >= ledger.last_fill_ms
    return transaction_ms > ledger.synced_at_ms


def adopt_outside_growth(
    ledger: Ledger | None, exchange_amt: Decimal, now: float, synced_at_ms: int = 0
) -> Ledger | None:
    """The ledger after a position was opened or increased outside the permit chain, or None.

    This chain only ever closes, so entries come from elsewhere (the trading bot) and are adopted: from flat,
    or growing on the same side. A reduction or a flip that no result explains is drift, and stays visible
    as a ``qty_mismatch`` / ``side_mismatch`` until an operator reconciles (``qt brain reconcile``).
    """
    if ledger is None:
        return None  # no ledger at all: reconcile's job, not adoption's
    before = ledger.last_known_amt
    grew = (before == 0 and exchange_amt != 0) or (before * exchange_amt > 0 and abs(exchange_amt) > abs(before))
    if not grew:
        return None
    return Ledger(
        last_known_amt=exchange_amt,
        updated_at=now,
        source="reconcile",
        last_plan_id=ledger.last_plan_id,
        last_result_id=ledger.last_result_id,
        last_exec_at=ledger.last_exec_at,
        synced_at_ms=max(synced_at_ms, ledger.synced_at_ms),
        last_fill_ms=ledger.last_fill_ms,
    )
