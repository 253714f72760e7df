"""Reading a consumer group forever: pending entries first, entries stuck with dead peers, then new ones;
surviving store outages (one backoff policy) and giving up on poison (dead letters)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quantum_trader.bus import keys
from quantum_trader.bus.streams import dead_letter, ensure_topology, read_group
from quantum_trader.domain import reasons

STORE_ERRORS = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 1.0  # a store coming back is used within a second (the chaos run's recovery bound is 2 s)

Handler = Callable[[str, dict[str, str]], Awaitable[None]]
Entries = list[tuple[str, dict[str, str]]]
BatchHandler = Callable[[Entries], Awaitable[None]]


def consumer_name(configured: str, service: str) -> str:
    """This instance's name in its consumer groups: stable across restarts, so it finds its pending entries."""
    return configured or f"{socket.gethostname()}-{service}"


class Backoff:
    """Exponential backoff, by default for store reconnects: 0.1 s doubling to 1 s, reset on success. This is
    the system's one retry policy for store calls (redis-py's own retries are off: bus/connection.py)."""

    def __init__(self, start_s: float = BACKOFF_START_S, max_s: float = BACKOFF_MAX_S) -> None:
        self.start_s = start_s
        self.max_s = max_s
        self.delay = start_s

    def reset(self) -> None:
        self.delay = self.start_s

    async def wait(self) -> None:
        await asyncio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.max_s)


@dataclass(frozen=True, slots=True)
class Failover:
    """How a consumer takes over from dead peers and gives up on poison.

    claim_idle_ms: entries pending longer than this with another (presumably dead) consumer are claimed
        (XAUTOCLAIM). Longer than the slowest legitimate handling, or two live consumers would share work.
    max_deliveries: an entry delivered more often than this is dead-lettered with its history instead of
        being handled again (it is what kills its consumers, or it never finishes).
    dlq: where such entries go.
    """

    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    dlq: str = keys.PLAN_DLQ
    claim_every_s: float = 5.0
    # Called after an entry is dead-lettered as poison (Apply: a plan that exists still gets its one result).
    poisoned: Handler | None = None


async def consume_group(
    redis: aioredis.Redis,
    *,
    stream: str,
    group: str,
    consumer: str,
    handle: Handler,
    log: Any,
    store_up: Callable[[bool], None],
    failover: Failover,
    service: str,
    count: int = 128,
    block_ms: int = 1000,
    handle_batch: BatchHandler | None = None,
) -> None:
    """Feed ``handle`` this consumer's pending entries, entries stuck with dead peers, then new ones, forever.

    With ``handle_batch``, the new entries of one read go to it together (the issuers decide them with one
    round trip for their inputs and one for their permits); redelivered ones still go one by one to ``handle``.
    Handlers ack what they finish. While the store is away the loop backs off (nothing is decided, so
    nothing is permitted: fail closed) and on return it re-reads its pending entries first, so an entry
    read just before the outage is not forgotten.
    """
    reader = GroupReader(redis, stream, group, consumer, handle, log, failover, service, count)
    backoff = Backoff()
    recover = True
    next_claim = 0.0
    while True:
        try:
            if recover:
                await reader.drain_pending()
                recover = False
            if time.monotonic() >= next_claim:
                await reader.claim_stale()
                next_claim = time.monotonic() + failover.claim_every_s
            entries = await reader.usable(
                await read_group(redis, stream, group, consumer, count=count, block_ms=block_ms)
            )
            store_up(True)
            backoff.reset()
            await reader.handle_new(entries, handle_batch)
        except STORE_ERRORS as exc:
            store_up(False)
            log.warning("store unavailable, retrying", error=str(exc), retry_in_s=backoff.delay)
            await backoff.wait()
            recover = True
        except ResponseError as exc:
            # The stream or its group vanished (a store restarted without its data, a FLUSHALL, a DEL): recreate
            # them and carry on. (A blocked read cut short, UNBLOCKED, is an outage: bus/errors.py; the read
            # after it finds the group missing here if the stream went.)
            if "NOGROUP" not in str(exc):
                raise
            log.warning("stream or consumer group missing, recreating", stream=stream, group=group, error=str(exc))
            await ensure_topology(redis)


