"""Run one service as a process: settings, logging, store, exchange, metrics, heartbeat, signals.

The service classes stay free of process concerns so tests can run several of them in one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from quantum_trader import __version__, logs
from quantum_trader.bus import keys
from quantum_trader.bus.connection import StoreNotReady, connect, redact, resolve_redis_url
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.bus.streams import GROUPS, group_backlog
from quantum_trader.exchange import open_exchange, sim_url_for
from quantum_trader.exchange.base import ExchangeError
from quantum_trader.exchange.check import HEDGE_HELP, MAX_SKEW_MS
from quantum_trader.exchange.userstream import UserDataStream
from quantum_trader.services.consumer import STORE_ERRORS, Backoff, consumer_name
from quantum_trader.services.metrics import build_info, serve_metrics
from quantum_trader.settings import Settings
from quantum_trader.tasks import cancel_and_wait

ServiceKind = Literal["apply", "governor", "brain"]


class LoopClock:
    """When the service's event loop last ran its ticker: a loop stuck for longer than a few ticks (a blocking
    call, a busy loop) makes ``/healthz`` fail, so a supervisor can restart the process."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def tick(self) -> None:
        self.at = time.monotonic()

    def alive(self) -> tuple[bool, str]:
        idle = time.monotonic() - self.at
        return idle < 5 * keys.HEARTBEAT_INTERVAL_S, f"event loop last ticked {idle:.1f} s ago"


LOOP = LoopClock()


async def tick_forever(clock: LoopClock) -> None:
    """Tick without any I/O: a store that stalls must not look like a stuck event loop."""
    while True:
        clock.tick()
        await asyncio.sleep(keys.HEARTBEAT_INTERVAL_S / 2)


STORE_UP_METRIC = {"apply": "qt_apply_store_up", "governor": "qt_governor_store_up", "brain": "p33_store_up"}


def readiness(kind: str, ready: asyncio.Event, registry: Any) -> tuple[bool, str]:
    """Ready = deciding: connected to the store, and (P3.3) its ledger reconciled."""
    if not ready.is_set():
        return False, "reconciling the ledger with the exchange"
    if registry.get_sample_value(STORE_UP_METRIC[kind]) != 1:
        return False, "the store is not answering (deciding nothing meanwhile)"
    return True, "deciding"


async def heartbeat(
    redis: aioredis.Redis,
    service: str,
    consumer: str,
    ready: asyncio.Event,
    metrics: Any,
    stream: UserDataStream | None = None,
) -> None:
    """Keep ``quantum:health:<service>:<consumer>`` alive while the process runs: ready once serving, the lag
    and pending count of its consumer groups (also exported as metrics), and its user-data stream's health."""
    key = keys.health(service, consumer)
    started = time.time()
    while True:
        try:
            lag = pending = 0
            for group_stream, group in GROUPS[service]:
                group_lag, group_pending = await group_backlog(redis, group_stream, group)
                metrics.consumer_lag.labels(group).set(group_lag)
                metrics.consumer_pending.labels(group).set(group_pending)
                lag, pending = lag + group_lag, pending + group_pending
            await redis.hset(
                key,
                mapping={
                    "pid": os.getpid(),
                    "ready": "1" if ready.is_set() else "0",
                    "started_at": repr(started),
                    "updated_at": repr(time.time()),
                    "version": __version__,
                    "lag": lag,
                    "pending": pending,
                    **stream_fields(stream),
                },
            )
            await redis.expire(key, keys.HEARTBEAT_TTL_S)
        except STORE_ERRORS:
            pass  # the service's own loops report the outage
        except RedisError as exc:  # never let the heartbeat die silently: a dead one looks like a dead service
            logs.get(service).warning("heartbeat failed", error=str(exc))
        await asyncio.sleep(keys.HEARTBEAT_INTERVAL_S)


def stream_fields(stream: UserDataStream | None) -> dict[str, str]:
    """The stream's health for the heartbeat (``qt status``, the dashboard): ``stream`` is ``off`` (push off, or
    a service without one), ``healthy`` (connected and resynced) or ``down``."""
    if stream is None:
        return {"stream": "off"}
    health = stream.health
    last = health.last_event_at or health.last_frame_at
    return {
        "stream": "healthy" if health.healthy else "down",
        "stream_sessions": str(health.sessions),
        "stream_reconnects": str(health.reconnects),
        "stream_renewals": str(health.renewals),
        "stream_resyncs": str(health.resyncs),
        "stream_last_event_age_s": repr(round(time.time() - last, 1)) if last else "",
        "stream_error": health.last_error[:200],
    }


