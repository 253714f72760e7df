"""The chain at Binance's real limits: 2,400 request weight a minute, 300 orders per 10 s, 1,200 a minute (the
simulator's defaults; the rest of ``qt bench`` raises them so that they do not cap the load steps).

A private system of its own (the run's policy limits opened, as for every load step: cooldowns 0, the Governor's
rate limits raised), five symbols, one warm-up close, then proposals at each rate, open loop. Per rate: how
many closes executed and how fast, what the rest were refused with (beyond the exchange's order limit:
``rate_limited``, naming the limit; never ``position_unavailable`` or ``stale_snapshot``, which would be the
chain's own load), and the REST weight the whole chain spent per executed plan, counted by the simulator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

import httpx
import redis.asyncio as aioredis

from quantum_trader.bench.bounds import Waiting, within
from quantum_trader.bench.chain import LOAD_POSITION, run_open_loop
from quantum_trader.bench.measure import CpuWindow, Latency, r3
from quantum_trader.bus.connection import make_client
from quantum_trader.exchange.sim.engine import bench_symbols
from quantum_trader.ops import propose, wait_result

SYMBOLS = 5
ORDER_WINDOW_S = 10.0
EDGE_S = 0.1
WARMUP_TIMEOUT_S = 30.0
# the chain's own load showing through: what a plan must never be refused with while the exchange has room
OWN_LOAD_REASONS = ("position_unavailable", "stale_snapshot", "snapshot_stale", "price_unavailable")
PUSH, POLL = "push", "poll"
# the chain before the stream: no push (P3.3 polls), and every plan reads its position from the exchange
POLL_ONLY_ENV = {"QT_STREAM__PUSH": "false", "QT_APPLY__SNAPSHOT_MAX_AGE_S": "0"}


def mode_env(env: Mapping[str, str], mode: str) -> dict[str, str]:
    """The services' environment for ``mode``: as shipped (push), or the design before the stream (poll)."""
    if mode not in (PUSH, POLL):
        raise ValueError(f"limits mode: {PUSH} or {POLL}, not {mode!r}")
    return {**env, **(POLL_ONLY_ENV if mode == POLL else {})}


@dataclass
class LimitsPart:
    """One rate at the real limits."""

    rate_per_s: float
    seconds: float
    mode: str = PUSH  # PUSH: the chain as shipped; POLL: the design before the user-data stream
    sent: int = 0
    answered: int = 0
    executed: int = 0
    rate_limited: int = 0  # refused for the exchange's limits (rate_limited)
    own_load: int = 0  # refused for a reason of OWN_LOAD_REASONS: the chain starving itself
    outcomes: dict[str, int] = field(default_factory=dict)
    closes_per_s: float | None = None  # executed / the part's window
    weight: int = 0  # REST request weight of the whole chain over the part (the simulator's count)
    weight_per_executed: float | None = None
    weight_per_min: float | None = None  # the whole chain's REST weight per minute over the part and its drain
    requests: dict[str, int] = field(default_factory=dict)  # by "METHOD /path", over the part
    end_to_end: Latency = field(default_factory=Latency)  # proposal to result
    limit_named: str = ""  # one rate_limited reason, as a client reads it


async def _counts(admin: httpx.AsyncClient) -> tuple[int, dict[str, int]]:
    reply = await admin.get("/_sim/state")
    reply.raise_for_status()
    limits = reply.json()["rateLimits"]
    return int(limits["weightTotal"]), dict(limits.get("requests") or {})


def _short(outcome: str) -> str:
    """``rate_limited: orders per 10 s: 240 used, …`` -> ``rate_limited``; ``skipped: no_position`` stays."""
    error = outcome.partition(": ")[0]
    return error if error == "rate_limited" else outcome


