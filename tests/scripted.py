"""A scripted exchange at the ``Exchange`` interface, for the order path's own rules (the executor's in
tests/unit/test_executor.py, Apply's parts through tests/integration/apply_rig.py).

Every send and lookup is answered with the next scripted answer, given at the exchange-clock time it is
scripted for; a send or a lookup nobody scripted fails the test (it is an order or a lookup too many).
Position reads and order searches answer from ``held`` and ``history``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from quantum_trader.domain.clocks import ClockReading
from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.exchange.base import ExchangeError, OrderReport, PositionInfo

T0 = 1_800_000_000_000.0  # exchange clock (ms) when the first request is signed
RECV_MS = 1000

Answer = OrderReport | ExchangeError | None  # a report, "no such order" (lookups only), or a failure


@dataclass(frozen=True, slots=True)
class At:
    """``answer``, given when the exchange clock reads ``ms`` (None: as it reads now); the monotonic clock moves
    ``mono_s`` on first (past the resolve deadline, for a lookup that fails or finds the order still open)."""

    answer: Answer
    ms: float | None = None
    mono_s: float = 0.0


class ScriptClock(Protocol):
    """What the scripted exchange reads and moves: the wall clock, and the monotonic one (``mono_s``)."""

    mono_s: float

    def wall(self) -> float: ...


class FakeClock:
    def __init__(self) -> None:
        self.wall_s = T0 / 1000
        self.mono_s = 100.0

    def wall(self) -> float:
        return self.wall_s

    def mono(self) -> float:
        return self.mono_s


@dataclass
class Call:
    kind: str  # "place" or "query"
    at_ms: float  # the exchange clock when it was answered
    client_order_id: str
    deadline_ms: float | None = None
    symbol: str = ""
    side: str = ""  # sends only
    qty: Decimal | None = None  # sends only
    mono_s: float = 0.0  # the monotonic clock when it was answered


@dataclass
class ScriptedExchange:
    """The ``Exchange`` protocol, answering each send and lookup with the next scripted answer."""

    clock: ScriptClock
    places: list[At]
    lookups: list[At] = field(default_factory=list)
    ms: float | None = T0  # the exchange clock; None: it follows the clock's wall time (until scripted)
    recv_window_ms: int = RECV_MS
    calls: list[Call] = field(default_factory=list)
    held: dict[str, Decimal] | Exception | None = None  # what a position read answers (None: none expected)
    history: dict[str, list[OrderReport] | ExchangeError] | None = None  # per symbol, what a search finds
    position_reads: list[list[str]] = field(default_factory=list)
    searches: list[tuple[str, float]] = field(default_factory=list)  # (symbol, since_ms) per search
    during_position_read: Callable[[], Awaitable[None]] | None = None  # what "happens meanwhile" (a race)
    on_lookup: Callable[[], None] | None = None  # called as each lookup arrives (to see the caller mid-call)
    on_search: Callable[[], None] | None = None  # called as each search arrives (what happens meanwhile)
    clock_error_ms: float = 0.0  # the error of each reading of the exchange clock (half the round trip)
    syncs: list[float] = field(default_factory=list)  # the exchange clock at each measurement of it
    sync_failure: ExchangeError | None = None  # what a measurement raises (None: it succeeds)

    def _next(self, script: list[At], what: str) -> Answer:
        if not script:
            raise AssertionError(f"unscripted {what}: the executor did one more than it may")
        step = script.pop(0)
        if step.ms is not None:
            self.ms = step.ms
        self.clock.mono_s += step.mono_s
        return step.answer

    async def place_reduce_only_market(
        self, symbol: str, side: str, qty: Decimal, client_order_id: str, deadline_ms: float | None = None
    ) -> OrderReport:
        answer = self._next(self.places, "send")
        self.calls.append(
            Call("place", self.now_ms(), client_order_id, deadline_ms, symbol, side, qty, self.clock.mono_s)
        )
        if isinstance(answer, ExchangeError):
            raise answer
        assert answer is not None, "a send answers with a report or fails"
        return answer

    async def query_order(self, symbol: str, client_order_id: str) -> OrderReport | None:
        if self.on_lookup is not None:
            self.on_lookup()
        answer = self._next(self.lookups, "lookup")
        self.calls.append(Call("query", self.now_ms(), client_order_id, symbol=symbol, mono_s=self.clock.mono_s))
        if isinstance(answer, ExchangeError):
            raise answer
        return answer

    def now_ms(self) -> float:
        return self.ms if self.ms is not None else self.clock.wall() * 1000

    async def sync_time(self) -> float:
        if self.sync_failure is not None:
            raise self.sync_failure
        self.syncs.append(self.now_ms())
        return self.clock.wall() * 1000 - self.now_ms()

    def clock_reading(self) -> ClockReading | None:
        return ClockReading(self.clock.wall() * 1000 - self.now_ms(), self.clock_error_ms, self.clock.wall())

    @property
    def order_recv_window_ms(self) -> int:
        return self.recv_window_ms

    @property
    def sends(self) -> int:
        return sum(call.kind == "place" for call in self.calls)

    @property
    def queries(self) -> int:
        return sum(call.kind == "query" for call in self.calls)

    def kinds(self) -> list[str]:
        return [call.kind for call in self.calls]

    async def positions(self, symbols: list[str], purpose: str = "poll") -> dict[str, PositionInfo]:
        """The scripted positions (``held``) of the symbols asked for; None: a read nobody expected."""
        self.position_reads.append(list(symbols))
        if self.during_position_read is not None:
            await self.during_position_read()
        if self.held is None:
            raise AssertionError("unscripted position read")
        if isinstance(self.held, Exception):
            raise self.held
        return {s: PositionInfo(s, amt, Decimal(100), Decimal(100)) for s, amt in self.held.items() if s in symbols}

    async def filters(self) -> dict[str, SymbolFilters]:
        raise AssertionError("the order path reads no filters")

    async def orders_since(self, symbol: str, since_ms: float) -> list[OrderReport]:
        """The scripted search (``history``: per symbol, its orders or a failure); None: nobody expected one."""
        self.searches.append((symbol, since_ms))
        if self.on_search is not None:
            self.on_search()
        if self.history is None:
            raise AssertionError("unscripted order search")
        found = self.history.get(symbol, [])
        if isinstance(found, ExchangeError):
            raise found
        return list(found)

    async def close(self) -> None:
        return None


class RecordingLog:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, object]]] = []

    def warning(self, message: str, /, **fields: object) -> None:
        self.warnings.append((message, fields))

    def fields(self) -> list[dict[str, object]]:
        return [fields for _, fields in self.warnings]
