"""The seed's design, reproduced on the same store under its own key prefix, in the bench process.

Two issuers each read the plan stream with XREADGROUP COUNT 1 BLOCK 1000 and SET a permit key per plan; "Apply"
publishes a plan and polls both keys with GET every 100 ms, up to 12 times (the seed's numbers). Measured:
publish -> both keys seen, sequentially and at fixed open-loop rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from quantum_trader.bench.measure import send_at_rate

PREFIX = "bench:seed"
POLL_S = 0.1
POLLS = 12
BLOCK_MS = 1000


async def _issuer(redis: aioredis.Redis, name: str, stream: str) -> None:
    group = f"{name}-group"
    await redis.xgroup_create(stream, group, id="0", mkstream=True)
    while True:
        reply = await redis.xreadgroup(group, name, {stream: ">"}, count=1, block=BLOCK_MS)
        for _, entries in reply or ():
            for entry_id, fields in entries:
                await redis.set(f"{PREFIX}:permit:{name}:{fields['plan_id']}", "1", ex=60)
                await redis.xack(stream, group, entry_id)


@contextlib.asynccontextmanager
async def seed_issuers(url: str) -> AsyncIterator[str]:
    """Both seed issuers running on their own connections; yields the plan stream to publish on."""
    stream = f"{PREFIX}:plan"
    clients = [aioredis.Redis.from_url(url, decode_responses=True) for _ in range(2)]
    await clients[0].delete(stream)
    tasks = [asyncio.create_task(_issuer(c, n, stream)) for c, n in zip(clients, ("governor", "p33"), strict=True)]
    await asyncio.sleep(0.2)  # both groups exist and their first blocking reads are waiting
    try:
        yield stream
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async for key in clients[0].scan_iter(match=f"{PREFIX}:*", count=1000):
            await clients[0].delete(key)
        for client in clients:
            await client.aclose()


async def _publish_and_poll(redis: aioredis.Redis, stream: str, plan_id: str) -> float | None:
    """The seed's Apply for one plan: ms from publish to both permits seen, None after 12 empty polls."""
    started = time.perf_counter()
    await redis.xadd(stream, {"plan_id": plan_id})
    for _ in range(POLLS):
        await asyncio.sleep(POLL_S)
        both = await redis.mget(f"{PREFIX}:permit:governor:{plan_id}", f"{PREFIX}:permit:p33:{plan_id}")
        if all(both):
            return (time.perf_counter() - started) * 1000
    return None


async def run_seed_sequential(url: str, plans: int) -> list[float]:
    redis = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        async with seed_issuers(url) as stream:
            found = [await _publish_and_poll(redis, stream, f"seq{n:06d}") for n in range(plans)]
    finally:
        await redis.aclose()
    return [ms for ms in found if ms is not None]


async def run_seed_open_loop(url: str, rate: float, seconds: float) -> tuple[list[float], float, int]:
    """Plans published at ``rate`` for ``seconds``, each polled by its own task; (latencies, achieved rate,
    plans that never saw both permits)."""
    total = max(1, round(rate * seconds))
    redis = aioredis.Redis.from_url(url, decode_responses=True, max_connections=2000)
    tasks: list[asyncio.Task[float | None]] = []
    try:
        async with seed_issuers(url) as stream:

            async def send(batch: range) -> None:
                for n in batch:
                    tasks.append(asyncio.create_task(_publish_and_poll(redis, stream, f"ol{rate:.0f}-{n:06d}")))

            took = await send_at_rate(total, rate, send)
            found = await asyncio.gather(*tasks)
    finally:
        await redis.aclose()
    latencies = [ms for ms in found if ms is not None]
    return latencies, total / took, total - len(latencies)
