"""P3.3 Position State Brain: permit two, from the exchange snapshot and the ledger.

Three loops, started only after the ledger has been reconciled to the exchange (until then nothing is issued):
- plans: consumer group ``p33`` on the plan stream (XREADGROUP BLOCK 1000); decide with the pure
  ``domain.brain.decide``; permit + audit + order-in-flight marker + ack in one atomic script;
- snapshots: poll the exchange every ``snapshot_interval_s`` (and right after each executed result);
- ledger: follow the result stream (own group); executed fills move ``last_known_amt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import WatchError

from quantum_trader.bus import keys
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.bus.scripts import PermitWrite
from quantum_trader.bus.streams import dead_letter, ensure_topology
from quantum_trader.clock import SYSTEM_CLOCK, Clock
from quantum_trader.domain import reasons
from quantum_trader.domain.brain import BrainInputs, BrainPolicy, BrainVerdict, decide_in_order
from quantum_trader.domain.brain.snapshot_age import behind_ledger
from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.domain.ledger import adopt_outside_growth, apply_result, reconcile, synced_at
from quantum_trader.domain.models import (
    AuditEntry,
    Ledger,
    MalformedEntry,
    P33Permit,
    Plan,
    Result,
    Snapshot,
    from_fields,
    to_fields,
)
from quantum_trader.domain.permits import encode_permit, sign
from quantum_trader.exchange.base import Exchange, ExchangeError, PositionInfo
from quantum_trader.secrets import permit_key
from quantum_trader.services.base import STORE_ERRORS, Backoff, Entries, Service, cancel_and_wait, consume_group
from quantum_trader.services.metrics import BrainMetrics
from quantum_trader.settings import Settings


@dataclass(frozen=True, slots=True)
class LedgerChange:
    symbol: str
    before: Ledger | None
    after: Ledger
    why: str
    plan_id: str = ""


def queue_ledger_write(pipe: Any, change: LedgerChange, audit_maxlen: int) -> None:
    """Queue the ledger's new state and its audit entry on ``pipe`` (a transaction, executed by the caller)."""
    pipe.hset(keys.ledger(change.symbol), mapping=to_fields(change.after))
    pipe.xadd(
        keys.LEDGER_AUDIT_STREAM,
        {
            "symbol": change.symbol,
            "before": str(change.before.last_known_amt) if change.before else "none",
            "after": str(change.after.last_known_amt),
            "source": change.why,
            "plan_id": change.plan_id,
            "at": repr(change.after.updated_at),
        },
        maxlen=audit_maxlen,
        approximate=True,
    )


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
                async with redis.pipeline(transaction=False) as read:
                    for symbol in moved:
                        read.hgetall(keys.ledger(symbol))
                    for entry_id, result in executed:
                        read.zscore(keys.ledger_applied(result.symbol), entry_id)
                    for symbol in symbols:
                        read.get(keys.p33_symbol_in_flight(symbol))
                    got = await read.execute()
                ledgers = {s: _parse_or_none(Ledger, got[n]) for n, s in enumerate(moved)}
                scores = got[len(moved) : len(moved) + len(executed)]
                marks = dict(zip(symbols, got[len(moved) + len(executed) :], strict=True))
                now = clock()
                changes: list[tuple[str, LedgerChange]] = []  # (result entry id, the change it made)
                for (entry_id, result), score in zip(executed, scores, strict=True):
                    applied = frozenset({entry_id}) if score is not None else frozenset()
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


SNAPSHOT_ATTEMPTS = 2  # polls a plan asks for before it is decided on the snapshot it has
RESULTS_CATCH_UP_S = 1.0  # how long a plan on a symbol marked for a finished plan waits for its result's record
RESULTS_POLL_S = 0.01  # how often it looks again meanwhile (another instance may be the one recording)
# Deny reasons that a result on its way to the ledger can explain (the exchange already shows the fill).
LEDGER_DISAGREES = frozenset({reasons.QTY_MISMATCH, reasons.SIDE_MISMATCH})


