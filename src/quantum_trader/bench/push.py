"""What the user-data stream changes for P3.3 (issue 22): the time from a position change made outside the chain
(a position set through the simulator's admin API: Binance's ADJUSTMENT) to P3.3's snapshot showing it, and the
REST request weight the whole chain spends per minute while idle (the simulator's own count of every request's
weight), with push (the stream writes the snapshot) and with push off (``QT_STREAM__PUSH=false``: the poll,
every ``snapshot_interval_s``), then push again, so that drift of the machine shows as a difference between the
two push parts. P3.3 restarts between parts with the new setting.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import redis.asyncio as aioredis

from quantum_trader.bench.bounds import Waiting
from quantum_trader.bench.measure import Latency
from quantum_trader.bus import keys

SETTING = "QT_STREAM__PUSH"
PARTS = (True, False, True)
SYMBOL = "BNBUSDT"  # a symbol no other step closes on
LOOK_EVERY_S = 0.001
POLL_PERIOD_S = 5.0  # P3.3's poll interval (its default): the poll part's pauses spread over it
SETTLE_S = 15.0  # before the first idle window: the services' start-up reads (Apply's order search) are over
_random = random.Random(1)  # the same pauses in every run
CHANGE_BOUND_S = 15.0  # one change not in the snapshot by then: the part fails (the poll takes 5 s at most)


@dataclass
class PushPart:
    push: bool
    changes: int = 0
    shown: Latency = field(default_factory=Latency)  # change made -> P3.3's snapshot shows it (ms)
    idle_s: float = 0.0
    weight_per_min: float = 0.0  # REST weight of the whole chain per minute, idle
    stream_healthy: bool = False  # P3.3 reported its stream healthy (push parts; proof the part pushed)


async def _brain_stream_healthy(metrics_url: str) -> bool:
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(metrics_url)).text
    return "p33_stream_healthy 1.0" in text


async def _weight_total(admin: httpx.AsyncClient) -> int:
    reply = await admin.get("/_sim/state")
    reply.raise_for_status()
    return int(reply.json()["rateLimits"]["weightTotal"])


async def _part(
    redis: aioredis.Redis,
    admin: httpx.AsyncClient,
    metrics_url: str,
    push: bool,
    changes: int,
    idle_s: float,
    waiting: Waiting,
) -> PushPart:
    part = PushPart(push=push, changes=changes, idle_s=idle_s)
    if push:
        waiting.on("P3.3's stream to be healthy (its /metrics)")
        deadline = time.monotonic() + 30
        while not await _brain_stream_healthy(metrics_url):
            if time.monotonic() > deadline:
                raise RuntimeError("P3.3's user-data stream never became healthy")
            await asyncio.sleep(0.2)
        part.stream_healthy = True
    waiting.on(f"the idle window ({idle_s:g} s)")
    before = await _weight_total(admin)
    await asyncio.sleep(idle_s)
    part.weight_per_min = round((await _weight_total(admin) - before) * 60 / idle_s, 1)
    shown: list[float] = []
    for n in range(changes):
        waiting.on(f"outside change {n + 1} of {changes} in P3.3's snapshot")
        amt = Decimal("10.00") + Decimal(n % 7 + 1) / 100  # never the amount before
        reply = await admin.post("/_sim/position", json={"symbol": SYMBOL, "amt": str(amt)})
        reply.raise_for_status()
        made = time.perf_counter()
        while True:
            held = await redis.hget(keys.snapshot(SYMBOL), "position_amt")
            if held is not None and Decimal(held) == amt:
                shown.append((time.perf_counter() - made) * 1000)
                break
            if time.perf_counter() - made > CHANGE_BOUND_S:
                raise RuntimeError(f"an outside change was not in the snapshot after {CHANGE_BOUND_S:g} s")
            await asyncio.sleep(LOOK_EVERY_S)
        # a random pause: the next change lands anywhere in the poll's period (a fixed one would lock onto one
        # phase of it and measure that phase only)
        await asyncio.sleep(_random.uniform(0.05, 0.5 if push else POLL_PERIOD_S))
    part.shown = Latency.of(shown)
    return part


async def run_push(
    redis: aioredis.Redis,
    system: Any,
    admin_url: str,
    admin_token: str,
    metrics_url: str,
    changes: tuple[int, int],
    idle_s: float,
    waiting: Waiting | None = None,
) -> list[PushPart]:
    """The parts in ``PARTS`` order on the run's system (P3.3 restarted between them); ``changes`` is (push,
    poll): a poll part waits up to the poll interval per change."""
    waiting = waiting or Waiting()
    parts: list[PushPart] = []
    async with httpx.AsyncClient(base_url=admin_url, headers={"X-Sim-Admin-Token": admin_token}, timeout=5.0) as admin:
        waiting.on(f"the services' start-up reads to be over ({SETTLE_S:g} s)")
        await asyncio.sleep(min(SETTLE_S, idle_s))
        try:
            for n, push in enumerate(PARTS):
                part_waiting = waiting.sub(f"part {n + 1} of {len(PARTS)}, push {'on' if push else 'off'}")
                wanted = "true" if push else "false"
                if system.env.get(SETTING, "true") != wanted:
                    part_waiting.on(f"P3.3 to restart with push {'on' if push else 'off'}")
                    system.env[SETTING] = wanted
                    await asyncio.to_thread(system.stop_service, "brain")
                    await asyncio.to_thread(system.start_service, "brain")
                count = changes[0] if push else changes[1]
                parts.append(await _part(redis, admin, metrics_url, push, count, idle_s, part_waiting))
        finally:
            if system.env.get(SETTING, "true") != "true":  # the steps after this one run as deployed
                system.env[SETTING] = "true"
                await asyncio.to_thread(system.stop_service, "brain")
                await asyncio.to_thread(system.start_service, "brain")
    return parts
