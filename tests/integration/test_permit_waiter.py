"""Apply's shared audit reader (services/apply/permit_waiter.py), on a real store: which audit lines wake which
waiting plan, where it starts reading, and what becomes of a line it cannot read.

Each test runs its own PermitWaiter on the test's client. A line that must wake nobody is checked by a later
one that must wake a plan registered only for that ("settled"): the reader reads in order, so once that plan
is woken every earlier line has been read.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import structlog

from quantum_trader import logs
from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.bus.entries import raw_pairs
from quantum_trader.services.apply.permit_waiter import PermitWaiter
from quantum_trader.tasks import cancel_and_wait
from scripted import RecordingLog

pytestmark = pytest.mark.integration
LIMIT = 4096  # the longest audit value read (MAX_AUDIT_VALUE_CHARS), written out: a changed limit shows
NO_STORE = "redis://127.0.0.1:9/0"  # nothing listens there: every command fails to connect
_sentinels = itertools.count()


async def audit(rds: aioredis.Redis, plan_id: str, issuer: str, decision: str, reason: str = "r") -> str:
    """One audit line, as the issuers write it."""
    fields = {"plan_id": plan_id, "issuer": issuer, "decision": decision, "reason": reason}
    return str(await rds.xadd(keys.AUDIT_STREAM, {**fields, "at": repr(time.time()), "symbol": "BTCUSDT"}))


@contextlib.asynccontextmanager
async def reading(waiter: PermitWaiter) -> AsyncIterator[asyncio.Task[None]]:
    """The reader running (from the stream's end as it was when it became ready), stopped at the end."""
    task = asyncio.create_task(waiter.run())
    try:
        await asyncio.wait_for(waiter.ready.wait(), 5)
        yield task
    finally:
        await cancel_and_wait([task])


async def settled(rds: aioredis.Redis, waiter: PermitWaiter) -> None:
    """Every line on the stream so far has been read: a deny for a plan registered for this alone woke it."""
    sentinel = f"sentinel-{next(_sentinels)}"
    event = waiter.register(sentinel)
    await audit(rds, sentinel, "governor", "deny")
    await asyncio.wait_for(event.wait(), 3)
    waiter.release(sentinel)


async def woken(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), 3)


def new_waiter(rds: aioredis.Redis, log: object | None = None, **options: int) -> PermitWaiter:
    return PermitWaiter(rds, log if log is not None else logs.get("apply"), **options)


# --- what wakes a plan ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("issuer", ["governor", "operator", "p33"])
async def test_a_deny_from_either_slot_wakes_its_plan_at_once(rds: aioredis.Redis, issuer: str) -> None:
    waiter = new_waiter(rds)
    event = waiter.register("plan-a")
    other = waiter.register("plan-b")
    async with reading(waiter):
        await audit(rds, "plan-a", issuer, "deny")
        await woken(event)
        await settled(rds, waiter)
        assert not other.is_set()


@pytest.mark.parametrize(("first", "second"), [("governor", "p33"), ("p33", "governor"), ("operator", "p33")])
async def test_one_allow_wakes_nothing_and_allows_from_both_slots_wake_the_plan(
    rds: aioredis.Redis, first: str, second: str
) -> None:
    """Apply reads the two permits once both are there, not once per decision."""
    waiter = new_waiter(rds)
    event = waiter.register("plan-a")
    async with reading(waiter):
        await audit(rds, "plan-a", first, "allow")
        await settled(rds, waiter)
        assert not event.is_set()
        await audit(rds, "plan-a", second, "allow")
        await woken(event)


async def test_allows_of_the_governor_and_the_operator_fill_one_slot(rds: aioredis.Redis) -> None:
    """The operator writes the Governor's slot: its allow and the Governor's (or one repeated) are not a pair."""
    waiter = new_waiter(rds)
    event = waiter.register("plan-a")
    async with reading(waiter):
        for issuer in ("governor", "operator", "governor"):
            await audit(rds, "plan-a", issuer, "allow")
        await settled(rds, waiter)
        assert not event.is_set()
        await audit(rds, "plan-a", "p33", "allow")
        await woken(event)