def policy_from(settings: Settings) -> BrainPolicy:
    b = settings.brain
    return BrainPolicy(
        managed=frozenset(settings.symbols),
        snapshot_max_age_s=b.snapshot_max_age_s,
        qty_tolerance_pct=b.qty_tolerance_pct,
        cooldown_s=b.cooldown_s,
    )


def _verdict_details(verdict: BrainVerdict) -> dict[str, str]:
    return {"safe_close_qty": str(verdict.safe_close_qty), "exchange_amt": str(verdict.exchange_position_amt)}


def _parse_or_none(cls: Any, fields: dict[str, str]) -> Any:
    if not fields:
        return None
    try:
        return from_fields(cls, fields)
    except MalformedEntry:
        return None  # an unreadable snapshot is as good as none (stale); an unreadable ledger as missing


class BrainService(Service):
    name = "p33"

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        exchange: Exchange,
        *,
        watch: StoreWatch | None = None,
        consumer: str = "",
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(settings, redis, consumer=consumer, clock=clock)
        self.exchange = exchange
        self.metrics = BrainMetrics(registry or CollectorRegistry())
        self.policy = policy_from(settings)
        self.symbols = list(settings.symbols)
        self.ready = asyncio.Event()
        self._secret = permit_key(settings, "p33")
        self._filters: dict[str, SymbolFilters] = {}
        self._refresh = asyncio.Event()
        self._snapshot_at: dict[str, float] = {}  # per symbol: when the request behind its snapshot was sent
        self._dirty: set[str] = set()  # symbols asked for by the next poll
        self._polled_since = 0.0  # the start of the latest poll that ended
        self._polls_done = asyncio.Condition()
        # the store is another instance: its ledgers may have lost results (asked for, and done, in order)
        self._reconcile_asks = self._reconciled = 0
        for symbol in self.symbols:
            self.metrics.snapshot_age.labels(symbol).set_function(functools.partial(self.snapshot_age, symbol))
        if watch is not None:
            watch.subscribe(self._store_changed)  # last: a change already seen is delivered at once

    async def run(self) -> None:
        self.log.info("P3.3 Position State Brain starting (event-driven mode)", consumer=self.consumer)
        await self.until_store(lambda: ensure_topology(self.redis))
        await self._reconcile_until_done()
        self.ready.set()
        self.metrics.ready.set(1)
        self.log.info(f"Consumer group: {keys.P33_GROUP} on {keys.PLAN_STREAM}")
        store_up = self._store_up
        loops = [
            asyncio.create_task(self._poll_snapshots(), name="p33-snapshots"),
            asyncio.create_task(
                consume_group(
                    self.redis,
                    stream=keys.RESULT_STREAM,
                    group=keys.LEDGER_GROUP,
                    consumer=self.consumer,
                    handle=self.handle_result,
                    handle_batch=self.handle_results,
                    log=self.log,
                    store_up=store_up,
                    failover=self.failover(keys.RESULT_DLQ),
                    service=self.name,
                ),
                name="p33-ledger",
            ),
            asyncio.create_task(
                consume_group(
                    self.redis,
                    stream=keys.PLAN_STREAM,
                    group=keys.P33_GROUP,
                    consumer=self.consumer,
                    handle=self.handle_plan,
                    log=self.log,
                    store_up=store_up,
                    failover=self.failover(keys.PLAN_DLQ),
                    service=self.name,
                    block_ms=1000,
                    handle_batch=self.handle_plans,
                ),
                name="p33-plans",
            ),
        ]
        try:
            await asyncio.gather(*loops)
        finally:
            await cancel_and_wait(loops)

    def snapshot_age(self, symbol: str) -> float:
        """Seconds since the symbol's snapshot was written by this instance (inf before the first)."""
        at = self._snapshot_at.get(symbol)
        return self._clock.wall() - at if at is not None else float("inf")

    def _store_up(self, up: bool) -> None:
        self.metrics.store_up.set(1 if up else 0)

    def _store_changed(self, before: Any, after: Any, new_epoch: bool = False) -> None:
        """Another store instance than before (a restart from older data, a failover): the ledgers may lack
        results it forgot. Reconcile them to the exchange at the next poll (fills already counted by the
        reconcile are not counted again when their results come: domain/ledger.py)."""
        if before is None:
            return
        self.log.warning("the store is another instance than before: reconciling the ledger", run_id=after.run_id)
        self._reconcile_asks += 1
        self.ask_refresh(self.symbols)

    # --- reconcile on start -----------------------------------------------------------------------------

    async def _reconcile_until_done(self) -> None:
        backoff = Backoff()
        while True:
            try:
                await self.reconcile()
                return
            except (ExchangeError, *STORE_ERRORS) as exc:
                message = exc.message if isinstance(exc, ExchangeError) else str(exc)
                self.log.warning("reconcile failed; issuing nothing until it succeeds", error=message)
                await backoff.wait()

    async def reconcile(self) -> int:
        """Set every managed symbol's ledger to the exchange's position; one audit entry per change. A ledger
        that moved after the exchange was asked (a result recorded meanwhile) is left for the next poll: the
        reply may not show that fill yet."""
        self._filters = await self.exchange.filters()
        asked_at, asked_ms = self._clock.wall(), self.exchange.now_ms()
        positions = await self.exchange.positions(self.symbols)
        changed = skipped = 0
        for symbol, position in positions.items():
            done = await self._reconcile_one(symbol, position, asked_at, synced_at(position.update_time_ms, asked_ms))
            changed += done is True
            skipped += done is None
        if skipped:  # a ledger moved while the exchange was read: reconcile again at the next poll
            self._reconcile_asks += 1
        await self._write_snapshots(positions, asked_at)
        for symbol in positions:
            self.metrics.ledger_drift.labels(symbol).set(0)  # the ledger was just set to the exchange
        self.log.info("ledger reconciled", symbols=len(positions), changed=changed)
        return changed

    async def _reconcile_one(self, symbol: str, position: PositionInfo, asked_at: float, synced_ms: int) -> bool | None:
        """Whether the ledger changed; None when it moved after the exchange was asked (not reconciled now)."""
        key = keys.ledger(symbol)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    ledger = _parse_or_none(Ledger, await pipe.hgetall(key))
                    if ledger is not None and ledger.updated_at > asked_at:
                        await pipe.unwatch()
                        return None
                    # dated when the exchange was asked, like the snapshot written with it
                    updated = reconcile(ledger, position.amt, asked_at, synced_ms)
                    if updated is None:
                        await pipe.unwatch()
                        return False
                    change = LedgerChange(symbol, ledger, updated, "reconcile")
                    pipe.multi()
                    queue_ledger_write(pipe, change, self.settings.audit_maxlen)
                    await pipe.execute()
                    self._ledger_moved(change)
                    return True
                except WatchError:
                    continue

    def _ledger_moved(self, change: LedgerChange) -> None:
        self.metrics.ledger_updates.labels(change.why).inc()
        log = self.log.bind(plan_id=change.plan_id) if change.plan_id else self.log
        was = change.before.last_known_amt if change.before else "none"
        log.info(f"{change.symbol}: ledger {was} -> {change.after.last_known_amt} ({change.why})")

    # --- snapshots --------------------------------------------------------------------------------------

    async def _poll_snapshots(self) -> None:
        """Every ``snapshot_interval_s`` all symbols; in between, as soon as asked, the symbols asked for (a
        fill's, or a plan's waiting for a snapshot newer than its ledger): one small request each time."""
        interval = self.settings.brain.snapshot_interval_s
        next_full = self._clock.mono() + interval  # reconcile wrote every snapshot just before this loop starts
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), max(0.0, next_full - self._clock.mono()))
            self._refresh.clear()
            # asked-for symbols only, unless the full poll is due (fills must not starve the other symbols)
            full = self._clock.mono() >= next_full
            symbols = [] if full else [s for s in self.symbols if s in self._dirty]
            self._dirty.clear()
            if full or not symbols:
                next_full = self._clock.mono() + interval
            started = self._clock.wall()
            try:
                await self.refresh_snapshots(symbols or None)
            except ExchangeError as exc:
                self.metrics.snapshot_errors.inc()
                self.log.warning("snapshot poll failed; snapshots will go stale", error=exc.message)
            except STORE_ERRORS as exc:
                self.log.warning("snapshot write failed: store unavailable", error=str(exc))
            finally:
                self._polled_since = started  # the start of the latest poll that ended, written or failed
                async with self._polls_done:
                    self._polls_done.notify_all()

    def ask_refresh(self, symbols: list[str]) -> None:
        self._dirty.update(symbols)
        self._refresh.set()

    async def refresh_snapshots(self, symbols: list[str] | None = None) -> None:
        """Poll the exchange for ``symbols`` (default: all), write the snapshots, then follow positions opened
        outside the chain; or reconcile everything when an operator asked for it (``qt brain reconcile``)."""
        symbols = symbols or self.symbols
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.RECONCILE_REQUEST)
            for symbol in symbols:
                pipe.hgetall(keys.ledger(symbol))
                pipe.get(keys.p33_symbol_in_flight(symbol))
            reconcile_asked, *read = await pipe.execute()
        asks = self._reconcile_asks
        if reconcile_asked or asks > self._reconciled:
            await self.reconcile()  # on failure nothing is marked done: the next poll tries again
            self._reconciled = asks
            if reconcile_asked:
                await self.redis.delete(keys.RECONCILE_REQUEST)
            return
        # Read before the exchange call: a fill applied meanwhile must not be mistaken for outside growth.
        before = {s: (_parse_or_none(Ledger, read[2 * i]), read[2 * i + 1]) for i, s in enumerate(symbols)}
        # The snapshot's time is when the request was sent: a reply can only show fills that happened before it
        # arrived, and every fill whose result P3.3 applied after this moment may be missing from it.
        asked_at, asked_ms = self._clock.wall(), self.exchange.now_ms()
        positions = await self.exchange.positions(symbols)
        await self._write_snapshots(positions, asked_at)
        for symbol, position in positions.items():
            ledger, in_flight = before[symbol]
            if ledger is not None:
                self.metrics.ledger_drift.labels(symbol).set(float(position.amt - ledger.last_known_amt))
            if in_flight is None and adopt_outside_growth(ledger, position.amt, asked_at) is not None:
                await self._adopt(symbol, ledger, position.amt, synced_at(position.update_time_ms, asked_ms))

    async def _adopt(self, symbol: str, seen: Ledger | None, exchange_amt: Decimal, synced_ms: int) -> None:
        key = keys.ledger(symbol)
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            current = _parse_or_none(Ledger, await pipe.hgetall(key))
            updated = adopt_outside_growth(current, exchange_amt, self._clock.wall(), synced_ms)
            if current != seen or updated is None:  # the ledger moved meanwhile: next poll decides
                await pipe.unwatch()
                return
            change = LedgerChange(symbol, current, updated, "adopt")
            pipe.multi()
            queue_ledger_write(pipe, change, self.settings.audit_maxlen)
            try:
                await pipe.execute()
            except WatchError:
                return
        self._ledger_moved(change)

    async def _write_snapshots(self, positions: dict[str, PositionInfo], now: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for symbol, p in positions.items():
                snap = Snapshot(position_amt=p.amt, entry_price=p.entry_price, mark_price=p.mark_price, ts=now)
                pipe.hset(keys.snapshot(symbol), mapping=to_fields(snap))
            await pipe.execute()
        self._snapshot_at.update(dict.fromkeys(positions, now))

    async def _snapshots_since(self, symbols: list[str], since: float) -> bool:
        """Ask the poller for snapshots of ``symbols`` asked for at or after ``since`` and wait for them. Plans
        arriving together share one exchange request instead of each making their own. A poll that fails
        (a connection the store restart broke, a 5xx) is asked for once more; False when that one fails too
        (or wrote older snapshots: another instance's ledger clock is ahead), or after the exchange timeout."""

        def fresh() -> bool:
            return all(self._snapshot_at.get(symbol, 0.0) >= since for symbol in symbols)

        deadline = self._clock.mono() + self.settings.exchange.timeout_ms / 1000 + 1
        for _ in range(SNAPSHOT_ATTEMPTS):
            self.ask_refresh(symbols)
            # a poll started after this includes these symbols (it takes the asked-for ones at its start)
            answered = functools.partial(self._answered, fresh, self._clock.wall())
            async with self._polls_done:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._polls_done.wait_for(answered), max(0.0, deadline - self._clock.mono()))
            if fresh() or self._clock.mono() >= deadline:
                break
        return fresh()

    def _answered(self, fresh: Callable[[], bool], asked: float) -> bool:
        return fresh() or self._polled_since >= asked

    # --- ledger -----------------------------------------------------------------------------------------

    async def handle_result(self, entry_id: str, fields: dict[str, str]) -> None:
        await self.handle_results([(entry_id, fields)])

    async def handle_results(self, entries: Entries) -> None:
        """Results read together: malformed ones dead-lettered, the rest recorded in one transaction; then a
        snapshot is asked for each symbol a fill moved."""
        results = []
        for entry_id, fields in entries:
            try:
                results.append((entry_id, from_fields(Result, fields)))
            except MalformedEntry as exc:
                await dead_letter(
                    self.redis,
                    keys.RESULT_DLQ,
                    keys.RESULT_STREAM,
                    keys.LEDGER_GROUP,
                    entry_id,
                    fields,
                    f"{reasons.MALFORMED_ENTRY}: {exc}",
                    "p33",
                )
                self.metrics.dead_letters.labels("result").inc()
                self.log.warning("malformed result dead-lettered", entry_id=entry_id, error=str(exc))
        if not results:
            return
        for change in await record_results(self.redis, results, self._clock.wall, self.settings.audit_maxlen):
            self._ledger_moved(change)
        moved = [result.symbol for _, result in results if result.executed]
        if moved:
            self.ask_refresh(moved)

    # --- plans ------------------------------------------------------------------------------------------

    async def handle_plan(self, entry_id: str, fields: dict[str, str]) -> None:
        await self.handle_plans([(entry_id, fields)])

    async def handle_plans(self, entries: Entries) -> None:
        """Decide the plans of one read: inputs per symbol in one round trip, the decisions in order (an allow
        marks its symbol for the plans after it), the permits in one more round trip.

        A symbol marked in flight for a plan whose result is already published but not yet recorded in the
        ledger (a client saw the result and proposed again at once) waits for the ledger follower, up to 1 s;
        the plans of the other symbols are decided first, so they do not wait with it."""
        started = time.perf_counter()
        plans, dead = await self.accept_plans(entries, keys.P33_GROUP)
        if dead:
            self.metrics.dead_letters.labels("plan").inc(dead)
        if not plans:
            return
        inputs, unrecorded = await self._inputs(list(dict.fromkeys(plan.symbol for _, plan in plans)), follower=True)
        deciding = {plan.plan_id for _, plan in plans}
        marks = {
            s: got.in_flight_plan
            for s, got in inputs.items()
            if got.in_flight_plan is not None and got.in_flight_plan not in deciding
        }
        # only while results wait to be recorded can a mark belong to a finished plan
        finishing = await self._results_published(marks) if unrecorded else {}
        now_plans = [(entry_id, plan) for entry_id, plan in plans if plan.symbol not in finishing]
        if now_plans:
            await self._decide(now_plans, inputs, started, unrecorded)
        later = [(entry_id, plan) for entry_id, plan in plans if plan.symbol in finishing]
        if later:
            await self._until_recorded(finishing)
            inputs.update((await self._inputs(list(finishing)))[0])
            await self._decide(later, inputs, started, unrecorded=False)

    async def _decide(
        self, plans: list[tuple[str, Plan]], inputs: dict[str, BrainInputs], started: float, unrecorded: bool
    ) -> None:
        """Decide and issue. While results wait to be recorded, a ledger that disagrees with the exchange may
        only be behind a fill whose result is on its way: those symbols wait for the ledger follower (at most
        ``RESULTS_CATCH_UP_S``) and are decided again on what it then holds, instead of being denied now."""
        verdicts = await self._verdicts(plans, inputs)
        waiting: set[str] = set()
        if unrecorded:
            waiting = {p.symbol for (_, p), v in zip(plans, verdicts, strict=True) if v.reason in LEDGER_DISAGREES}
        now_plans = [(pair, v) for pair, v in zip(plans, verdicts, strict=True) if pair[1].symbol not in waiting]
        if now_plans:
            await self._issue([pair for pair, _ in now_plans], [v for _, v in now_plans], started)
        later = [pair for pair in plans if pair[1].symbol in waiting]
        if later:
            await self._until_results_recorded()
            inputs.update((await self._inputs(list(waiting)))[0])
            await self._issue(later, await self._verdicts(later, inputs), started)

    async def _verdicts(self, plans: list[tuple[str, Plan]], inputs: dict[str, BrainInputs]) -> list[BrainVerdict]:
        symbols = list(dict.fromkeys(plan.symbol for _, plan in plans))
        ledgers = {s: inputs[s].ledger for s in symbols}
        behind = {  # symbol -> when its ledger last moved, for those whose snapshot predates that
            s: ledger.updated_at
            for s, ledger in ledgers.items()
            if ledger is not None and behind_ledger(inputs[s].snapshot, ledger)
        }
        if behind:
            # A fill was applied after the last poll: look at the exchange now rather than deny on old data.
            if not await self._snapshots_since(list(behind), max(behind.values())):
                self.log.warning("no fresh snapshot within the exchange timeout; deciding on what is known")
            inputs.update((await self._inputs(list(behind)))[0])
        return decide_in_order(
            [plan for _, plan in plans], [inputs[p.symbol] for _, p in plans], self.policy, self._clock.wall()
        )

    async def _issue(self, plans: list[tuple[str, Plan]], verdicts: list[BrainVerdict], started: float) -> None:
        now = self._clock.wall()
        writes = [
            self._permit_write(plan, verdict, entry_id, now)
            for (entry_id, plan), verdict in zip(plans, verdicts, strict=True)
        ]
        await self.issue_decisions(plans, verdicts, writes, started, _verdict_details)

    async def _until_results_recorded(self) -> None:
        """Wait until the ledger follower group has no result left to record (no lag, nothing pending), looking
        every 10 ms, at most ``RESULTS_CATCH_UP_S``."""
        deadline = self._clock.mono() + RESULTS_CATCH_UP_S
        while self._clock.mono() < deadline:
            await asyncio.sleep(RESULTS_POLL_S)
            groups = await self.redis.xinfo_groups(keys.RESULT_STREAM)
            ledger = [g for g in groups if g["name"] == keys.LEDGER_GROUP]
            if not ledger or (not ledger[0]["pending"] and ledger[0].get("lag") == 0):
                return

    async def _results_published(self, marks: dict[str, str]) -> dict[str, str]:
        """Of the symbols marked in flight (symbol -> marking plan), those whose plan has its result published
        (Apply's result marker, set in the script that publishes the result)."""
        if not marks:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for plan_id in marks.values():
                pipe.exists(keys.result_marker(plan_id))
            published = await pipe.execute()
        return {symbol: plan_id for (symbol, plan_id), out in zip(marks.items(), published, strict=True) if out}

    async def _until_recorded(self, finishing: dict[str, str]) -> None:
        """Wait until the results of these finished plans are recorded (the follower's "result seen" key, written
        in the same transaction as the ledger: by this instance or another), looking every 10 ms, at most
        ``RESULTS_CATCH_UP_S``. Not for the mark to go: its TTL can free the symbol before the ledger has the fill."""
        seen_keys = [keys.p33_result_seen(plan_id) for plan_id in finishing.values()]
        deadline = self._clock.mono() + RESULTS_CATCH_UP_S
        while self._clock.mono() < deadline:
            await asyncio.sleep(RESULTS_POLL_S)
            if await self.redis.exists(*seen_keys) == len(seen_keys):
                return

    async def _inputs(self, symbols: list[str], follower: bool = False) -> tuple[dict[str, BrainInputs], bool]:
        """Snapshot, ledger and in-flight mark of each symbol, in one pipelined round trip. With ``follower``,
        also whether results were published that no P3.3 instance has recorded yet (the ledger group's lag or
        pending entries; asked first, so the marks read after it include every result recorded by then)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            if follower:
                pipe.xinfo_groups(keys.RESULT_STREAM)
            for symbol in symbols:
                pipe.hgetall(keys.snapshot(symbol))
                pipe.hgetall(keys.ledger(symbol))
                pipe.get(keys.p33_symbol_in_flight(symbol))
            read = await pipe.execute(raise_on_error=False)
        groups = read.pop(0) if follower else []
        for reply in read:
            if isinstance(reply, Exception):
                raise reply
        if isinstance(groups, Exception):
            if "no such key" not in str(groups).lower():
                raise groups
            groups = []  # no result stream (yet, or after a flush): no result waits to be recorded
        ledger_group = [g for g in groups if g["name"] == keys.LEDGER_GROUP]
        # lag None means unknown (after a trim or a deleted entry): assume results wait
        unrecorded = bool(ledger_group) and (bool(ledger_group[0]["pending"]) or ledger_group[0].get("lag") != 0)
        inputs = {
            symbol: BrainInputs(
                snapshot=_parse_or_none(Snapshot, read[3 * n]),
                ledger=_parse_or_none(Ledger, read[3 * n + 1]),
                in_flight_plan=read[3 * n + 2],
                filters=self._filters.get(symbol),
            )
            for n, symbol in enumerate(symbols)
        }
        return inputs, unrecorded

    def _permit_write(self, plan: Plan, verdict: BrainVerdict, entry_id: str, now: float) -> PermitWrite:
        permit = sign(
            P33Permit(
                allow=verdict.allow,
                symbol=plan.symbol,
                safe_close_qty=verdict.safe_close_qty,
                exchange_position_amt=verdict.exchange_position_amt,
                ledger_amt=verdict.ledger_amt,
                created_at=now,
                reason=verdict.reason,
                plan_id=plan.plan_id,
                plan_hash=plan.plan_hash,
                issuer="p33",
            ),
            self._secret,
        )
        audit = AuditEntry(
            plan_id=plan.plan_id,
            issuer="p33",
            decision="allow" if verdict.allow else "deny",
            reason=verdict.reason,
            at=now,
            latency_ms=round((now - plan.created_at) * 1000, 3),
            symbol=plan.symbol,
        )
        return PermitWrite(
            claim_key=keys.decision_claim("p33", plan.plan_id),
            claim_value=f"p33:{self.consumer}:{entry_id}",
            permit_key=keys.p33_permit(plan.plan_id),
            permit_json=encode_permit(permit).decode(),
            permit_ttl_s=self.settings.permit_ttl_s,
            audit_fields=to_fields(audit),
            audit_maxlen=self.settings.audit_maxlen,
            group=keys.P33_GROUP,
            entry_id=entry_id,
            mark_key=keys.p33_symbol_in_flight(plan.symbol) if verdict.allow else "",
            mark_value=plan.plan_id,
            mark_ttl_s=int(self.settings.brain.cooldown_s) or 1,
            # the Governor may have denied already and the result gone by: then no result will release a mark
            mark_unless=keys.p33_result_seen(plan.plan_id),
        )