async def service_event(redis: aioredis.Redis, kind: str, consumer: str, event: str) -> None:
    """A start or clean stop in ``quantum:stream:service.events`` (a start without a stop before it is a
    crash or a kill); `qt report` counts them."""
    fields = {
        "service": kind,
        "consumer": consumer,
        "event": event,
        "pid": str(os.getpid()),
        "version": __version__,
        "at": repr(time.time()),
    }
    try:
        await redis.xadd(keys.SERVICE_EVENTS_STREAM, fields, maxlen=keys.SERVICE_EVENTS_MAXLEN, approximate=True)
    except (RedisError, *STORE_ERRORS) as exc:  # a bookkeeping line never stops a service (e.g. an older ACL)
        logs.get(kind).warning("could not record the service event (run `qt acl` again?)", what=event, error=str(exc))


async def serve(kind: ServiceKind, settings: Settings) -> None:
    log = logs.get(kind)
    url = resolve_redis_url(settings)
    # Apply must know which store instance it talks to (its trust in the store's records rests on it); P3.3
    # reconciles its ledger when the instance changes.
    watch = StoreWatch(record_epoch=kind == "apply") if kind in ("apply", "brain") else None
    redis = await connect_when_ready(url, watch, log)
    exchange = None
    try:
        if kind in ("apply", "brain"):
            exchange = open_exchange(settings)
            where = sim_url_for(settings) if settings.exchange.mode == "sim" else settings.exchange.mode
            try:
                skew = await exchange.sync_time()
                hedge = await exchange.dual_side_position()
            except ExchangeError as exc:
                raise ExchangeError(f"cannot use the exchange ({where}): {exc.message}", exc.code) from None
            if hedge:
                raise ExchangeError(f"refusing to start on {where}: {HEDGE_HELP}")
            if abs(skew) > MAX_SKEW_MS:
                log.warning("clock skew to the exchange is large; compensating, but fix time sync", skew_ms=skew)
        service = _build(kind, settings, redis, exchange, watch)
        consumer = consumer_name(settings.consumer_name, "p33" if kind == "brain" else kind)
        ready = getattr(service, "ready", None) or asyncio.Event()
        if kind != "brain":
            ready.set()
        port = getattr(settings, kind).metrics_port
        registry = service.metrics.registry
        build_info(registry, kind)
        serve_metrics(registry, port, alive=LOOP.alive, ready=functools.partial(readiness, kind, ready, registry))
        log.info(f"{kind} connected", store=redact(url), metrics_port=port or "off", mode=settings.exchange.mode)
        stream = getattr(service, "stream", None)
        beat = asyncio.create_task(heartbeat(redis, kind, consumer, ready, service.metrics, stream))
        ticker = asyncio.create_task(tick_forever(LOOP))
        syncer = asyncio.create_task(service.journal.sync_forever())
        await service_event(redis, kind, consumer, "started")
        try:
            await service.run()
        finally:
            await cancel_and_wait([beat, ticker, syncer])  # ended here: asyncio.run's teardown waits without a bound
            service.journal.close()
            with contextlib.suppress(RedisError, *STORE_ERRORS):
                await redis.delete(keys.health(kind, consumer))
            await service_event(redis, kind, consumer, "stopped")
    finally:
        if exchange is not None:
            await exchange.close()
        await redis.aclose()


async def connect_when_ready(url: str, watch: StoreWatch | None, log: Any) -> aioredis.Redis:
    """The store client, once the store can serve. A store that answers but cannot serve yet (loading, a
    replica, refusing writes until its replicas catch up) is waited for: restarting would change nothing.
    One that does not answer, or refuses this account, is an error to fix: StoreUnavailable, exit 1."""
    backoff = Backoff(max_s=5.0)
    while True:
        try:
            return await connect(url, watch)
        except StoreNotReady as exc:
            log.warning("the store cannot serve yet; waiting for it", error=str(exc), retry_in_s=backoff.delay)
            await backoff.wait()


def _build(kind: ServiceKind, settings: Settings, redis: aioredis.Redis, exchange: Any, watch: Any) -> Any:
    if kind == "apply":
        from quantum_trader.services.apply import ApplyService

        return ApplyService(settings, redis, exchange, watch=watch)
    if kind == "governor":
        from quantum_trader.services.governor import GovernorService

        return GovernorService(settings, redis)
    from quantum_trader.services.brain import BrainService

    return BrainService(settings, redis, exchange, watch=watch)


def run(kind: ServiceKind, settings: Settings) -> None:
    """Run until SIGTERM or Ctrl-C; both stop the service cleanly (pending work stays in its group)."""

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        stopper: list[asyncio.Task[Any]] = []  # keeps a reference to the stopping task

        def stop() -> None:
            stopper.append(loop.create_task(cancel_and_wait([task])))

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        try:
            await serve(kind, settings)
        except asyncio.CancelledError:
            logs.get(kind).info(f"{kind} stopped")

    with asyncio.Runner(loop_factory=event_loop_factory(settings)) as runner:
        runner.run(main())


def event_loop_factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when configured, else the standard one (the default)."""
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None
