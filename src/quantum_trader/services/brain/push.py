"""P3.3's side of the user-data stream (exchange/userstream.py): positions and mark prices pushed into the
snapshots within milliseconds of the exchange's event, and changes the chain did not make recorded as drift.

- ``ACCOUNT_UPDATE``: each managed symbol's new position is its snapshot at once; growth made outside the
  chain is adopted as by the poll (docs/design-notes.md), and a change no plan of the chain explains is a
  ``drift`` line on ``quantum:stream:ledger.audit`` (written once for the account, whichever P3.3 instance
  sees it first). Explained means: the update is an ``ORDER`` one and a fill of an order of the chain
  (client id ``qt-…``) on that symbol at the same transaction time came with it (before it, or within
  ``DRIFT_GRACE_S`` after: Binance's order of the two is not documented). An update that moves no amount
  (a funding fee, a margin change) is not drift.
- ``markPriceUpdate``: the snapshot's mark price (the Governor's max notional reads it), and its ``ts``: a
  snapshot's ``ts`` is when it was last *known true*: the stream was healthy and had delivered everything up
  to a frame of that symbol received then. Quiet symbols stay fresh by their mark ticks, every second; a stream
  that stops being healthy stops moving them, and the 10 s staleness rule denies what is really unknown.
- A frame that is no event: a ``stream_bad_frame`` line on ``quantum:stream:service.events`` (and the
  journal), and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Final

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.clock import Clock
from quantum_trader.exchange.stream_events import AccountUpdate, MarkPriceUpdate, OrderTradeUpdate, StreamEvent
from quantum_trader.services.brain.ledger import ledgers_and_marks
from quantum_trader.services.brain.snapshots import SnapshotPoller
from quantum_trader.services.consumer import STORE_ERRORS
from quantum_trader.services.metrics import BrainMetrics
from quantum_trader.tasks import cancel_and_wait

CHAIN_PREFIX: Final = "qt-"  # the chain's own orders: qt-<plan_id> (break-glass closes are qtbg-: outside it)
FILLS: Final = frozenset({"TRADE", "CALCULATED"})  # CALCULATED: a liquidation's fill
TRADES_KEPT: Final = 1000
REASON_MAX: Final = 500
# how long an ORDER update waits for the fill that explains it (Binance may send the update first)
DRIFT_GRACE_S: Final = 1.0


class PushedPositions:
    """The stream's owner in P3.3 (``StreamOwner``)."""

    def __init__(
        self,
        snapshots: SnapshotPoller,
        redis: aioredis.Redis,
        metrics: BrainMetrics,
        log: Any,
        clock: Clock,
        audit_maxlen: int,
        record: Callable[[str, Mapping[str, Any], str], object],
        consumer: str,
    ) -> None:
        self.snapshots = snapshots
        self.redis = redis
        self.metrics = metrics
        self.log = log
        self._clock = clock
        self._audit_maxlen = audit_maxlen
        self._record = record  # the journal's append: every line written to the store, on this host too
        self._consumer = consumer
        self._managed = frozenset(snapshots.symbols)
        # (symbol, transaction ms) -> client ids of the fills seen at that moment
        self._fills: OrderedDict[tuple[str, int], set[str]] = OrderedDict()
        self._judging: set[asyncio.Future[None]] = set()  # drift waiting for its grace, held until done

    async def resync(self) -> Mapping[str, int]:
        return await self.snapshots.resync()

    async def on_event(self, event: StreamEvent, received_at: float) -> None:
        if isinstance(event, MarkPriceUpdate):
            if event.s in self._managed:
                await self.snapshots.pushed_mark(event.s, event.p, received_at)
        elif isinstance(event, OrderTradeUpdate):
            if event.o.x in FILLS:
                self._fill(event.o.s, event.o.T, event.o.c)
        elif isinstance(event, AccountUpdate):
            await self._account(event, received_at)

    def _fill(self, symbol: str, transaction_ms: int, client_id: str) -> None:
        self._fills.setdefault((symbol, transaction_ms), set()).add(client_id)
        self._fills.move_to_end((symbol, transaction_ms))
        while len(self._fills) > TRADES_KEPT:
            self._fills.popitem(last=False)

    def explained(self, symbol: str, event: AccountUpdate) -> bool:
        """An ``ORDER`` update with a fill of one of the chain's orders on ``symbol`` at its transaction time."""
        clients = self._fills.get((symbol, event.T), set())
        return event.a.m == "ORDER" and any(client.startswith(CHAIN_PREFIX) for client in clients)

    async def _account(self, event: AccountUpdate, received_at: float) -> None:
        for change in event.a.P:
            if change.s not in self._managed or change.ps != "BOTH":
                continue
            was = self.snapshots.known(change.s)
            moved = was is None or was.amt != change.pa  # a funding fee or a margin change moves no amount
            _, before = await ledgers_and_marks(self.redis, [change.s])  # read before the write, as the poll
            position = await self.snapshots.pushed_position(
                change.s, change.pa, change.ep, event.T, (event.T, event.E), received_at
            )
            if position is not None:
                self.metrics.pushed_positions.inc()
                # the millisecond before the transaction: another fill of that millisecond may not be in it
                await self.snapshots.follow_outside(
                    change.s, position, before[change.s], received_at, event.T - 1, pushed=True
                )
            if moved and event.a.m != "FUNDING_FEE":
                ledger, _ = before[change.s]
                self._judge(change.s, str(change.pa), event, ledger.last_known_amt if ledger is not None else None)

    def _judge(self, symbol: str, amt: str, event: AccountUpdate, ledger_amt: Decimal | None) -> None:
        """Drift, unless a fill of the chain's explains the change. Binance may send the update before the fill's
        ``ORDER_TRADE_UPDATE`` (their order is not documented): an ``ORDER`` update not explained yet is judged
        again ``DRIFT_GRACE_S`` later, in a task of its own (the stream goes on meanwhile)."""
        if self.explained(symbol, event):
            return
        task = asyncio.ensure_future(self._drift_unless_explained(symbol, amt, event, ledger_amt))
        self._judging.add(task)
        task.add_done_callback(self._judging.discard)

    async def _drift_unless_explained(self, symbol: str, amt: str, event: AccountUpdate, ledger_amt: Any) -> None:
        try:
            if event.a.m == "ORDER":
                await asyncio.sleep(DRIFT_GRACE_S)
                if self.explained(symbol, event):
                    return
            await self._drift(symbol, amt, event, ledger_amt)
        except STORE_ERRORS as exc:
            self.log.warning("could not record drift: store unavailable", symbol=symbol, error=str(exc))
        except Exception:  # a bug: logged, never lost in a task nobody awaits
            self.log.exception("recording drift failed unexpectedly", symbol=symbol)

    async def _drift(self, symbol: str, amt: str, event: AccountUpdate, ledger_amt: Any) -> None:
        """One ``drift`` line for the change, for the whole account (the first instance to claim it writes it;
        a claim whose line could not be written is given back)."""
        claim = keys.p33_drift_seen(symbol, event.T, event.E)
        if not await self.redis.set(claim, "1", nx=True, ex=keys.PLAN_BOOKKEEPING_TTL_S):
            return
        clients = sorted(self._fills.get((symbol, event.T), set()))
        fields = {
            "symbol": symbol,
            "before": str(ledger_amt) if ledger_amt is not None else "none",
            "after": str(ledger_amt) if ledger_amt is not None else "none",  # the rule decides (adopt line)
            "source": "drift",
            "plan_id": "",
            "at": repr(self._clock.wall()),
            "exchange_amt": amt,
            "exchange_reason": event.a.m,
            "client_order_ids": ",".join(clients),
            "exchange_time_ms": str(event.T),
        }
        try:
            entry_id = await self.redis.xadd(
                keys.LEDGER_AUDIT_STREAM, fields, maxlen=self._audit_maxlen, approximate=True
            )
        except BaseException:
            with contextlib.suppress(*STORE_ERRORS):
                await self.redis.delete(claim)
            raise
        self._record(keys.LEDGER_AUDIT_STREAM, fields, str(entry_id))
        self.metrics.drift_events.labels(event.a.m).inc()
        self.log.warning(
            f"{symbol}: the exchange position changed outside the chain ({event.a.m})",
            exchange_amt=amt,
            ledger=fields["before"],
            client_order_ids=fields["client_order_ids"] or "none",
        )

    async def close(self) -> None:
        """Stop judging (drift lines still waiting for their grace are not written: the next resync's poll
        and the ledger rule cover the position)."""
        await cancel_and_wait(list(self._judging))

    async def on_bad_frame(self, reason: str) -> None:
        fields = {
            "service": "brain",
            "consumer": self._consumer,
            "event": "stream_bad_frame",
            "reason": reason[:REASON_MAX],
            "at": repr(time.time()),
        }
        entry_id = await self.redis.xadd(
            keys.SERVICE_EVENTS_STREAM, fields, maxlen=keys.SERVICE_EVENTS_MAXLEN, approximate=True
        )
        self._record(keys.SERVICE_EVENTS_STREAM, fields, str(entry_id))