async def run_limits(
    env: Mapping[str, str], parts: tuple[tuple[float, float], ...], waiting: Waiting | None = None, mode: str = PUSH
) -> list[LimitsPart]:
    """Each ``(rate, seconds)`` in turn on a private system at the simulator's default limits, the services in
    ``mode`` (``mode_env``)."""
    from quantum_trader.system import SERVICES, LocalSystem

    waiting = waiting or Waiting()
    symbols = [spec.symbol for spec in bench_symbols(SYMBOLS)]
    system = LocalSystem.private(
        f"qt-bench-limits-{mode}-",
        env={**mode_env(env, mode), "QT_SYMBOLS": ",".join(symbols)},
        sim_args=["--bench-symbols", str(SYMBOLS)],
        persist_store=True,
    )
    results: list[LimitsPart] = []
    try:
        waiting.on(f"the system at Binance's real limits ({mode}) to start")
        await asyncio.to_thread(system.start_infra)
        await asyncio.to_thread(system.open_positions, dict.fromkeys(symbols, LOAD_POSITION))
        await asyncio.to_thread(system.start_services, together=True)
        redis = make_client(system.urls["admin"])
        admin = httpx.AsyncClient(
            base_url=system.sim_url, headers={"X-Sim-Admin-Token": system.sim_admin_token()}, timeout=10.0
        )
        try:
            waiting.on("a warm-up close (Apply's search for forgotten orders, the streams' first resync)")
            sub = await propose(redis, symbols[0], "PARTIAL_CLOSE", qty=Decimal(1), source="bench")
            await wait_result(redis, sub.plan_id, WARMUP_TIMEOUT_S, sub.result_cursor)
            pids = {name: system.processes[name].pid for name in SERVICES}
            for rate, seconds in parts:
                part_waiting = waiting.sub(f"{rate:g} proposals/s for {seconds:g} s at the real limits ({mode})")
                # each part starts at an order window's edge (10 s, clock-aligned as the exchange counts them):
                # its windows hold its own orders only, so a part over the limit fills a whole window
                part_waiting.on("the next 10 s window of the exchange's order count")
                await asyncio.sleep(ORDER_WINDOW_S - time.time() % ORDER_WINDOW_S + EDGE_S)
                part = await _part(redis, admin, symbols, rate, seconds, CpuWindow(pids), part_waiting)
                part.mode = mode
                results.append(part)
        finally:
            await within(admin.aclose(), 10.0, "closing the simulator's admin client")
            await within(redis.aclose(), 10.0, "closing the store client")
    finally:
        waiting.on("the real-limits system to stop")
        await asyncio.to_thread(system.stop)
    return results


async def _part(
    redis: aioredis.Redis,
    admin: httpx.AsyncClient,
    symbols: list[str],
    rate: float,
    seconds: float,
    cpu: CpuWindow,
    waiting: Waiting,
) -> LimitsPart:
    counted_from = time.monotonic()
    weight_before, requests_before = await _counts(admin)
    step = await run_open_loop(redis, rate, seconds, symbols, cpu, waiting)
    weight_after, requests_after = await _counts(admin)
    counted_s = time.monotonic() - counted_from  # the part and its drain (the last results): what was counted
    part = LimitsPart(rate_per_s=rate, seconds=seconds, sent=step.sent, answered=step.completed)
    part.executed = step.executed
    short: dict[str, int] = {}
    for outcome, count in step.outcomes.items():
        key = _short(outcome)
        short[key] = short.get(key, 0) + count
        if key == "rate_limited" and not part.limit_named:
            part.limit_named = outcome.partition(": ")[2]
        if any(reason in outcome for reason in OWN_LOAD_REASONS):
            part.own_load += count
    part.outcomes = short
    part.rate_limited = short.get("rate_limited", 0)
    part.closes_per_s = r3(part.executed / seconds) if seconds else None
    part.weight = weight_after - weight_before
    part.weight_per_executed = r3(part.weight / part.executed) if part.executed else None
    part.weight_per_min = r3(part.weight * 60 / counted_s) if counted_s > 0 else None
    part.requests = {
        name: requests_after.get(name, 0) - requests_before.get(name, 0)
        for name in sorted(requests_after)
        if requests_after.get(name, 0) != requests_before.get(name, 0)
    }
    part.end_to_end = step.end_to_end
    return part
