"""What the engine stores: ``Position``, ``Order``, ``Trade``, ``Account`` and the walk's ``Mark``, and
``EngineState``, the attributes every part of the engine reads (``Engine.__init__`` and ``reset`` set them)."""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from quantum_trader.exchange.sim.params import ZERO, EngineError, Json, require
from quantum_trader.exchange.sim.symbols import SymbolSpec

OPEN_STATUSES: Final = frozenset({"NEW", "PARTIALLY_FILLED"})


@dataclass(slots=True)
class Position:
    symbol: str
    position_side: str  # BOTH, LONG or SHORT
    amt: Decimal = ZERO  # signed: > 0 long, < 0 short
    entry_price: Decimal = ZERO
    update_ms: int = 0


@dataclass(slots=True)
class Order:
    order_id: int
    symbol: str
    client_order_id: str
    side: str
    type: str
    time_in_force: str
    position_side: str
    reduce_only: bool
    orig_qty: Decimal
    price: Decimal
    time_ms: int
    update_ms: int
    status: str = "NEW"
    executed_qty: Decimal = ZERO
    cum_quote: Decimal = ZERO

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def avg_price(self) -> Decimal:
        return self.cum_quote / self.executed_qty if self.executed_qty else ZERO

    @property
    def remaining(self) -> Decimal:
        return self.orig_qty - self.executed_qty


@dataclass(frozen=True, slots=True)
class Trade:
    trade_id: int
    order_id: int
    symbol: str
    side: str
    position_side: str
    price: Decimal
    qty: Decimal
    realized_pnl: Decimal
    commission: Decimal
    time_ms: int
    maker: bool


@dataclass(slots=True)
class Mark:
    raw: float  # unrounded walk state, so rounding never feeds back into the walk
    price: Decimal
    step_index: int
    rng: random.Random


@dataclass(slots=True)
class Account:
    wallet: Decimal
    wallet_update_ms: int
    dual: bool = False
    leverage: dict[str, int] = field(default_factory=dict)


class EngineState:
    """The engine's attributes, declared once for every part that reads them; ``Engine`` sets them."""

    specs: dict[str, SymbolSpec]
    seed: int
    clock: Callable[[], float]
    clock_offset_ms: int
    price_step_ms: int
    price_sigma: float
    initial_wallet: Decimal
    default_leverage: int
    fee_rate: Decimal
    _lock: threading.RLock
    _id_rng: random.Random
    _next_order_id: int
    _next_trade_id: int
    # Set back to the start by Engine.reset(); the ids above are not.
    account: Account
    _marks: dict[str, Mark]
    _positions: dict[tuple[str, str], Position]
    _orders: dict[int, Order]
    _by_client_id: dict[tuple[str, str], list[int]]
    _open: dict[str, dict[int, Order]]
    _trades: list[Trade]
    # the user-data stream's events (exchange/sim/userdata.py), numbered from 1 in the order they happened; the
    # newest USER_EVENTS_KEPT of them (a reader further behind has lost the stream and must resync from REST)
    _user_events: deque[tuple[int, Json]]
    _user_event_count: int
    _user_event_ms: int  # the newest event time given
    _user_event_listeners: list[Callable[[int, Json], None]]  # the stream's connections (not reset)

    @property
    def lock(self) -> threading.RLock:
        """Hold it to read several views as one consistent snapshot."""
        return self._lock

    def now_ms(self) -> int:
        # round, not truncate: 0.1 s steps of a float clock stay exact
        return round(self.clock() * 1000) + self.clock_offset_ms

    def spec(self, symbol: str) -> SymbolSpec:
        spec = self.specs.get(symbol)
        if spec is None:
            raise EngineError(-1121, "Invalid symbol.")
        return spec

    def symbol_param(self, params: Mapping[str, str]) -> SymbolSpec:
        return self.spec(require(params, "symbol"))
