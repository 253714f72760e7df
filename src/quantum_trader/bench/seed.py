"""The seed's design, reproduced on the same store under its own key prefix, in the bench process.

Two issuers each read the plan stream with XREADGROUP COUNT 1 BLOCK 1000 and SET a permit key per plan; "Apply"
publishes a plan and polls both keys with GET every 100 ms, up to 12 times (the seed's numbers). Measured:
publish -> both keys seen, sequentially and at fixed open-loop rates.

What this reproduction must not add to the design (issue 12, a full ``qt bench`` hanging in its open loop at
1,000/s): the issuers end on a stop flag as well as on a cancel (on Python 3.11 redis-py can lose a cancel, see
``bench.bounds``, and an issuer that only a cancel ends then reads on forever while the step waits for it);
"Apply" polls over one bounded pool (an unbounded one opened a connection per waiting poll when the bench
process fell behind, ~2,000 at 1,000/s, and each new connection's handshake made it fall further behind); every
command has a socket timeout; and whatever is still polling when the step ends is cancelled and waited for
within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from quantum_trader.bench.bounds import STOP_GRACE_S, Waiting, within
from quantum_trader.bench.measure import send_at_rate
from quantum_trader.tasks import cancel_and_wait

PREFIX = "bench:seed"
POLL_S = 0.1
POLLS = 12
BLOCK_MS = 1000
GROUPS = ("governor", "p33")
# The seed's Apply is one process with one client: at most this many polls are on the wire at once, the others
# wait for a connection (a wait the polling design pays for under load, as the seed itself would).
POOL_MAX = 32
POOL_WAIT_S = 10.0  # a poll that gets no connection in this long fails (counted), it does not wait on
SOCKET_TIMEOUT_S = 10.0  # every command (the issuers' BLOCK is 1 s)
CLEANUP_S = 15.0  # deleting the design's keys after a step


def seed_client(url: str, max_connections: int = 4) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
    )
    return aioredis.Redis.from_pool(pool)  # closes the pool with the client


@dataclass
class SeedIssuers:
    """The running issuers: the stream to publish on, and how many permits each group has written so far."""

    stream: str
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))


async def _issuer(redis: aioredis.Redis, name: str, issuers: SeedIssuers, stop: asyncio.Event) -> None:
    group = f"{name}-group"
    await redis.xgroup_create(issuers.stream, group, id="0", mkstream=True)
    while not stop.is_set():  # the flag ends it within one BLOCK even when its cancel was lost
        reply = await redis.xreadgroup(group, name, {issuers.stream: ">"}, count=1, block=BLOCK_MS)
        for _, entries in reply or ():
            for entry_id, fields in entries:
                await redis.set(f"{PREFIX}:permit:{name}:{fields['plan_id']}", "1", ex=60)
                await redis.xack(issuers.stream, group, entry_id)
                issuers.written[name] += 1


@contextlib.asynccontextmanager
async def seed_issuers(url: str) -> AsyncIterator[SeedIssuers]:
    """Both seed issuers running on their own connections. On the way out (also when the step is cancelled)
    they are stopped, the design's keys deleted and the connections closed, each within a bound; an issuer that
    would not stop is an error (after the rest of the cleanup)."""
    issuers = SeedIssuers(f"{PREFIX}:plan")
    clients = [seed_client(url) for _ in GROUPS]
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        await within(clients[0].delete(issuers.stream), SOCKET_TIMEOUT_S, "deleting the seed plan stream")
        tasks = [asyncio.create_task(_issuer(c, n, issuers, stop)) for c, n in zip(clients, GROUPS, strict=True)]
        await asyncio.sleep(0.2)  # both groups exist and their first blocking reads are waiting
        yield issuers
    finally:
        stop.set()
        stuck = await cancel_and_wait(
            tasks, BLOCK_MS / 1000 + 2
        )  # the cancel, or at the latest the flag after one BLOCK
        with contextlib.suppress(Exception):  # the keys expire in 60 s anyway; a failed delete is not the result
            await within(_delete_keys(clients[0]), CLEANUP_S, "deleting the seed design's keys")
        for client in clients:
            with contextlib.suppress(Exception):
                await within(client.aclose(), SOCKET_TIMEOUT_S, "closing a seed issuer's client")
        if stuck:
            raise RuntimeError(f"{len(stuck)} seed issuer(s) did not stop within {BLOCK_MS / 1000 + 2:g} s")


async def _delete_keys(redis: aioredis.Redis) -> None:
    batch: list[str] = []
    async for key in redis.scan_iter(match=f"{PREFIX}:*", count=1000):
        batch.append(key)
        if len(batch) == 1000:
            await redis.unlink(*batch)
            batch = []
    if batch:
        await redis.unlink(*batch)


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


async def run_seed_sequential(url: str, plans: int, waiting: Waiting | None = None) -> list[float]:
    redis = seed_client(url)
    found: list[float | None] = []
    try:
        async with seed_issuers(url) as issuers:
            for n in range(plans):
                if waiting is not None:
                    waiting.on(f"seed plan {n + 1} of {plans} (permits written: {_written(issuers)})")
                found.append(await _publish_and_poll(redis, issuers.stream, f"seq{n:06d}"))
    finally:
        with contextlib.suppress(Exception):
            await within(redis.aclose(), SOCKET_TIMEOUT_S, "closing the seed client")
    return [ms for ms in found if ms is not None]


@dataclass
class SeedRun:
    """One open-loop run of the seed design."""

    latencies: list[float]  # ms, plans that saw both permits
    offered_per_s: float
    unanswered: int  # plans that never saw both permits in their 12 polls
    errors: int = 0  # plans whose publish or a poll failed (no connection within POOL_WAIT_S, a socket timeout)
    first_error: str = ""


async def run_seed_open_loop(url: str, rate: float, seconds: float, waiting: Waiting | None = None) -> SeedRun:
    """Plans published at ``rate`` for ``seconds``, each polled by its own task over one bounded pool."""
    total = max(1, round(rate * seconds))
    redis = seed_client(url, POOL_MAX)
    tasks: list[asyncio.Task[float | None]] = []
    try:
        async with seed_issuers(url) as issuers:

            async def send(batch: range) -> None:
                for n in batch:
                    plan_id = f"ol{rate:.0f}-{n:06d}"
                    tasks.append(asyncio.create_task(_publish_and_poll(redis, issuers.stream, plan_id)))

            def state() -> str:
                ended = [t for t in tasks if t.done()]
                decided = sum(1 for t in ended if not t.cancelled() and not t.exception() and t.result())
                behind = [f"{g} ({n:,} permits written)" for g, n in issuers.written.items() if n < len(tasks)]
                text = f"{decided:,} of {total:,} plans decided, {len(tasks) - len(ended):,} still polling"
                return text + (f", waiting for results from group {', '.join(behind)}" if behind else "")

            if waiting is not None:
                waiting.on(lambda: f"sending ({len(tasks):,} of {total:,} published); {state()}")
            took = await send_at_rate(total, rate, send)
            if waiting is not None:
                waiting.on(state)
            try:
                await asyncio.wait(tasks)  # each ends by itself after at most 12 polls; the step's bound covers a stall
            finally:
                await cancel_and_wait(
                    tasks, STOP_GRACE_S
                )  # when the step is cut short: nothing polls on after the issuers are gone
    finally:
        with contextlib.suppress(Exception):
            await within(redis.aclose(), SOCKET_TIMEOUT_S, "closing the seed client")
    errors = [t.exception() for t in tasks if not t.cancelled() and t.exception() is not None]
    latencies = [ms for t in tasks if not t.cancelled() and t.exception() is None and (ms := t.result()) is not None]
    first = f"{type(errors[0]).__name__}: {errors[0]}" if errors else ""
    return SeedRun(latencies, total / took, total - len(latencies) - len(errors), len(errors), first)


def _written(issuers: SeedIssuers) -> str:
    return ", ".join(f"{group} {n:,}" for group, n in issuers.written.items())
