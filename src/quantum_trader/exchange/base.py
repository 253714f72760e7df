"""What the services need from an exchange, as plain data and three kinds of failure.

The kinds matter more than the messages: a *rejection* is definitive (no order exists), an *unknown outcome*
means the order may or may not exist and must be resolved by querying, never by resending.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, runtime_checkable

from quantum_trader.domain.clocks import ClockReading
from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.exchange.throttle import Purpose


@dataclass(frozen=True, slots=True)
class PositionInfo:
    symbol: str
    amt: Decimal  # signed: negative is short
    entry_price: Decimal
    mark_price: Decimal
    update_time_ms: int = 0


@dataclass(frozen=True, slots=True)
class OrderReport:
    order_id: str
    client_order_id: str
    status: str  # Binance order status: NEW, PARTIALLY_FILLED, FILLED, CANCELED, EXPIRED, ...
    executed_qty: Decimal
    avg_price: Decimal
    side: str = ""  # BUY / SELL
    update_time_ms: int = 0  # the exchange's time of the order's last change (its fill), 0 when not given

    @property
    def filled(self) -> bool:
        return self.executed_qty > 0


class ExchangeError(Exception):
    """Base of every exchange failure. ``code`` is Binance's (0 when there is none)."""

    def __init__(self, message: str, code: int = 0, signed_at_ms: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # for an order request that left: the timestamp it carried (exchange clock), which bounds when it can
        # still execute (domain/execution.py); None when it never left or the call was not an order
        self.signed_at_ms = signed_at_ms


class ExchangeRejected(ExchangeError):
    """The exchange definitively refused the request; nothing was done."""


class OutcomeUnknown(ExchangeError):
    """The request may or may not have taken effect (timeout, 5xx, -1007, -1001, unreadable reply)."""


class ExchangeUnavailable(ExchangeError):
    """A read failed; nothing was changed by it. Retry later."""


class NotSent(ExchangeError):
    """Not sent: the caller's deadline (the plan's permit window) passed before the request could leave."""


class Throttled(ExchangeError):
    """Not sent: the exchange's rate limits leave no room before the caller's deadline."""


class ExchangeBanned(ExchangeError):
    """Not sent: the exchange banned this IP (HTTP 418). Trading stops until the ban ends."""


@runtime_checkable
class OrderBudget(Protocol):
    """An exchange client that can tell, before a plan is made, whether its order could leave in time."""

    def order_room(self, deadline_ms: float) -> str:
        """ "" when an order could leave before ``deadline_ms`` (exchange clock), else why not and until when.
        Raises ExchangeBanned while the exchange bans this IP."""
        ...


class Exchange(Protocol):
    """The exchange as the services use it. ``binance.BinanceFutures`` is the implementation for every mode."""

    async def positions(self, symbols: list[str], purpose: Purpose = "poll") -> dict[str, PositionInfo]: ...

    async def filters(self) -> dict[str, SymbolFilters]: ...

    async def place_reduce_only_market(
        self, symbol: str, side: str, qty: Decimal, client_order_id: str, deadline_ms: float | None = None
    ) -> OrderReport: ...

    async def query_order(self, symbol: str, client_order_id: str) -> OrderReport | None: ...

    async def orders_since(self, symbol: str, since_ms: float) -> list[OrderReport]: ...

    def now_ms(self) -> float: ...

    async def sync_time(self) -> float:
        """Measure the offset to the exchange clock again; returns it (local minus exchange, ms)."""
        ...

    def clock_reading(self) -> ClockReading | None:
        """The last measurement of the exchange clock with its error bound (None: never measured)."""
        ...

    @property
    def order_recv_window_ms(self) -> int: ...

    async def close(self) -> None: ...
