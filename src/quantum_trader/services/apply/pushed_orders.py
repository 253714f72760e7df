"""Apply's side of the user-data stream (exchange/userstream.py): the chain's orders as the exchange reports them.

Every ``ORDER_TRADE_UPDATE`` of an order of the chain (client id ``qt-<plan_id>``) is kept by client id, the
latest state only (the stream's order rule passes each change at most once and never an older one). An order
whose outcome is being established (services/apply/orders.py: an unclear send, an acknowledged but not final
order, a plan the store cannot vouch for) is resolved as soon as the stream shows it in a final state: the
wait between two lookups ends at its event, and no lookup is sent once it is final. What the stream cannot
prove is still proven by REST: an order the stream has not shown is looked up as before, and only a lookup
(with the recvWindow rule) proves an order absent. A session that is down or not resynced misses events; the
lookups cover them (nothing waits on the stream alone).

The stream also carries every position change and the mark prices; Apply subscribes to one symbol's mark only,
as the heartbeat that tells a silent connection from a quiet account.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

from quantum_trader.domain.execution import is_final
from quantum_trader.exchange.base import OrderReport
from quantum_trader.exchange.stream_events import OrderTradeUpdate, StreamEvent

CHAIN_PREFIX: Final = "qt-"  # the chain's own orders (break-glass closes, qtbg-, are not followed here)
ORDERS_KEPT: Final = 10_000  # the latest states kept: far more than the orders in flight at any time


class PushedOrders:
    """The stream's owner in Apply (``StreamOwner``)."""

    def __init__(self, log: Any, kept: int = ORDERS_KEPT) -> None:
        self.log = log
        self._kept = kept
        self._reports: OrderedDict[str, OrderReport] = OrderedDict()
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}
        self.events = 0  # the chain's order updates taken from the stream

    async def resync(self) -> Mapping[str, int]:
        """Nothing to read: Apply keeps no positions, and an order whose event a down stream missed is found by
        its lookups, which never stop while its outcome is open."""
        return {}

    async def on_event(self, event: StreamEvent, received_at: float) -> None:
        if not isinstance(event, OrderTradeUpdate) or not event.o.c.startswith(CHAIN_PREFIX):
            return
        o = event.o
        report = OrderReport(
            order_id=str(o.i),
            client_order_id=o.c,
            status=o.X,
            executed_qty=o.z,
            avg_price=o.ap,
            side=o.S,
            update_time_ms=o.T,
        )
        self._reports[o.c] = report
        self._reports.move_to_end(o.c)
        while len(self._reports) > self._kept:
            self._reports.popitem(last=False)
        self.events += 1
        for waiter in self._waiting.pop(o.c, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def on_bad_frame(self, reason: str) -> None:
        self.log.error("unreadable user-data frame; passed over", error=reason)

    def seen(self, client_order_id: str) -> OrderReport | None:
        """The order's latest state the stream has shown (any state), or None: it exists if not None."""
        return self._reports.get(client_order_id)

    def final(self, client_order_id: str) -> OrderReport | None:
        """The order's final state (filled, cancelled, expired) if the stream has shown it."""
        report = self._reports.get(client_order_id)
        return report if report is not None and is_final(report.status) else None

    async def wait(self, client_order_id: str, timeout_s: float) -> None:
        """Until the stream shows a change of that order, or ``timeout_s`` passes (the caller looks again)."""
        if timeout_s <= 0:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiting.setdefault(client_order_id, set())
        waiters.add(waiter)
        try:
            # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation that comes as it completes
            await asyncio.wait({waiter}, timeout=timeout_s)
        finally:
            waiter.cancel()
            waiters.discard(waiter)
            if not waiters and self._waiting.get(client_order_id) is waiters:
                del self._waiting[client_order_id]