@dataclass(frozen=True, slots=True)
class GroupReader:
    """Entries that were delivered before: this consumer's own pending ones, and those of stopped peers."""

    redis: aioredis.Redis
    stream: str
    group: str
    consumer: str
    handle: Handler
    log: Any
    failover: Failover
    service: str
    count: int

    async def usable(self, entries: Entries) -> Entries:
        """``entries`` without the defective ones (not UTF-8, duplicate or empty names, too many fields, huge
        values: bus/entries.py), which are dead-lettered here with their reason and exact bytes."""
        good = []
        for entry_id, fields in entries:
            defect = getattr(fields, "defect", "")
            if not defect:
                good.append((entry_id, fields))
                continue
            error = f"{reasons.MALFORMED_ENTRY}: {defect}"
            await dead_letter(
                self.redis, self.failover.dlq, self.stream, self.group, entry_id, fields, error, self.service
            )
            self.log.warning("unreadable entry dead-lettered", stream=self.stream, entry_id=entry_id, error=defect)
        return good

    async def handle_new(self, entries: Entries, handle_batch: BatchHandler | None) -> None:
        """New entries of one read: together to ``handle_batch`` if there is one, else one by one."""
        if handle_batch is None or not entries:
            for entry_id, fields in entries:
                await _handle_one(self.handle, entry_id, fields, self.log)
            return
        if not await _handle_many(handle_batch, entries, self.log):
            # Failed part-way: what it left unacknowledged is handled entry by entry (handlers are idempotent),
            # so one bad entry does not hold the others back until a restart.
            left = await _still_pending(self.redis, self.stream, self.group, self.consumer, entries)
            for entry_id, fields in entries:
                if entry_id in left:
                    await _handle_one(self.handle, entry_id, fields, self.log)

    async def drain_pending(self) -> None:
        start = "0"
        while True:
            reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: start}, count=self.count)
            entries = reply[0][1] if reply else []
            if not entries:
                return
            start = entries[-1][0]
            for entry_id, fields in await self.usable(entries):
                await self.redeliver(entry_id, fields)

    async def claim_stale(self) -> None:
        """Take over entries left pending by consumers that stopped, oldest first (XPENDING IDLE, then XCLAIM,
        so the previous owner is known for the history of an entry that turns out to be poison)."""
        start = "-"
        while True:
            stale = await self.redis.xpending_range(
                self.stream, self.group, min=start, max="+", count=self.count, idle=self.failover.claim_idle_ms
            )
            if not stale:
                return
            for item in stale:
                entry_id, owner = item["message_id"], item["consumer"]
                if owner == self.consumer:
                    continue  # ours: the recovery pass after a reconnect handles them
                claimed = await self.redis.xclaim(
                    self.stream, self.group, self.consumer, self.failover.claim_idle_ms, [entry_id]
                )
                if not claimed:
                    continue  # another live consumer claimed it first
                self.log.warning("took over an entry from a stopped consumer", entry_id=entry_id, owner=owner)
                for claimed_id, fields in await self.usable(claimed):
                    await self.redeliver(claimed_id, fields, owner)
            start = f"({stale[-1]['message_id']}"

    async def redeliver(self, entry_id: str, fields: dict[str, str] | None, previous_owner: str = "") -> None:
        """Handle an entry delivered before, unless it is gone from the stream or has been tried too often."""
        if not fields:  # trimmed from the stream while pending: nothing left to process
            await self.redis.xack(self.stream, self.group, entry_id)
            return
        history = await self.redis.xpending_range(self.stream, self.group, min=entry_id, max=entry_id, count=1)
        times = int(history[0]["times_delivered"]) if history else 1
        if times > self.failover.max_deliveries:
            owner = previous_owner or history[0]["consumer"]
            error = f"poison: delivered {times} times (limit {self.failover.max_deliveries}); last held by {owner}"
            await dead_letter(
                self.redis, self.failover.dlq, self.stream, self.group, entry_id, fields, error, self.service
            )
            self.log.error("entry dead-lettered after too many deliveries", entry_id=entry_id, times=times)
            if self.failover.poisoned is not None:
                await _handle_one(self.failover.poisoned, entry_id, fields, self.log)
            return
        await _handle_one(self.handle, entry_id, fields, self.log)


async def _handle_one(handle: Handler, entry_id: str, fields: dict[str, str], log: Any) -> bool:
    return await _guarded(handle(entry_id, fields), log, entry_id=entry_id)


async def _handle_many(handle_batch: BatchHandler, entries: Entries, log: Any) -> bool:
    return await _guarded(handle_batch(entries), log, entry_id=entries[0][0], entries=len(entries))


async def _guarded(work: Awaitable[None], log: Any, **where: Any) -> bool:
    """Run a handler; False (logged) when it raised a bug rather than a store error or a cancellation."""
    try:
        await work
    except STORE_ERRORS:
        raise
    except asyncio.CancelledError:
        raise
    except Exception:
        # A bug, not bad input (bad input is dead-lettered by the handler). Keep what was not acknowledged
        # pending so it is retried after the next restart or reconnect, and keep serving the others.
        log.exception("unexpected error handling entry; left pending", **where)
        return False
    return True


async def _still_pending(redis: aioredis.Redis, stream: str, group: str, consumer: str, entries: Entries) -> set[str]:
    pending = await redis.xpending_range(
        stream, group, min=entries[0][0], max=entries[-1][0], count=len(entries), consumername=consumer
    )
    return {item["message_id"] for item in pending}