async def test_an_unknown_issuer_or_decision_wakes_nothing(rds: aioredis.Redis) -> None:
    waiter = new_waiter(rds)
    event = waiter.register("plan-a")
    async with reading(waiter):
        await audit(rds, "plan-a", "brain", "deny")
        await audit(rds, "plan-a", "", "deny")
        await audit(rds, "plan-a", "governor", "maybe")
        await audit(rds, "plan-a", "governor", "")
        await audit(rds, "plan-a", "brain", "allow")
        await rds.xadd(keys.AUDIT_STREAM, {"plan_id": "plan-a"})  # no issuer, no decision
        await audit(rds, "plan-a", "p33", "allow")
        await settled(rds, waiter)
        assert not event.is_set()  # only P3.3's allow counted
        await audit(rds, "plan-a", "governor", "allow")
        await woken(event)


async def test_decisions_for_a_plan_not_registered_wake_nothing_and_are_not_remembered(rds: aioredis.Redis) -> None:
    """A plan registers before it is published: an allow seen before that is not one of its decisions."""
    waiter = new_waiter(rds)
    async with reading(waiter):
        await audit(rds, "plan-a", "governor", "allow")
        await audit(rds, "plan-b", "governor", "deny")
        await settled(rds, waiter)
        event = waiter.register("plan-a")
        await audit(rds, "plan-a", "p33", "allow")
        await settled(rds, waiter)
        assert not event.is_set()
        assert waiter.waiting == 1


async def test_noted_allows_and_one_more_of_the_other_slot_wake_the_plan(rds: aioredis.Redis) -> None:
    """A resumed plan read some allows itself: one more of the other slot completes the pair; of the same, not."""
    waiter = new_waiter(rds)
    other_slot, same_slot = waiter.register("plan-a"), waiter.register("plan-b")
    waiter.note_allowed("plan-a", {"governor"})
    waiter.note_allowed("plan-b", {"p33"})
    async with reading(waiter):
        await audit(rds, "plan-b", "p33", "allow")
        await audit(rds, "plan-a", "p33", "allow")
        await woken(other_slot)
        await settled(rds, waiter)
        assert not same_slot.is_set()


async def test_noted_allows_of_a_plan_not_registered_are_not_kept(rds: aioredis.Redis) -> None:
    waiter = new_waiter(rds)
    waiter.note_allowed("plan-a", {"governor"})
    event = waiter.register("plan-a")
    async with reading(waiter):
        await audit(rds, "plan-a", "p33", "allow")
        await settled(rds, waiter)
        assert not event.is_set()


async def test_registering_twice_gives_the_same_event_and_release_forgets_the_plan(rds: aioredis.Redis) -> None:
    """Release forgets the plan and the allows seen for it: registered again, it starts from none."""
    waiter = new_waiter(rds)
    first = waiter.register("plan-a")
    assert waiter.register("plan-a") is first
    waiter.register("plan-b")
    assert waiter.waiting == 2
    async with reading(waiter):
        await audit(rds, "plan-a", "governor", "allow")
        await settled(rds, waiter)
        waiter.release("plan-a")
        waiter.release("plan-a")
        waiter.release("never-registered")
        assert waiter.waiting == 1
        again = waiter.register("plan-a")
        assert again is not first
        await audit(rds, "plan-a", "p33", "allow")
        await settled(rds, waiter)
        assert not again.is_set() and not first.is_set()
        assert waiter.waiting == 2


# --- where it reads from ----------------------------------------------------------------------------------------


async def test_the_reader_starts_at_the_streams_end(rds: aioredis.Redis) -> None:
    """Decisions from before it started concern no plan registered now: they wake nobody."""
    await audit(rds, "plan-a", "governor", "deny")
    waiter = new_waiter(rds)
    event = waiter.register("plan-a")
    async with reading(waiter):
        await settled(rds, waiter)
        assert not event.is_set()


async def test_on_a_store_without_the_stream_the_reader_reads_it_from_its_first_line(rds: aioredis.Redis) -> None:
    assert not await rds.exists(keys.AUDIT_STREAM)
    waiter = new_waiter(rds)
    event = waiter.register("plan-a")
    async with reading(waiter):
        await audit(rds, "plan-a", "p33", "deny")
        await woken(event)


