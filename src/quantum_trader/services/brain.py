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
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import WatchError

from quantum_trader.bus import keys
from quantum_trader.bus.streams import dead_letter, ensure_topology
from quantum_trader.domain import reasons
from quantum_trader.domain.brain import BrainInputs, BrainPolicy, BrainVerdict, decide
from quantum_trader.domain.brain.snapshot_age import behind_ledger
from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.domain.ledger import adopt_outside_growth, apply_result, reconcile
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
from quantum_trader.services.base import STORE_ERRORS, Backoff, Service, cancel_and_wait, consume_group
from quantum_trader.services.metrics import BrainMetrics
from quantum_trader.settings import Settings

# The result of plan ARGV[1] has been seen: remember that (an allow decided later must not mark the symbol) and
# free the symbol if this plan holds it. One script, so no allow can slip between the two.
RELEASE_IN_FLIGHT = """
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def policy_from(settings: Settings) -> BrainPolicy:
    b = settings.brain
    return BrainPolicy(
        managed=frozenset(settings.symbols),
        snapshot_max_age_s=b.snapshot_max_age_s,
        qty_tolerance_pct=b.qty_tolerance_pct,
        cooldown_s=b.cooldown_s,
    )


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
        consumer: str = "",
        registry: CollectorRegistry | None = None,
        clock: Any = time.time,
    ) -> None:
        super().__init__(settings, redis, consumer=consumer, clock=clock)
        self.exchange = exchange
        self.metrics = BrainMetrics(registry or CollectorRegistry())
        self.policy = policy_from(settings)
        self.symbols = list(settings.symbols)
        self.ready = asyncio.Event()
        self._release = redis.register_script(RELEASE_IN_FLIGHT)
        self._secret = permit_key(settings, "p33")
        self._filters: dict[str, SymbolFilters] = {}
        self._refresh = asyncio.Event()
        self._snapshot_at: dict[str, float] = {}
        for symbol in self.symbols:
            self.metrics.snapshot_age.labels(symbol).set_function(functools.partial(self.snapshot_age, symbol))

    async def run(self) -> None:
        self.log.info("P3.3 Position State Brain starting (event-driven mode)", consumer=self.consumer)
        await ensure_topology(self.redis)
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
        return time.time() - at if at is not None else float("inf")

    def _store_up(self, up: bool) -> None:
        self.metrics.store_up.set(1 if up else 0)

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
        """Set every managed symbol's ledger to the exchange's position; one audit entry per change."""
        self._filters = await self.exchange.filters()
        positions = await self.exchange.positions(self.symbols)
        now = self._clock()
        changed = 0
        for symbol, position in positions.items():
            ledger = _parse_or_none(Ledger, await self.redis.hgetall(keys.ledger(symbol)))
            updated = reconcile(ledger, position.amt, now)
            if updated is not None:
                await self._write_ledger(symbol, ledger, updated, "reconcile")
                changed += 1
        await self._write_snapshots(positions, now)
        for symbol in positions:
            self.metrics.ledger_drift.labels(symbol).set(0)  # the ledger was just set to the exchange
        self.log.info("ledger reconciled", symbols=len(positions), changed=changed)
        return changed

    async def _write_ledger(self, symbol: str, before: Ledger | None, after: Ledger, why: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            await self._ledger_pipeline(pipe, symbol, before, after, why)

    async def _ledger_pipeline(
        self, pipe: Any, symbol: str, before: Ledger | None, after: Ledger, why: str, plan_id: str = ""
    ) -> None:
        """Write the ledger and its audit entry in one transaction (``pipe`` may be in WATCH/MULTI state)."""
        was = str(before.last_known_amt) if before else "none"
        pipe.hset(keys.ledger(symbol), mapping=to_fields(after))
        pipe.xadd(
            keys.LEDGER_AUDIT_STREAM,
            {
                "symbol": symbol,
                "before": was,
                "after": str(after.last_known_amt),
                "source": why,
                "plan_id": plan_id,
                "at": repr(after.updated_at),
            },
            maxlen=self.settings.audit_maxlen,
            approximate=True,
        )
        await pipe.execute()
        self.metrics.ledger_updates.labels(why).inc()
        log = self.log.bind(plan_id=plan_id) if plan_id else self.log
        log.info(f"{symbol}: ledger {was} -> {after.last_known_amt} ({why})")

    # --- snapshots --------------------------------------------------------------------------------------

    async def _poll_snapshots(self) -> None:
        interval = self.settings.brain.snapshot_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh.wait(), interval)
            self._refresh.clear()
            try:
                await self.refresh_snapshots()
            except ExchangeError as exc:
                self.metrics.snapshot_errors.inc()
                self.log.warning("snapshot poll failed; snapshots will go stale", error=exc.message)
            except STORE_ERRORS as exc:
                self.log.warning("snapshot write failed: store unavailable", error=str(exc))

    async def refresh_snapshots(self) -> None:
        """Poll the exchange, write the snapshots, then follow positions opened outside the chain, or
        reconcile everything when an operator asked for it (``qt brain reconcile``)."""
        if await self.redis.get(keys.RECONCILE_REQUEST):
            await self.reconcile()
            await self.redis.delete(keys.RECONCILE_REQUEST)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for symbol in self.symbols:
                pipe.hgetall(keys.ledger(symbol))
                pipe.get(keys.p33_symbol_in_flight(symbol))
            read = await pipe.execute()
        # Read before the exchange call: a fill applied meanwhile must not be mistaken for outside growth.
        before = {s: (_parse_or_none(Ledger, read[2 * i]), read[2 * i + 1]) for i, s in enumerate(self.symbols)}
        positions = await self.exchange.positions(self.symbols)
        now = self._clock()
        await self._write_snapshots(positions, now)
        for symbol, position in positions.items():
            ledger, in_flight = before[symbol]
            if ledger is not None:
                self.metrics.ledger_drift.labels(symbol).set(float(position.amt - ledger.last_known_amt))
            if in_flight is None and adopt_outside_growth(ledger, position.amt, now) is not None:
                await self._adopt(symbol, ledger, position.amt)

    async def _adopt(self, symbol: str, seen: Ledger | None, exchange_amt: Decimal) -> None:
        key = keys.ledger(symbol)
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            current = _parse_or_none(Ledger, await pipe.hgetall(key))
            updated = adopt_outside_growth(current, exchange_amt, self._clock())
            if current != seen or updated is None:  # the ledger moved meanwhile: next poll decides
                await pipe.unwatch()
                return
            pipe.multi()
            with contextlib.suppress(WatchError):
                await self._ledger_pipeline(pipe, symbol, current, updated, "adopt")

    async def _write_snapshots(self, positions: dict[str, PositionInfo], now: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for symbol, p in positions.items():
                snap = Snapshot(position_amt=p.amt, entry_price=p.entry_price, mark_price=p.mark_price, ts=now)
                pipe.hset(keys.snapshot(symbol), mapping=to_fields(snap))
            await pipe.execute()
        self._snapshot_at.update(dict.fromkeys(positions, now))

    # --- ledger -----------------------------------------------------------------------------------------

    async def handle_result(self, entry_id: str, fields: dict[str, str]) -> None:
        try:
            result = from_fields(Result, fields)
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
            return
        if result.executed:
            await self._apply_to_ledger(result, entry_id)
            self._refresh.set()
        await self._release(
            keys=[keys.p33_symbol_in_flight(result.symbol), keys.p33_result_seen(result.plan_id)],
            args=[result.plan_id, keys.PLAN_BOOKKEEPING_TTL_S],
        )
        await self.redis.xack(keys.RESULT_STREAM, keys.LEDGER_GROUP, entry_id)

    async def _apply_to_ledger(self, result: Result, entry_id: str) -> None:
        key, applied_key = keys.ledger(result.symbol), keys.ledger_applied(result.symbol)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key, applied_key)
                    ledger = _parse_or_none(Ledger, await pipe.hgetall(key))
                    seen = await pipe.zscore(applied_key, entry_id) is not None
                    applied = frozenset({entry_id}) if seen else frozenset()
                    updated = apply_result(ledger, result, entry_id, self._clock(), applied)
                    if updated is None:
                        await pipe.unwatch()
                        return
                    pipe.multi()
                    pipe.zadd(applied_key, {entry_id: updated.updated_at})
                    pipe.zremrangebyscore(applied_key, "-inf", updated.updated_at - keys.PLAN_BOOKKEEPING_TTL_S)
                    await self._ledger_pipeline(pipe, result.symbol, ledger, updated, "result", result.plan_id)
                    return
                except WatchError:
                    continue

    # --- plans ------------------------------------------------------------------------------------------

    async def handle_plan(self, entry_id: str, fields: dict[str, str]) -> None:
        started = time.perf_counter()
        plan = await self.accept_plan(entry_id, fields, keys.P33_GROUP)
        if plan is None:
            self.metrics.dead_letters.labels("plan").inc()
            return
        if plan.decision != "EXECUTE":
            await self.redis.xack(keys.PLAN_STREAM, keys.P33_GROUP, entry_id)
            return
        log = self.log.bind(plan_id=plan.plan_id, symbol=plan.symbol)
        inputs = await self._inputs(plan.symbol)
        if behind_ledger(inputs.snapshot, inputs.ledger):
            # A fill was applied after the last poll: look at the exchange now rather than deny on old data.
            try:
                await self.refresh_snapshots()
                inputs = await self._inputs(plan.symbol)
            except ExchangeError as exc:
                log.warning("snapshot refresh failed; deciding on what is known", error=exc.message)
        now = self._clock()
        verdict = decide(plan, inputs, self.policy, now)
        written, owner = await self._issue(plan, verdict, entry_id, now)
        if not written:
            self.metrics.duplicates.inc()
            await self.audit_duplicate(plan, owner)
            return
        self.metrics.permits.labels("allow" if verdict.allow else "deny", verdict.reason).inc()
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        word = "ALLOW" if verdict.allow else "DENY"
        log.info(
            f"{plan.symbol}: P3.3 {word} {plan.plan_id}",
            reason=verdict.reason,
            safe_close_qty=str(verdict.safe_close_qty),
            exchange_amt=str(verdict.exchange_position_amt),
        )

    async def _inputs(self, symbol: str) -> BrainInputs:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.snapshot(symbol))
            pipe.hgetall(keys.ledger(symbol))
            pipe.get(keys.p33_symbol_in_flight(symbol))
            snap_fields, ledger_fields, in_flight = await pipe.execute()
        return BrainInputs(
            snapshot=_parse_or_none(Snapshot, snap_fields),
            ledger=_parse_or_none(Ledger, ledger_fields),
            in_flight_plan=in_flight,
            filters=self._filters.get(symbol),
        )

    async def _issue(self, plan: Plan, verdict: BrainVerdict, entry_id: str, now: float) -> tuple[bool, str]:
        permit = sign(
            P33Permit(
                allow=verdict.allow,
                symbol=plan.symbol,
                safe_close_qty=float(verdict.safe_close_qty),
                exchange_position_amt=float(verdict.exchange_position_amt),
                ledger_amt=float(verdict.ledger_amt) if verdict.ledger_amt is not None else None,
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
        return await self._scripts.issue_permit(
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
