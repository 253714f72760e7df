"""Consumer-group plumbing shared by the services: create groups, read batches, ack, dead-letter."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from quantum_trader.bus import keys
from quantum_trader.bus.entries import letter_fields
from quantum_trader.domain.text import printable

Entry = tuple[str, dict[str, str]]

# Every group the system uses, created together by whichever service starts first, so that no producer can
# publish into a stream before the consumers' groups exist (an entry before a group's creation is never seen).
TOPOLOGY: tuple[tuple[str, str], ...] = (
    (keys.PROPOSAL_STREAM, keys.APPLY_GROUP),
    (keys.PLAN_STREAM, keys.GOVERNOR_GROUP),
    (keys.PLAN_STREAM, keys.P33_GROUP),
    (keys.RESULT_STREAM, keys.LEDGER_GROUP),
)

# The same groups by the service that reads them: its heartbeat reports their backlog, `qt status` shows it.
GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "apply": ((keys.PROPOSAL_STREAM, keys.APPLY_GROUP),),
    "governor": ((keys.PLAN_STREAM, keys.GOVERNOR_GROUP),),
    "brain": ((keys.PLAN_STREAM, keys.P33_GROUP), (keys.RESULT_STREAM, keys.LEDGER_GROUP)),
}

DLQ_MAXLEN = 100_000  # dead letters are for humans to read; a hundred thousand is weeks of a broken producer
STREAM_MAXLEN = 1_000_000  # ~ a few hundred MB at most; plans older than that are in the audit trail


async def ensure_group(redis: aioredis.Redis, stream: str, group: str) -> None:
    """Create ``group`` reading from the start of ``stream`` (MKSTREAM). An existing group is kept as is."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def ensure_topology(redis: aioredis.Redis) -> None:
    """Create every group this account may create; under per-service ACL users each creates its own."""
    for stream, group in TOPOLOGY:
        try:
            await ensure_group(redis, stream, group)
        except NoPermissionError:
            continue


async def group_backlog(redis: aioredis.Redis, stream: str, group: str) -> tuple[int, int]:
    """(lag, pending) of a consumer group: entries not yet delivered, and delivered but not acknowledged.
    (0, 0) while the stream does not exist yet (a fresh store, before the first service created it)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return 0, 0
        raise
    for info in groups:
        if info["name"] == group:
            return int(info.get("lag") or 0), int(info.get("pending") or 0)
    return 0, 0


async def read_group(
    redis: aioredis.Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    count: int,
    block_ms: int | None,
    pending: bool = False,
) -> list[Entry]:
    """Entries for ``consumer``: new ones (``>``), or with ``pending`` its own unacknowledged ones."""
    reply = await redis.xreadgroup(
        group, consumer, {stream: "0" if pending else ">"}, count=count, block=None if pending else block_ms
    )
    if not reply:
        return []
    _, entries = reply[0]
    # A pending entry deleted from the stream (trimmed) comes back with no fields; there is nothing to redo.
    return [(entry_id, fields or {}) for entry_id, fields in entries]


def _letter(fields: dict[str, str], error: str, stream: str, entry_id: str, service: str) -> dict[str, str]:
    letter = letter_fields(fields)
    letter.update(
        {
            "error": printable(error)[:1024],
            "source_stream": stream,
            "source_id": entry_id,
            "service": service,
            "at": repr(time.time()),
        }
    )
    return letter


async def dead_letter(
    redis: aioredis.Redis,
    dlq: str,
    stream: str,
    group: str,
    entry_id: str,
    fields: dict[str, str],
    error: str,
    service: str,
) -> None:
    """Move an unprocessable entry to ``dlq`` with why and where it came from, and ack it, in one step. The
    letter is text throughout (``qt audit dead-letters`` and the dashboard read it) and keeps the entry's exact
    bytes when its text fields are not the whole truth (bus/entries.py ``letter_fields``)."""
    letter = _letter(fields, error, stream, entry_id, service)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(dlq, letter, maxlen=DLQ_MAXLEN, approximate=True)
        pipe.xack(stream, group, entry_id)
        await pipe.execute()


# An entry of a stream read without a consumer group (several readers each see it): the first reader to
# dead-letter it wins the guard key and writes the letter; the others change nothing.
DEAD_LETTER_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
return 1
"""


async def dead_letter_once(
    redis: aioredis.Redis, dlq: str, stream: str, entry_id: str, fields: dict[str, str], error: str, service: str
) -> bool:
    """Dead-letter an entry of a stream read without a group, once whoever else reads it. True if this call
    wrote the letter."""
    letter = _letter(fields, error, stream, entry_id, service)
    flat = [part for pair in letter.items() for part in pair]
    written = await redis.eval(
        DEAD_LETTER_ONCE,
        2,
        keys.dead_letter_guard(stream, entry_id),
        dlq,
        keys.PLAN_BOOKKEEPING_TTL_S,
        DLQ_MAXLEN,
        *flat,
    )
    return bool(written)
