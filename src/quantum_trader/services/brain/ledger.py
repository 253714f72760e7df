"""P3.3's ledger in the store: what each change writes (the ledger and its audit line), the results recorded
by the follower, and the reconcile and adoption steps the snapshot poller takes. Each is one optimistic
transaction (WATCH, read, decide with the pure rules of domain/ledger.py, write) that yields to any change made
meanwhile by another P3.3 instance or a permit script."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from quantum_trader.bus import keys
from quantum_trader.bus.replies import in_groups
from quantum_trader.domain.ledger import adopt_outside_growth, apply_result, reconcile
from quantum_trader.domain.models import Ledger, MalformedEntry, Result, from_fields, to_fields


@dataclass(frozen=True, slots=True)
class LedgerChange:
    symbol: str
    before: Ledger | None
    after: Ledger
    why: str
    plan_id: str = ""


def parse_or_none(cls: Any, fields: dict[str, str]) -> Any:
    if not fields:
        return None
    try:
        return from_fields(cls, fields)
    except MalformedEntry:
        return None  # an unreadable snapshot is as good as none (stale); an unreadable ledger as missing


def ledger_audit_fields(change: LedgerChange) -> dict[str, str]:
    """The ledger audit line of a change (the store's, and the local journal's)."""
    return {
        "symbol": change.symbol,
        "before": str(change.before.last_known_amt) if change.before else "none",
        "after": str(change.after.last_known_amt),
        "source": change.why,
        "plan_id": change.plan_id,
        "at": repr(change.after.updated_at),
    }


def queue_ledger_write(pipe: Any, change: LedgerChange, audit_maxlen: int) -> None:
    """Queue the ledger's new state and its audit entry on ``pipe`` (a transaction, executed by the caller)."""
    pipe.hset(keys.ledger(change.symbol), mapping=to_fields(change.after))
    pipe.xadd(keys.LEDGER_AUDIT_STREAM, ledger_audit_fields(change), maxlen=audit_maxlen, approximate=True)


@dataclass(frozen=True, slots=True)
class _RecordReads:
    """What recording results reads: the ledgers fills move, whether each fill was applied, the marks."""

    ledgers: dict[str, Ledger | None]
    applied: list[bool]  # per executed result, in order
    marks: dict[str, str | None]


async def _read_for_record(
    redis: aioredis.Redis, moved: list[str], executed: list[tuple[str, Result]], symbols: list[str]
) -> _RecordReads:
    async with redis.pipeline(transaction=False) as read:
        for symbol in moved:
            read.hgetall(keys.ledger(symbol))
        for entry_id, result in executed:
            read.zscore(keys.ledger_applied(result.symbol), entry_id)
        for symbol in symbols:
            read.get(keys.p33_symbol_in_flight(symbol))
        got = iter(await read.execute())
    ledgers = {symbol: parse_or_none(Ledger, next(got)) for symbol in moved}
    applied = [next(got) is not None for _ in executed]
    return _RecordReads(ledgers, applied, {symbol: next(got) for symbol in symbols})


