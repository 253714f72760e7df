"""The audit trail read back from the store: one plan's story, the permit decisions of a period, the 24-hour
report, the dead letters (`qt audit`, `qt report`). The arranging is domain/story and domain/report; this module
fetches."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.domain.dead_letters import letter_row, newest_first
from quantum_trader.domain.report import Report, build_report
from quantum_trader.domain.story import (
    KEPT_IN,
    Entry,
    Event,
    entry_time,
    filter_decisions,
    id_at,
    line_identity,
    merge_local,
    one_per_plan,
    plan_story,
)
from quantum_trader.journal import read_journal

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


@dataclass
class LocalLines:
    """What the local journals in one directory hold (journal.py), by stream, each line with where it was kept
    (``<host>:<service>``); read once per command."""

    by_stream: dict[str, list[tuple[Entry, str]]] = field(default_factory=dict)
    unreadable: dict[str, int] = field(default_factory=dict)  # file -> lines skipped (torn by a crash, not ours)

    def of(self, stream: str, start_s: float, end_s: float = math.inf, plan_id: str = "") -> list[tuple[Entry, str]]:
        return [
            (entry, where)
            for entry, where in self.by_stream.get(stream, ())
            if start_s <= entry_time(*entry) <= end_s and (not plan_id or entry[1].get("plan_id") == plan_id)
        ]


def read_local(directory: Path) -> LocalLines:
    read = read_journal(directory)
    by_stream: dict[str, list[tuple[Entry, str]]] = {}
    for record in read.records:
        by_stream.setdefault(record.stream, []).append(
            ((record.entry_id, record.fields), f"{record.host}:{record.service}")
        )
    return LocalLines(by_stream, read.unreadable)


async def fetch_story(
    redis: aioredis.Redis, plan_id: str, local: LocalLines | None = None
) -> tuple[dict[str, str], list[Event]]:
    """One plan's story from the store, and from the local journals what the store no longer has; a plan the
    store forgot entirely is told from the journals alone."""
    local = local or LocalLines()
    plan = await redis.hgetall(keys.plan_record(plan_id))
    if not plan:
        kept = [
            e for stream in (keys.AUDIT_STREAM, keys.RESULT_STREAM) for e, _ in local.of(stream, 0, plan_id=plan_id)
        ]
        if not kept:
            raise NotFound(f"no plan {plan_id} (unknown, or older than the plan records' one-day lifetime)")
        first = min(kept, key=lambda e: entry_time(*e))[1]
        plan = {"symbol": first.get("symbol", ""), "created_at": repr(entry_time("0-0", first)), KEPT_IN: "journal"}
    plan.setdefault("plan_id", plan_id)
    created = float(plan.get("created_at") or 0)
    proposal = None
    if plan.get("proposal_entry_id"):
        found = await redis.xrange(keys.PROPOSAL_STREAM, plan["proposal_entry_id"], plan["proposal_entry_id"])
        proposal = found[0] if found else None
    start_s, end_s = created - STORY_BEFORE_S, created + STORY_AFTER_S
    audit = await collect(redis, keys.AUDIT_STREAM, id_at(start_s), id_at(end_s))
    audit = merge_local(audit, local.of(keys.AUDIT_STREAM, start_s, end_s, plan_id))
    result = None
    result_id = await redis.get(keys.result_marker(plan_id))
    if result_id:
        found = await redis.xrange(keys.RESULT_STREAM, result_id, result_id)
        result = found[0] if found else None
    if result is None:
        kept_results = merge_local([], local.of(keys.RESULT_STREAM, start_s, math.inf, plan_id))
        result = kept_results[0] if kept_results else None
    ledger_start_s = entry_time(*result) if result else start_s
    ledger_end_s = created + STORY_AFTER_S * 2
    ledger = await collect(redis, keys.LEDGER_AUDIT_STREAM, id_at(ledger_start_s), id_at(ledger_end_s))
    ledger = merge_local(ledger, local.of(keys.LEDGER_AUDIT_STREAM, ledger_start_s, ledger_end_s))
    return plan, plan_story(plan, proposal, audit, result, ledger)


async def fetch_decisions(
    redis: aioredis.Redis,
    since_s: float,
    *,
    symbol: str | None,
    issuer: str | None,
    decision: str | None,
    limit: int,
    local: LocalLines | None = None,
) -> list[Entry]:
    """The newest ``limit`` audit entries of the period that match the filters, oldest first; with the lines
    only the local journals kept."""
    start_s = time.time() - since_s
    only_local = {  # the journals' matching lines, until the store shows it has them too
        line_identity(entry[1]): (entry, where)
        for entry, where in (local or LocalLines()).of(keys.AUDIT_STREAM, start_s)
        if filter_decisions([entry], symbol=symbol, issuer=issuer, decision=decision)
    }
    kept: list[Entry] = []
    async for entry in scan(redis, keys.AUDIT_STREAM, id_at(start_s)):  # in chunks: memory bounded by limit
        if only_local:
            only_local.pop(line_identity(entry[1]), None)
        kept += filter_decisions([entry], symbol=symbol, issuer=issuer, decision=decision)
        if len(kept) > 2 * limit:
            kept = kept[-limit:]
    return merge_local(kept, only_local.values())[-limit:]


async def fetch_report(redis: aioredis.Redis, since_s: float, local: LocalLines | None = None) -> Report:
    """The report of the period, from the store and the lines only the local journals kept."""
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
    kept_locally = {}
    for name, stream in streams.items():
        same = one_per_plan if stream == keys.RESULT_STREAM else None
        merged = merge_local(read[name], (local or LocalLines()).of(stream, until - since_s), same)
        if len(merged) > len(read[name]):
            kept_locally[name] = len(merged) - len(read[name])
        read[name] = merged
    report = build_report(until - since_s, until, **read)
    report.kept_locally = kept_locally
    report.journal_unreadable = dict(local.unreadable) if local else {}
    return report


async def fetch_dead_letters(redis: aioredis.Redis, since_s: float, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` dead letters of the period, from every dead-letter stream, newest first."""
    start = id_at(time.time() - since_s)
    rows = []
    for dlq in keys.DEAD_LETTER_STREAMS:
        rows += [letter_row(dlq, entry_id, fields) for entry_id, fields in await collect(redis, dlq, start)]
    return newest_first(rows, limit)
