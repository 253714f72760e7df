"""The simulated Binance USD-M futures exchange: a synchronous state machine, no HTTP.

``Engine`` is put together from one part per file, each on top of the ones it names:

===============  ==============================================================================================
``records.py``   what the engine stores (Position, Order, Trade, Account, Mark) and the attributes every part reads
``fills.py``     executions: position, entry price, realised PnL and fee; resting orders the mark has crossed
``prices.py``    the seeded mark-price walk (a move fills the resting orders it crosses)
``accounts.py``  position mode, leverage, wallet, positions, cross margin, liquidation price
``book.py``      query, cancel, cancel all, and the order and trade lists
``orders.py``    new orders: Binance's checks in Binance's order, then filled at once or rested
===============  ==============================================================================================

``params.py`` (EngineError, parameter parsing, number formatting) and ``symbols.py`` (SymbolSpec, the default
and benchmark markets) serve all of them.

Reproduced Binance behaviours (codes and messages as Binance documents them): order validation and its error
precedence (``orders.py``); one-way and hedge position modes (``accounts.py``); entry price as the
quantity-weighted average on increase, a reduce realising PnL into the USDT wallet, crossing through zero closing,
realising and opening the remainder at the fill price (``fills.py``); the mark price walk (``prices.py``).

Deliberate simplifications:

* MARKET and LIMIT only (the conditional types live on Binance's algo-order API); exchangeInfo lists just these.
  IOC that does not cross expires, FOK that does not is -5021, crossing GTX is -5022, both unrecorded.
* No order book, slippage, funding or liquidation. Fees: ``fee_rate`` (default 0) of each fill's notional is
  charged to the wallet.
* Cross margin only, one leverage bracket per symbol; liquidationPrice uses Binance's single-position cross
  formula with that bracket.
* All public methods take one lock, so the HTTP thread and a test thread may use the engine together.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from decimal import Decimal

from quantum_trader.exchange.sim.book import Book
from quantum_trader.exchange.sim.orders import Orders
from quantum_trader.exchange.sim.params import ZERO, EngineError, Json
from quantum_trader.exchange.sim.records import Account, Mark, Order, Position, Trade
from quantum_trader.exchange.sim.symbols import DEFAULT_SYMBOLS, SymbolSpec, bench_symbols
from quantum_trader.exchange.sim.userdata import USER_EVENTS_KEPT, ListenKeys

# Imported from here by the app, the CLI, the benchmark and the tests.
__all__ = [
    "DEFAULT_SYMBOLS",
    "Engine",
    "EngineError",
    "Json",
    "Order",
    "Position",
    "SymbolSpec",
    "Trade",
    "bench_symbols",
]


class Engine(Orders, Book):
    """The exchange state. Every public method is atomic (one lock) and deterministic for (seed, clock)."""

    def __init__(
        self,
        symbols: Iterable[SymbolSpec] = DEFAULT_SYMBOLS,
        *,
        seed: int = 7,
        clock: Callable[[], float] = time.time,
        price_step_ms: int = 100,
        price_sigma: float = 0.0002,
        wallet: Decimal = Decimal("100000"),
        leverage: int = 20,
        fee_rate: Decimal = ZERO,
    ) -> None:
        if price_step_ms <= 0:
            raise ValueError("price_step_ms must be positive")
        self.specs = {spec.symbol: spec for spec in symbols}
        self.seed = seed
        self.clock = clock
        # The exchange's clock ahead of (+) or behind (-) the host's: lets tests skew time like a drifting NTP.
        self.clock_offset_ms = 0
        self.price_step_ms = price_step_ms
        self.price_sigma = price_sigma
        self.initial_wallet = wallet
        self.default_leverage = leverage
        self.fee_rate = fee_rate
        self._lock = threading.RLock()
        # Ids keep increasing across reset() so a client never sees one id name two orders.
        self._id_rng = random.Random(f"{seed}/ids")
        self._next_order_id = 4_000_000_000 + self._id_rng.randrange(1_000_000)
        self._next_trade_id = 300_000_000 + self._id_rng.randrange(1_000_000)
        self.listen_keys = ListenKeys()  # the account's user-data key (not reset: an account reset keeps it)
        self._user_event_listeners = []
        self._user_event_ms = 0
        self._reset_state()

    def _reset_state(self) -> None:
        now = self.now_ms()
        self.account = Account(wallet=self.initial_wallet, wallet_update_ms=now)
        self._marks = {}
        for spec in self.specs.values():
            self._marks[spec.symbol] = Mark(
                raw=float(spec.start_price),
                price=spec.start_price,
                step_index=now // self.price_step_ms,
                rng=random.Random(f"{self.seed}/{spec.symbol}"),
            )
        self._positions = {}
        self._orders = {}
        self._by_client_id = {}
        self._open = {symbol: {} for symbol in self.specs}
        self._trades = []
        self._user_events = deque(maxlen=USER_EVENTS_KEPT)
        self._user_event_count = 0

    def reset(self) -> None:
        """Back to the initial wallet, flat positions, no orders, start prices, one-way mode."""
        with self._lock:
            self.clock_offset_ms = 0
            self._reset_state()