async def test_a_reader_started_again_goes_on_from_the_last_line_it_read(rds: aioredis.Redis) -> None:
    """Read one line at a time, each line read is where the next read starts: none is skipped."""
    waiter = new_waiter(rds, count=1)
    async with reading(waiter):
        await settled(rds, waiter)
    first, second = waiter.register("plan-a"), waiter.register("plan-b")
    await audit(rds, "plan-a", "governor", "deny")
    await audit(rds, "plan-b", "governor", "deny")
    async with reading(waiter):
        await woken(first)
        await woken(second)


async def test_restart_wakes_every_waiting_plan_and_reads_from_the_streams_end_again(rds: aioredis.Redis) -> None:
    """Another store instance: each waiting plan reads its permits itself, and the old position means nothing
    on the new stream, so what is on it when reading resumes is skipped."""
    waiter = new_waiter(rds)
    plan_a, plan_b = waiter.register("plan-a"), waiter.register("plan-b")
    async with reading(waiter):
        await settled(rds, waiter)
    await audit(rds, "plan-c", "governor", "deny")  # written before reading resumes
    waiter.restart()
    assert plan_a.is_set() and plan_b.is_set()
    plan_c = waiter.register("plan-c")
    async with reading(waiter):
        await settled(rds, waiter)
        assert not plan_c.is_set()
        assert waiter.waiting == 3


# --- lines it cannot read ---------------------------------------------------------------------------------------


async def dead_letters(rds: aioredis.Redis) -> list[dict[str, str]]:
    return [dict(fields) for _, fields in await rds.xrange(keys.AUDIT_DLQ)]


async def test_a_value_longer_than_any_issuer_writes_is_dead_lettered_and_wakes_nobody(rds: aioredis.Redis) -> None:
    log = RecordingLog()
    waiter = new_waiter(rds, log)
    event = waiter.register("plan-a")
    async with reading(waiter):
        entry_id = await audit(rds, "plan-a", "governor", "deny", reason="x" * (LIMIT + 1))
        await settled(rds, waiter)
        assert not event.is_set()
    (letter,) = await dead_letters(rds)
    assert letter["error"] == f"malformed_entry: value of 'reason' is {LIMIT + 1} characters long (at most {LIMIT})"
    assert (letter["source_stream"], letter["source_id"], letter["service"]) == (keys.AUDIT_STREAM, entry_id, "apply")
    assert (letter["orig.plan_id"], letter["orig.issuer"], letter["orig.decision"]) == ("plan-a", "governor", "deny")
    assert abs(float(letter["at"]) - time.time()) < 5
    pairs = raw_pairs(letter)
    assert pairs is not None and (b"reason", b"x" * (LIMIT + 1)) in pairs  # the whole value, in the raw copy
    assert log.warnings == [("unreadable audit entry dead-lettered", {"entry_id": entry_id})]


async def test_a_value_of_exactly_the_limit_is_read(rds: aioredis.Redis) -> None:
    waiter = new_waiter(rds)
    event = waiter.register("plan-a")
    async with reading(waiter):
        await audit(rds, "plan-a", "governor", "deny", reason="x" * LIMIT)
        await woken(event)
    assert await dead_letters(rds) == []


async def test_a_line_that_is_not_utf8_is_dead_lettered_once_by_two_readers_and_wakes_nobody(
    rds: aioredis.Redis, store_url: str
) -> None:
    """Two Apply instances both read it; the first to dead-letter it writes the one letter, with its bytes."""
    pairs = [(b"plan_id", b"plan-a"), (b"issuer", b"governor"), (b"decision", b"deny"), (b"reason", b"\xff\xfe")]
    one, two = new_waiter(rds), new_waiter(rds)
    events = [one.register("plan-a"), two.register("plan-a")]
    raw = aioredis.Redis.from_url(store_url)  # bytes in, bytes out
    try:
        async with reading(one), reading(two):
            entry_id = (await raw.xadd(keys.AUDIT_STREAM, dict(pairs))).decode()
            await settled(rds, one)
            await settled(rds, two)
            assert not any(event.is_set() for event in events)
    finally:
        await raw.aclose()
    (letter,) = await dead_letters(rds)
    assert letter["error"] == "malformed_entry: value of 'reason' is not valid UTF-8"
    assert (letter["source_stream"], letter["source_id"], letter["service"]) == (keys.AUDIT_STREAM, entry_id, "apply")
    assert raw_pairs(letter) == pairs
    assert await rds.exists(keys.dead_letter_guard(keys.AUDIT_STREAM, entry_id)) == 1


