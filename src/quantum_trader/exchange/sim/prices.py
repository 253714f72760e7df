"""Mark prices: a seeded geometric random walk advanced lazily in ``price_step_ms`` steps of the injected clock,
rounded to the tick. The walk is a function of (seed, symbol, elapsed steps) only, never of how often it is
read. Admin can set a price; the walk continues from there. A move that crosses resting LIMIT orders fills them.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from typing import Final

from quantum_trader.exchange.sim.fills import Fills
from quantum_trader.exchange.sim.params import ONE
from quantum_trader.exchange.sim.records import Mark
from quantum_trader.exchange.sim.symbols import SymbolSpec

# A walk longer than this many steps is finished with one aggregated draw (keeps a clock jump cheap).
_MAX_WALK_STEPS: Final = 200_000


class Prices(Fills):
    """The engine's mark prices (on top of its fills: a price move matches resting orders)."""

    def mark_price(self, symbol: str) -> Decimal:
        """The current mark price, advancing the seeded walk to the clock first."""
        with self._lock:
            return self._mark(self.spec(symbol))

    def set_mark_price(self, symbol: str, price: Decimal) -> None:
        with self._lock:
            spec = self.spec(symbol)
            if price <= 0:
                raise ValueError("price must be positive")
            mark = self._marks[symbol]
            self._advance(spec, mark)  # consume elapsed steps so the walk restarts from this price now
            mark.raw = float(price)
            mark.price = self._round_to_tick(spec, price)
            self._match_resting(spec, mark.price)

    def _round_to_tick(self, spec: SymbolSpec, price: Decimal) -> Decimal:
        ticks = (price / spec.tick_size).to_integral_value(rounding=ROUND_HALF_UP)
        return max(ticks, ONE) * spec.tick_size

    def _advance(self, spec: SymbolSpec, mark: Mark) -> bool:
        index = self.now_ms() // self.price_step_ms
        steps = index - mark.step_index
        if steps <= 0:
            return False
        mark.step_index = index
        if self.price_sigma <= 0:
            return False
        sigma, gauss, raw = self.price_sigma, mark.rng.gauss, mark.raw
        for _ in range(min(steps, _MAX_WALK_STEPS)):
            raw *= math.exp(sigma * gauss(0.0, 1.0))
        if steps > _MAX_WALK_STEPS:
            raw *= math.exp(sigma * math.sqrt(steps - _MAX_WALK_STEPS) * gauss(0.0, 1.0))
        mark.raw = raw
        new_price = self._round_to_tick(spec, Decimal(repr(raw)))
        changed = new_price != mark.price
        mark.price = new_price
        return changed

    def _mark(self, spec: SymbolSpec) -> Decimal:
        mark = self._marks[spec.symbol]
        if self._advance(spec, mark) and self._open[spec.symbol]:
            self._match_resting(spec, mark.price)
        return mark.price

    def prices(self) -> dict[str, Decimal]:
        with self._lock:
            return {symbol: self._mark(spec) for symbol, spec in self.specs.items()}