async def record_results(
    redis: aioredis.Redis, results: list[tuple[str, Result]], clock: Any, audit_maxlen: int
) -> list[LedgerChange]:
    """What P3.3's ledger follower does with results read together, in one transaction:

    - executed fills move their symbol's ledger (each result id once: the applied set), in stream order;
    - each plan's result is remembered as seen (a P3.3 allow decided later must not mark the symbol), and the
      symbol's order-in-flight mark is freed if this plan holds it;
    - the entries are acknowledged.

    Optimistic: the ledgers, applied sets and marks are WATCHed, read (one round trip), and the transaction
    runs again if any of them changed meanwhile (another P3.3 instance, a permit script setting a mark).
    Returns the ledger changes made.
    """
    symbols = list(dict.fromkeys(result.symbol for _, result in results))
    executed = [(entry_id, result) for entry_id, result in results if result.executed]
    moved = list(dict.fromkeys(result.symbol for _, result in executed))
    watched = [keys.ledger(s) for s in moved] + [keys.ledger_applied(s) for s in moved]
    watched += [keys.p33_symbol_in_flight(s) for s in symbols]
    async with redis.pipeline(transaction=True) as tx:
        while True:
            try:
                await tx.watch(*watched)
                # Read on another connection: WATCH catches any change after it, whoever reads.
                reads = await _read_for_record(redis, moved, executed, symbols)
                ledgers, marks = reads.ledgers, reads.marks
                now = clock()
                changes: list[tuple[str, LedgerChange]] = []  # (result entry id, the change it made)
                for (entry_id, result), was_applied in zip(executed, reads.applied, strict=True):
                    applied = frozenset({entry_id}) if was_applied else frozenset()
                    before = ledgers[result.symbol]
                    updated = apply_result(before, result, entry_id, now, applied)
                    if updated is not None:
                        changes.append(
                            (entry_id, LedgerChange(result.symbol, before, updated, "result", result.plan_id))
                        )
                        ledgers[result.symbol] = updated
                tx.multi()
                for entry_id, change in changes:
                    applied_key = keys.ledger_applied(change.symbol)
                    tx.zadd(applied_key, {entry_id: change.after.updated_at})
                    tx.zremrangebyscore(applied_key, "-inf", change.after.updated_at - keys.PLAN_BOOKKEEPING_TTL_S)
                    queue_ledger_write(tx, change, audit_maxlen)
                for _, result in results:
                    tx.set(keys.p33_result_seen(result.plan_id), "1", ex=keys.PLAN_BOOKKEEPING_TTL_S)
                    if marks.get(result.symbol) == result.plan_id:
                        tx.delete(keys.p33_symbol_in_flight(result.symbol))
                        marks[result.symbol] = None
                tx.xack(keys.RESULT_STREAM, keys.LEDGER_GROUP, *(entry_id for entry_id, _ in results))
                await tx.execute()
                return [change for _, change in changes]
            except WatchError:
                continue


async def reconcile_symbol(
    redis: aioredis.Redis, symbol: str, amt: Decimal, asked_at: float, synced_ms: int, audit_maxlen: int
) -> LedgerChange | Literal["unchanged", "later"]:
    """Set the symbol's ledger to the exchange's ``amt``: the change made; "unchanged" when none was needed;
    "later" when the ledger moved after the exchange was asked (a result recorded meanwhile: the reply may not
    show that fill yet, so it is not reconciled now)."""
    key = keys.ledger(symbol)
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                ledger = parse_or_none(Ledger, await pipe.hgetall(key))
                if ledger is not None and ledger.updated_at > asked_at:
                    await pipe.unwatch()
                    return "later"
                # dated when the exchange was asked, like the snapshot written with it
                updated = reconcile(ledger, amt, asked_at, synced_ms)
                if updated is None:
                    await pipe.unwatch()
                    return "unchanged"
                change = LedgerChange(symbol, ledger, updated, "reconcile")
                pipe.multi()
                queue_ledger_write(pipe, change, audit_maxlen)
                await pipe.execute()
                return change
            except WatchError:
                continue


async def adopt_growth(
    redis: aioredis.Redis, symbol: str, seen: Ledger | None, amt: Decimal, now: float, synced_ms: int, audit_maxlen: int
) -> LedgerChange | None:
    """Adopt a position the exchange shows grown outside the chain, unless the ledger moved since ``seen``."""
    key = keys.ledger(symbol)
    async with redis.pipeline(transaction=True) as pipe:
        await pipe.watch(key)
        current = parse_or_none(Ledger, await pipe.hgetall(key))
        updated = adopt_outside_growth(current, amt, now, synced_ms)
        if current != seen or updated is None:  # the ledger moved meanwhile: next poll decides
            await pipe.unwatch()
            return None
        change = LedgerChange(symbol, current, updated, "adopt")
        pipe.multi()
        queue_ledger_write(pipe, change, audit_maxlen)
        try:
            await pipe.execute()
        except WatchError:
            return None
    return change


async def ledgers_and_marks(
    redis: aioredis.Redis, symbols: list[str]
) -> tuple[bool, dict[str, tuple[Ledger | None, str | None]]]:
    """Whether an operator asked for a reconcile, and each symbol's ledger and order-in-flight mark."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.RECONCILE_REQUEST)
        for symbol in symbols:
            pipe.hgetall(keys.ledger(symbol))
            pipe.get(keys.p33_symbol_in_flight(symbol))
        asked, *read = await pipe.execute()
    return bool(asked), {
        symbol: (parse_or_none(Ledger, ledger), mark)
        for symbol, (ledger, mark) in zip(symbols, in_groups(read, 2), strict=True)
    }