async def test_a_dead_letter_that_cannot_be_written_is_skipped_and_reading_goes_on(rds: aioredis.Redis) -> None:
    await rds.set(keys.AUDIT_DLQ, "not a stream")  # a writer broke the dead-letter key
    log = RecordingLog()
    waiter = new_waiter(rds, log)
    event = waiter.register("plan-a")
    async with reading(waiter):
        await audit(rds, "plan-a", "governor", "deny", reason="x" * (LIMIT + 1))
        await settled(rds, waiter)
        assert not event.is_set()
    ((message, fields),) = log.warnings
    assert message == "audit reader: could not dead-letter an unreadable entry"
    assert list(fields) == ["error"] and "WRONGTYPE" in str(fields["error"])


# --- a store that fails ----------------------------------------------------------------------------------------


async def test_a_store_that_cannot_be_reached_is_tried_again_with_a_growing_backoff() -> None:
    log = RecordingLog()
    client = make_client(NO_STORE)
    waiter = new_waiter(client, log)
    task = asyncio.create_task(waiter.run())
    try:

        async def three_tries() -> bool:
            return len(log.warnings) >= 3

        deadline = time.monotonic() + 5
        while not await three_tries() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not task.done() and not waiter.ready.is_set()
    finally:
        await cancel_and_wait([task])
        await client.aclose()
    tries = log.warnings[:3]
    assert [(message, fields["retry_in_s"]) for message, fields in tries] == [
        ("audit reader: store unavailable", 0.1),
        ("audit reader: store unavailable", 0.2),
        ("audit reader: store unavailable", 0.4),
    ]
    assert all("127.0.0.1:9" in str(fields["error"]) for _, fields in tries)


async def test_an_unexpected_error_is_logged_and_reading_resumes_with_a_fresh_backoff(rds: aioredis.Redis) -> None:
    """A stream key a writer replaced: the reader must not die (every waiting plan would wait its whole
    window); once the key is a stream again it reads on, and a later failure starts the backoff afresh."""
    waiter = new_waiter(rds, block_ms=50)
    event = waiter.register("plan-a")
    with structlog.testing.capture_logs() as logged:
        async with reading(waiter) as task:

            def failures() -> list[float]:
                return [e["retry_in_s"] for e in logged if e["event"].startswith("audit reader: unexpected error")]

            async def failed(times: int) -> None:
                deadline = time.monotonic() + 5
                while len(failures()) < times and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)

            await rds.delete(keys.AUDIT_STREAM)
            await rds.set(keys.AUDIT_STREAM, "not a stream")
            await failed(2)
            await rds.delete(keys.AUDIT_STREAM)
            await audit(rds, "plan-a", "p33", "deny")
            await woken(event)
            assert failures() == [0.1, 0.2]
            await rds.delete(keys.AUDIT_STREAM)
            await rds.set(keys.AUDIT_STREAM, "again not a stream")
            await failed(3)
            assert failures() == [0.1, 0.2, 0.1]
            assert not task.done()
            await rds.delete(keys.AUDIT_STREAM)
    assert all(
        (e["log_level"], e["exc_info"]) == ("error", True)
        for e in logged
        if e["event"].startswith("audit reader: unexpected error")
    )


async def test_the_reader_hands_the_newest_entry_of_each_batch_to_the_store_watch(rds: aioredis.Redis) -> None:
    """What the reader read is part of Apply's witness that a restarted store lost nothing (bus/identity.py
    CLAIM_EPOCH): each batch's newest entry id is handed on."""
    read: list[str] = []
    waiter = PermitWaiter(rds, logs.get("apply"), on_read=read.append)
    async with reading(waiter):
        await audit(rds, "plan-a", "governor", "allow")
        await settled(rds, waiter)
        newest = str((await rds.xrevrange(keys.AUDIT_STREAM, count=1))[0][0])
        assert read[-1] == newest
