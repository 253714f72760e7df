"""A symbol's trading filters from exchangeInfo, as far as a reduce-only market close needs them."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class SymbolFilters:
    """MARKET_LOT_SIZE (falling back to LOT_SIZE) and MIN_NOTIONAL of one symbol."""

    symbol: str
    step_size: Decimal
    min_qty: Decimal
    max_qty: Decimal
    min_notional: Decimal = Decimal(0)
