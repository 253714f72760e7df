"""The audit trail read back from the store: one plan's story, the permit decisions of a period, the 24-hour
report, the dead letters (`qt audit`, `qt report`). The arranging is domain/story and domain/report; this module
fetches."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.domain.dead_letters import letter_row, newest_first
from quantum_trader.domain.report import Report, build_report
from quantum_trader.domain.story import Entry, Event, filter_decisions, id_at, plan_story

# A plan's decisions, consumption and result happen within its window and the order resolution (seconds);
# a late duplicate decision comes within the claim idle time. Two minutes after creation bounds the scan.
STORY_AFTER_S = 120.0
STORY_BEFORE_S = 5.0
SCAN_CHUNK = 1000


class NotFound(Exception):
    """Nothing in the store for what was asked; the message says why (`qt` shows it as one line, exit 1)."""


async def scan(redis: aioredis.Redis, stream: str, start: str, end: str = "+") -> AsyncIterator[Entry]:
    """XRANGE in chunks, so a long period does not arrive as one huge reply."""
    cursor = start
    while True:
        chunk = await redis.xrange(stream, cursor, end, count=SCAN_CHUNK)
        for entry in chunk:
            yield entry
        if len(chunk) < SCAN_CHUNK:
            return
        cursor = f"({chunk[-1][0]}"


async def collect(redis: aioredis.Redis, stream: str, start: str, end: str = "+") -> list[Entry]:
    return [entry async for entry in scan(redis, stream, start, end)]


async def fetch_story(redis: aioredis.Redis, plan_id: str) -> tuple[dict[str, str], list[Event]]:
    plan = await redis.hgetall(keys.plan_record(plan_id))
    if not plan:
        raise NotFound(f"no plan {plan_id} (unknown, or older than the plan records' one-day lifetime)")
    plan.setdefault("plan_id", plan_id)
    created = float(plan.get("created_at") or 0)
    proposal = None
    if plan.get("proposal_entry_id"):
        found = await redis.xrange(keys.PROPOSAL_STREAM, plan["proposal_entry_id"], plan["proposal_entry_id"])
        proposal = found[0] if found else None
    start, end = id_at(created - STORY_BEFORE_S), id_at(created + STORY_AFTER_S)
    audit = await collect(redis, keys.AUDIT_STREAM, start, end)
    result = None
    result_id = await redis.get(keys.result_marker(plan_id))
    if result_id:
        found = await redis.xrange(keys.RESULT_STREAM, result_id, result_id)
        result = found[0] if found else None
    ledger_start = result[0] if result else start
    ledger = await collect(redis, keys.LEDGER_AUDIT_STREAM, ledger_start, id_at(created + STORY_AFTER_S * 2))
    return plan, plan_story(plan, proposal, audit, result, ledger)


async def fetch_decisions(
    redis: aioredis.Redis,
    since_s: float,
    *,
    symbol: str | None,
    issuer: str | None,
    decision: str | None,
    limit: int,
) -> list[Entry]:
    """The newest ``limit`` audit entries of the period that match the filters, oldest first."""
    kept: list[Entry] = []
    async for entry in scan(redis, keys.AUDIT_STREAM, id_at(time.time() - since_s)):
        kept += filter_decisions([entry], symbol=symbol, issuer=issuer, decision=decision)
        if len(kept) > 2 * limit:
            kept = kept[-limit:]
    return kept[-limit:]


async def fetch_report(redis: aioredis.Redis, since_s: float) -> Report:
    until = time.time()
    start = id_at(until - since_s)
    streams = {
        "plans": keys.PLAN_STREAM,
        "results": keys.RESULT_STREAM,
        "audit": keys.AUDIT_STREAM,
        "ledger": keys.LEDGER_AUDIT_STREAM,
        "service_events": keys.SERVICE_EVENTS_STREAM,
    }
    read = {name: await collect(redis, stream, start) for name, stream in streams.items()}
    return build_report(until - since_s, until, **read)


async def fetch_dead_letters(redis: aioredis.Redis, since_s: float, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` dead letters of the period, from every dead-letter stream, newest first."""
    start = id_at(time.time() - since_s)
    rows = []
    for dlq in keys.DEAD_LETTER_STREAMS:
        rows += [letter_row(dlq, entry_id, fields) for entry_id, fields in await collect(redis, dlq, start)]
    return newest_first(rows, limit)
