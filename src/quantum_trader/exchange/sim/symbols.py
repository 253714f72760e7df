"""The simulated markets: ``SymbolSpec`` (one perpetual contract and its exchangeInfo filters), the default
markets and the synthetic ones of load runs."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Final

from quantum_trader.exchange.sim.params import ZERO, decimals_of, fmt

QUOTE_ASSET: Final = "USDT"


def floor_to_step(qty: Decimal, step: Decimal) -> Decimal:
    if qty <= 0:
        return ZERO
    return ((qty / step).to_integral_value(rounding=ROUND_DOWN) * step).quantize(step)


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """One perpetual contract and its exchangeInfo filters."""

    symbol: str
    base_asset: str
    step_size: Decimal
    min_qty: Decimal
    max_qty: Decimal  # LOT_SIZE (LIMIT orders)
    market_max_qty: Decimal  # MARKET_LOT_SIZE
    min_notional: Decimal
    start_price: Decimal
    tick_size: Decimal
    price_precision_override: int | None = None
    max_leverage: int = 75
    maint_margin_ratio: Decimal = Decimal("0.004")
    bracket_notional_cap: Decimal = Decimal("50000000")
    min_price: Decimal | None = None  # None: one tick
    max_price: Decimal = Decimal("10000000")
    multiplier_up: Decimal = Decimal("1.0500")
    multiplier_down: Decimal = Decimal("0.9500")
    max_num_orders: int = 200

    @property
    def quantity_precision(self) -> int:
        return decimals_of(self.step_size)

    @property
    def price_precision(self) -> int:
        if self.price_precision_override is not None:
            return self.price_precision_override
        return decimals_of(self.tick_size)

    @property
    def min_price_value(self) -> Decimal:
        return self.min_price if self.min_price is not None else self.tick_size

    def qty(self, value: Decimal) -> str:
        return fmt(value, self.quantity_precision)

    def price(self, value: Decimal) -> str:
        return fmt(value, self.price_precision)


def _spec(
    symbol: str,
    step: str,
    market_max: str,
    lot_max: str,
    notional: str,
    price: str,
    tick: str,
    *,
    price_precision: int | None = None,
    max_leverage: int = 75,
) -> SymbolSpec:
    return SymbolSpec(
        symbol=symbol,
        base_asset=symbol.removesuffix(QUOTE_ASSET),
        step_size=Decimal(step),
        min_qty=Decimal(step),
        max_qty=Decimal(lot_max),
        market_max_qty=Decimal(market_max),
        min_notional=Decimal(notional),
        start_price=Decimal(price),
        tick_size=Decimal(tick),
        price_precision_override=price_precision,
        max_leverage=max_leverage,
    )


DEFAULT_SYMBOLS: Final[tuple[SymbolSpec, ...]] = (
    # BTCUSDT really has pricePrecision 2 with a 0.10 tick; keep that quirk.
    _spec("BTCUSDT", "0.001", "120", "1000", "100", "60000", "0.10", price_precision=2, max_leverage=125),
    _spec("ETHUSDT", "0.001", "2000", "10000", "20", "3000", "0.01", max_leverage=125),
    _spec("SOLUSDT", "1", "5000", "1000000", "5", "150", "0.01"),
    _spec("BNBUSDT", "0.01", "1000", "100000", "5", "600", "0.01"),
    _spec("XRPUSDT", "0.1", "1000000", "10000000", "5", "0.6", "0.0001"),
)


def bench_symbols(count: int) -> tuple[SymbolSpec, ...]:
    """Synthetic markets for load runs (``qt bench``): one close per symbol is in flight at a time by design,
    so open-loop rates need many symbols. ``BENCH001USDT`` ...: price 10, step 1, min notional 5."""
    return tuple(
        _spec(f"BENCH{n:03d}USDT", "1", "1000000", "100000000", "5", "10", "0.001") for n in range(1, count + 1)
    )
