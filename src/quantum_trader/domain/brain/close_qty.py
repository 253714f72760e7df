from __future__ import annotations

from decimal import Decimal

from quantum_trader.domain import reasons
from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.domain.models import Plan
from quantum_trader.domain.numbers import round_down_to_step


def safe_close_qty(plan: Plan, exchange_amt: Decimal, filters: SymbolFilters | None) -> Decimal | str:
    """The quantity that can be closed without reversing the position: the requested quantity clamped to
    the position and to the market order maximum, rounded DOWN to the step size. Returns a deny reason when
    nothing valid is left."""
    if filters is None:
        return reasons.NO_SYMBOL_FILTERS
    size = abs(exchange_amt)
    wanted = size if plan.action == "FULL_CLOSE" else min(plan.qty, size)
    qty = round_down_to_step(min(wanted, filters.max_qty), filters.step_size)
    if qty <= 0:
        return reasons.QTY_ZERO_AFTER_ROUNDING
    if qty < filters.min_qty:
        return reasons.BELOW_MIN_QTY
    return qty
