"""The Apply service: reads proposals as group ``apply`` and hands each to its own task (at most
``max_in_flight`` at once), next to the shared audit reader and the intent sweep."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import replace

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from quantum_trader.bus import keys
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.bus.streams import ensure_topology
from quantum_trader.clock import SYSTEM_CLOCK, Clock
from quantum_trader.domain.trust import StoreIdentity
from quantum_trader.exchange import sim_url_for
from quantum_trader.exchange.base import Exchange
from quantum_trader.exchange.binance import stream_base
from quantum_trader.exchange.userstream import ListenKeys, UserDataStream
from quantum_trader.secrets import permit_key
from quantum_trader.services.apply.clocks import ClockWatch
from quantum_trader.services.apply.handler import PlanHandler
from quantum_trader.services.apply.orders import OrderExecutor
from quantum_trader.services.apply.permit_waiter import PermitWaiter
from quantum_trader.services.apply.permits import PermitGate
from quantum_trader.services.apply.position_reads import PositionReads
from quantum_trader.services.apply.pushed_orders import PushedOrders
from quantum_trader.services.apply.results import ResultPublisher
from quantum_trader.services.apply.sweep import IntentSweeper
from quantum_trader.services.apply.truth import ExchangeTruth
from quantum_trader.services.consumer import STORE_ERRORS, Backoff, consume_group
from quantum_trader.services.metrics import ApplyMetrics, stream_metrics
from quantum_trader.services.service import Service
from quantum_trader.settings import Settings
from quantum_trader.tasks import cancel_and_wait


class ApplyService(Service):
    name = "apply"

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        exchange: Exchange,
        *,
        watch: StoreWatch,
        consumer: str = "",
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(settings, redis, consumer=consumer, clock=clock)
        if not watch.record_epoch:
            raise ValueError("Apply needs a StoreWatch that records the store's epoch (record_epoch=True)")
        self.exchange = exchange
        self.watch = watch
        self.metrics = ApplyMetrics(registry or CollectorRegistry())
        self.waiter = PermitWaiter(redis, self.log, on_read=watch.saw_audit)
        self.clocks = ClockWatch(redis, exchange, settings, self.consumer, self.metrics, clock, self.log)
        self.pushed: PushedOrders | None = None
        self.stream = self._user_stream(exchange)
        stream_metrics(self.metrics.registry, "qt_apply", lambda: self.stream.health if self.stream else None)
        executor = OrderExecutor(
            exchange,
            self.log,
            settings.apply.order_resolve_timeout_s,
            settings.exchange.late_execution_horizon_ms,
            clock,
            clocks=self.clocks.state,
            pushed=self.pushed,
        )
        guard = getattr(exchange, "guard", None)
        if guard is not None:
            self.metrics.exchange_banned.set_function(lambda: float(guard.banned_until_ms > exchange.now_ms()))
            self.metrics.exchange_weight.set_function(lambda: float(guard.used_weight))
            for limit in ("weight_1m", "orders_10s", "orders_1m"):
                self.metrics.exchange_limit_used.labels(limit).set_function(
                    functools.partial(lambda name: guard.used(exchange.now_ms())[name], limit)
                )
        wait_s = settings.apply.permit_wait_ms / 1000
        permit_keys = {"governor": permit_key(settings, "governor"), "p33": permit_key(settings, "p33")}
        self.handler = PlanHandler(
            settings,
            redis,
            self._scripts,
            waiter=self.waiter,
            gate=PermitGate(settings, redis, self._scripts, self.waiter, permit_keys, self.metrics, clock, self.log),
            truth=ExchangeTruth(
                watch, exchange, executor, self.metrics, clock, wait_s, settings.apply.failover_fence_s
            ),
            positions=PositionReads(
                exchange,
                redis,
                max_age_s=settings.apply.snapshot_max_age_s,
                clock=clock,
                metrics=self.metrics,
                log=self.log,
            ),
            executor=executor,
            publisher=ResultPublisher(self._scripts, self.metrics, clock),
            metrics=self.metrics,
            clock=clock,
            log=self.log,
        )
        self.sweeper = IntentSweeper(self.handler, self.log, clock)
        self._slots = asyncio.Semaphore(settings.apply.max_in_flight)
        self._active: dict[str, asyncio.Task[None]] = {}
        watch.subscribe(self._store_changed)  # last: a change already seen is delivered at once

    def _user_stream(self, exchange: Exchange) -> UserDataStream | None:
        """The user-data stream that resolves the chain's orders (services/apply/pushed_orders.py), unless push
        is off (``QT_STREAM__PUSH=false``: lookups only) or the exchange has no listen key. One symbol's mark
        price is its heartbeat (silence detection); Apply needs no other."""
        settings = self.settings
        if not settings.stream.push or not isinstance(exchange, ListenKeys):
            return None
        self.pushed = PushedOrders(self.log)
        base = stream_base(settings.exchange, sim_url_for(settings), settings.stream.url)
        return UserDataStream(exchange, base, self.pushed, settings.stream, sorted(settings.symbols)[:1])

    async def run(self) -> None:
        await self.until_store(lambda: ensure_topology(self.redis))
        await self.clocks.round()  # the peers' clocks are known before anything is planned
        reader = asyncio.create_task(self.waiter.run(), name="apply-audit-reader")
        sweeper = asyncio.create_task(self.sweeper.run(), name="apply-intent-sweeper")
        clocks = asyncio.create_task(self.clocks.run(), name="apply-clocks")
        loops = [reader, sweeper, clocks]
        if self.stream is not None:
            loops.append(asyncio.create_task(self.stream.run(), name="apply-user-stream"))
        try:
            await self.waiter.ready.wait()
            self.log.info("Apply started", consumer=self.consumer, permit_wait_ms=self.settings.apply.permit_wait_ms)
            await consume_group(
                self.redis,
                stream=keys.PROPOSAL_STREAM,
                group=keys.APPLY_GROUP,
                consumer=self.consumer,
                handle=self._dispatch,
                log=self.log,
                store_up=lambda up: self.metrics.store_up.set(1 if up else 0),
                failover=replace(
                    self.failover(keys.PROPOSAL_DLQ, min_idle_s=self.handler.handling_bound_s() + 15),
                    poisoned=self._dispatch_poisoned,
                ),
                service=self.name,
                count=64,
            )
        finally:
            await cancel_and_wait([*loops, *self._active.values()])
            if self.stream is not None:
                await self.stream.close()
            await self.handler.positions.aclose()

    def _store_changed(self, before: StoreIdentity | None, after: StoreIdentity, unsearched: bool) -> None:
        """A connection reached another store instance than before: plans published on the old one are looked
        up before they are sent, and the audit reader starts again at the new stream's end. While nobody has
        searched the exchange for orders the instance may have forgotten, this Apply does."""
        if unsearched:
            self.sweeper.search_needed()
        else:
            self.handler.truth.searched.set()
        if before is None or before == after:
            return
        self.metrics.store_changes.set(self.watch.changes)
        epoch = self.watch.epoch
        if epoch is not None and epoch.continued:
            self.log.warning(
                "the store restarted and lost nothing (its append-only file is fsynced on every write): its word "
                "stands for every plan, as before",
                run_id=after.run_id,
                previous_run_id=before.run_id,
                continued=epoch.continued,
            )
        else:
            self.log.warning(
                "the store is another instance than before (restart or failover): plans it cannot vouch for are "
                "looked up on the exchange",
                run_id=after.run_id,
                previous_run_id=before.run_id,
            )
        self.waiter.restart()

    async def _dispatch(self, entry_id: str, fields: dict[str, str]) -> None:
        self.watch.saw(entry_id)  # its witness that a store restart lost nothing it had read (CLAIM_EPOCH)
        await self._start(entry_id, lambda again: self.handler.handle_proposal(entry_id, fields, again=again))

    async def _dispatch_poisoned(self, entry_id: str, fields: dict[str, str]) -> None:
        await self._start(entry_id, lambda _: self.handler.finish_poisoned(entry_id, fields))

    async def _start(self, entry_id: str, step: Callable[[bool], Awaitable[None]]) -> None:
        """Handle one proposal concurrently; wait for a free slot first (backpressure)."""
        if entry_id in self._active:  # re-read after a reconnect while still being handled
            return
        await self._slots.acquire()
        task = asyncio.create_task(self._retrying(entry_id, step), name=f"proposal-{entry_id}")
        self._active[entry_id] = task
        self.metrics.in_flight.set(len(self._active))

        def done(_: asyncio.Task[None]) -> None:
            del self._active[entry_id]  # set before this task could end; one task per entry
            self._slots.release()
            self.metrics.in_flight.set(len(self._active))

        task.add_done_callback(done)

    async def _retrying(self, entry_id: str, step: Callable[[bool], Awaitable[None]]) -> None:
        """Handling before the send is idempotent (every step checks its marker), so a store outage there just
        means: again (told so: the store may be another instance now). (After the send only the result's
        publication is retried: results.py.)"""
        backoff = Backoff()
        again = False
        while True:
            try:
                await step(again)
                return
            except STORE_ERRORS as exc:
                self.log.warning("store unavailable mid-plan, retrying", entry_id=entry_id, error=str(exc))
                again = True
                await backoff.wait()
            except Exception:
                self.log.exception("unexpected error; proposal left pending", entry_id=entry_id)
                return
