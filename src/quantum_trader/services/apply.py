"""Apply (P3): proposals become plans; a plan with both permits becomes exactly one reduce-only order.

Per proposal (each in its own task, at most ``max_in_flight`` at once):
1. validate it (bad → dead letter), derive the plan id from the stream entry (a redelivery finds its plan);
2. plan it against the exchange position and publish the plan;
3. wait for both permits, woken by the shared audit reader, bounded by ``permit_wait_ms``;
4. verify both, consume both and mark the plan executed in one atomic step, send one order;
5. publish the one result and acknowledge the proposal in one atomic step.
A restart at any point resumes from the markers of steps 2, 4 and 5 and never repeats an order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import replace
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from quantum_trader.bus import keys
from quantum_trader.bus.streams import STREAM_MAXLEN, dead_letter, ensure_topology
from quantum_trader.domain import reasons
from quantum_trader.domain.execution import SendRecord
from quantum_trader.domain.models import (
    AuditEntry,
    MalformedEntry,
    P33Permit,
    Plan,
    Proposal,
    Result,
    from_fields,
    to_fields,
)
from quantum_trader.domain.numbers import to_decimal
from quantum_trader.domain.permits import SlotCheck, WaitOutcome, check_slot, combine
from quantum_trader.domain.planning import (
    PlanningContext,
    client_order_id,
    make_plan,
    order_side,
    plan_id_for,
    static_skip_reason,
)
from quantum_trader.exchange.base import Exchange, ExchangeError, OrderReport
from quantum_trader.secrets import permit_key
from quantum_trader.services.base import STORE_ERRORS, Backoff, Service, cancel_and_wait, consume_group
from quantum_trader.services.metrics import ApplyMetrics
from quantum_trader.services.orders import OrderExecutor, OrderOutcome
from quantum_trader.services.permit_waiter import PermitWaiter
from quantum_trader.services.position_reads import PositionReads
from quantum_trader.settings import Settings

INTENT_SWEEP_S = 5.0  # how often orders with an unestablished outcome are looked up again


class ApplyService(Service):
    name = "apply"

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
        self.metrics = ApplyMetrics(registry or CollectorRegistry())
        self.waiter = PermitWaiter(redis, self.log)
        self.positions = PositionReads(exchange)
        self.executor = OrderExecutor(
            exchange, self.log, settings.apply.order_resolve_timeout_s, settings.exchange.late_execution_horizon_ms
        )
        self._executing: set[str] = set()  # plans whose order this process is sending or resolving now
        guard = getattr(exchange, "guard", None)
        if guard is not None:
            self.metrics.exchange_banned.set_function(lambda: float(guard.banned_until_ms > exchange.now_ms()))
            self.metrics.exchange_weight.set_function(lambda: float(guard.used_weight))
        self._keys = {"governor": permit_key(settings, "governor"), "p33": permit_key(settings, "p33")}
        self._allowlist = frozenset(settings.symbols)
        self._wait_s = settings.apply.permit_wait_ms / 1000
        self._slots = asyncio.Semaphore(settings.apply.max_in_flight)
        self._active: dict[str, asyncio.Task[None]] = {}

    # --- the loop ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        await ensure_topology(self.redis)
        reader = asyncio.create_task(self.waiter.run(), name="apply-audit-reader")
        sweeper = asyncio.create_task(self._sweep_intents(), name="apply-intent-sweeper")
        try:
            await self.waiter.ready.wait()
            self.log.info("Apply started", consumer=self.consumer, permit_wait_ms=self.settings.apply.permit_wait_ms)
            await consume_group(
                self.redis,
                stream=keys.PROPOSAL_STREAM,
                group=keys.APPLY_GROUP,
                consumer=self.consumer,
                handle=self._dispatch,
                log=self.log,
                store_up=lambda up: self.metrics.store_up.set(1 if up else 0),
                failover=self.failover(keys.PROPOSAL_DLQ, min_idle_s=self._handling_bound_s() + 15),
                service=self.name,
                count=64,
            )
        finally:
            await cancel_and_wait([reader, sweeper, *self._active.values()])

    async def _dispatch(self, entry_id: str, fields: dict[str, str]) -> None:
        """Start handling one proposal concurrently; wait for a free slot first (backpressure)."""
        if entry_id in self._active:  # re-read after a reconnect while still being handled
            return
        await self._slots.acquire()
        task = asyncio.create_task(self._handle_retrying(entry_id, fields), name=f"proposal-{entry_id}")
        self._active[entry_id] = task
        self.metrics.in_flight.set(len(self._active))

        def done(_: asyncio.Task[None]) -> None:
            self._active.pop(entry_id, None)
            self._slots.release()
            self.metrics.in_flight.set(len(self._active))

        task.add_done_callback(done)

    async def _handle_retrying(self, entry_id: str, fields: dict[str, str]) -> None:
        """Handling is idempotent (every step checks its marker), so a store outage just means: again."""
        backoff = Backoff()
        while True:
            try:
                await self.handle_proposal(entry_id, fields)
                return
            except STORE_ERRORS as exc:
                self.log.warning("store unavailable mid-plan, retrying", entry_id=entry_id, error=str(exc))
                await backoff.wait()
            except Exception:
                self.log.exception("unexpected error; proposal left pending", entry_id=entry_id)
                return

    # --- one proposal -----------------------------------------------------------------------------------

    async def handle_proposal(self, entry_id: str, fields: dict[str, str]) -> None:
        try:
            proposal = from_fields(Proposal, fields)
        except MalformedEntry as exc:
            await dead_letter(
                self.redis,
                keys.PROPOSAL_DLQ,
                keys.PROPOSAL_STREAM,
                keys.APPLY_GROUP,
                entry_id,
                fields,
                f"{reasons.MALFORMED_ENTRY}: {exc}",
                "apply",
            )
            self.metrics.dead_letters.inc()
            self.log.warning("malformed proposal dead-lettered", entry_id=entry_id, error=str(exc))
            return
        plan_id = plan_id_for(entry_id, proposal.proposal_id)
        log = self.log.bind(plan_id=plan_id, symbol=proposal.symbol)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys.result_marker(plan_id))
            pipe.hgetall(keys.plan_record(plan_id))
            pipe.get(keys.executed_marker(plan_id))
            has_result, record, executed = await pipe.execute()
        if has_result:
            await self.redis.xack(keys.PROPOSAL_STREAM, keys.APPLY_GROUP, entry_id)
            return
        if record:
            plan = from_fields(Plan, record)
            if executed:
                log.warning(f"{plan.symbol}: recovering plan {plan_id}: executed, no result yet")
                await self._recover(plan, entry_id, executed, log)
            else:
                await self._resume(plan, entry_id, log)
            return
        await self._plan_and_run(proposal, plan_id, entry_id, log)

    async def _plan_and_run(self, proposal: Proposal, plan_id: str, entry_id: str, log: Any) -> None:
        min_score = self.settings.apply.min_kill_score
        position = None
        if static_skip_reason(proposal, self._allowlist, min_score) is None:
            try:
                position = await self.positions.amount(proposal.symbol)
            except ExchangeError as exc:
                log.warning(f"{proposal.symbol}: position unavailable", error=exc.message)
        ctx = PlanningContext(self._allowlist, position, False, min_score)
        started = time.monotonic()  # the permit window runs from the plan's creation, as the seed measures it
        plan = make_plan(proposal, ctx, plan_id, self._clock())
        executing = plan.decision == "EXECUTE"
        if executing:
            self.waiter.register(plan_id)  # before publishing: no decision can slip past unseen
        try:
            published = await self._publish(plan, entry_id)
            if published == "busy":  # another close of this symbol is under way: this plan is a SKIP
                plan = make_plan(proposal, replace(ctx, symbol_busy=True), plan_id, plan.created_at)
                executing = False
                published = await self._publish(plan, entry_id)
            if published == "exists":  # another handler of this very proposal published it: follow that plan
                record = await self.redis.hgetall(keys.plan_record(plan_id))
                await self._resume(from_fields(Plan, record), entry_id, log)
                return
            self.metrics.plans.labels(plan.decision, plan.reason).inc()
            steps = len(json.loads(plan.steps))
            log.info(
                f"{plan.symbol}: Plan {plan_id} published (decision={plan.decision}, steps={steps})",
                reason=plan.reason,
                side=plan.side,
                qty=str(plan.qty),
            )
            if not executing:
                await self._finish(plan, entry_id, self._result(plan, reasons.SKIPPED, reason=plan.reason), log)
                return
            await self._await_and_execute(plan, entry_id, started + self._wait_s, log)
        finally:
            self.waiter.release(plan_id)

    async def _resume(self, plan: Plan, entry_id: str, log: Any) -> None:
        """A plan published before a restart: wait out what is left of its window, never longer."""
        if plan.decision != "EXECUTE":
            await self._finish(plan, entry_id, self._result(plan, reasons.SKIPPED, reason=plan.reason), log)
            return
        left_s = plan.created_at + self._wait_s - self._clock()
        log.info(f"{plan.symbol}: resuming plan {plan.plan_id}", window_left_ms=round(left_s * 1000))
        self.waiter.register(plan.plan_id)
        try:
            await self._await_and_execute(plan, entry_id, time.monotonic() + left_s, log, resumed=True)
        finally:
            self.waiter.release(plan.plan_id)

    def _handling_bound_s(self) -> float:
        """The longest a live handler keeps one proposal: window, sends, lookups, late-execution horizon."""
        return (
            self._wait_s
            + 2 * self.settings.exchange.timeout_ms / 1000
            + self.settings.apply.order_resolve_timeout_s
            + self.settings.exchange.late_execution_horizon_ms / 1000
        )

    async def _publish(self, plan: Plan, entry_id: str) -> str:
        """Publish the plan once; an executing plan takes its symbol in the same step ("busy" if another holds it).

        The hold lasts the whole order path; its TTL only frees a symbol whose Apply died, and an unknown
        outcome makes the hold permanent until resolved."""
        executing = plan.decision == "EXECUTE"
        return await self._scripts.publish_plan(
            plan_id=plan.plan_id,
            fields=to_fields(plan),
            proposal_entry_id=entry_id,
            maxlen=STREAM_MAXLEN,
            hold_key=keys.symbol_in_flight(plan.symbol) if executing else "",
            hold_ms=round((self._handling_bound_s() + 5) * 1000),
        )

    # --- waiting for permits ----------------------------------------------------------------------------

    async def _await_and_execute(
        self, plan: Plan, entry_id: str, deadline: float, log: Any, *, resumed: bool = False
    ) -> None:
        published = time.monotonic()
        window_open = deadline > published
        kind, outcome, checks = await self._wait(plan, deadline, log, check_first=resumed, consume=window_open)
        waited_ms = (time.monotonic() - published) * 1000
        if not resumed:
            self.metrics.permit_wait.labels(kind).observe(waited_ms / 1000)
        if kind == "consumed":
            await self._execute(plan, entry_id, checks[1], deadline, log)
            return
        if kind == "already_executed":
            await self._recover(plan, entry_id, await self.redis.get(keys.executed_marker(plan.plan_id)), log)
            return
        if kind == "denied":
            for check in checks:  # the deny, and the other slot's decision if it came (consumed plans count theirs)
                if check.state in ("allow", "deny"):
                    self.metrics.permit_decisions.labels(check.name, check.state, check.reason).inc()
            who = ", ".join(outcome.denied_by)
            log.warning(f"{plan.symbol}: Permit denied by {who} ({outcome.deny_reason})")
            result = self._result(plan, reasons.PERMIT_DENIED, reason=outcome.deny_reason, denied_by=who)
        elif kind == "ready":  # both permits valid, but only after the window had closed (Apply was down)
            log.warning(f"{plan.symbol}: permits found after the window closed; not executing")
            result = self._result(plan, reasons.WINDOW_EXPIRED)
        else:
            missing = ", ".join(outcome.missing)
            log.warning(f"{plan.symbol}: Permit timeout after {waited_ms:.0f}ms (missing: {missing})")
            for name in outcome.missing:
                self.metrics.timeouts.labels(name).inc()
            result = self._result(plan, reasons.PERMIT_TIMEOUT, missing=missing)
        await self._finish(plan, entry_id, result, log)

    async def _wait(
        self, plan: Plan, deadline: float, log: Any, *, check_first: bool, consume: bool
    ) -> tuple[str, WaitOutcome, tuple[SlotCheck, SlotCheck]]:
        """Wait until both issuers decided, one denied, or the deadline passed (then look one last time).

        Returns ("consumed" | "denied" | "timeout" | "ready" | "already_executed", outcome, slot checks).
        """
        event = self.waiter.register(plan.plan_id)
        audited: set[bytes] = set()
        check_now, final = check_first, False
        while True:
            if check_now:
                event.clear()  # cleared before reading: a decision landing after the read sets it again
                checks = await self._read_slots(plan, audited)
                self.waiter.note_allowed(plan.plan_id, {c.slot for c in checks if c.state == "allow"})
                outcome = combine(*checks)
                if outcome.kind == "denied":
                    return "denied", outcome, checks
                if outcome.kind == "ready":
                    if not consume:
                        return "ready", outcome, checks
                    status = await self._consume(plan, checks)
                    if status in ("consumed", "already_executed"):
                        return status, outcome, checks
                    log.warning("permit changed between check and consume; re-reading", status=status)
                    continue
                if final:
                    return "timeout", outcome, checks
            left = deadline - time.monotonic()
            if left <= 0:
                check_now, final = True, True
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)
            check_now = True

    async def _read_slots(self, plan: Plan, audited: set[bytes]) -> tuple[SlotCheck, SlotCheck]:
        raw_gov, raw_p33 = await self.redis.mget(keys.governor_permit(plan.plan_id), keys.p33_permit(plan.plan_id))
        now = self._clock()
        ttl = self.settings.permit_ttl_s
        checks = (
            check_slot("governor", _raw(raw_gov), plan, self._keys["governor"], now, ttl),
            check_slot("p33", _raw(raw_p33), plan, self._keys["p33"], now, ttl),
        )
        for check in checks:
            if check.state == "rejected" and check.raw is not None and check.raw not in audited:
                audited.add(check.raw)
                await self._audit_rejection(plan, check)
        return checks

    async def _audit_rejection(self, plan: Plan, check: SlotCheck) -> None:
        self.metrics.rejected_permits.labels(check.reason).inc()
        self.log.warning(f"{plan.symbol}: {check.name} permit rejected ({check.reason})", plan_id=plan.plan_id)
        entry = AuditEntry(
            plan_id=plan.plan_id,
            issuer="apply",
            decision="rejected",
            reason=check.reason,
            at=self._clock(),
            symbol=plan.symbol,
            subject=check.slot,
        )
        await self.redis.xadd(
            keys.AUDIT_STREAM,
            to_fields(entry),
            maxlen=self.settings.audit_maxlen,
            approximate=True,
        )

    async def _consume(self, plan: Plan, checks: tuple[SlotCheck, SlotCheck]) -> str:
        governor, p33 = checks
        assert governor.raw is not None and isinstance(p33.permit, P33Permit) and p33.raw is not None
        for check in checks:
            self.metrics.permit_decisions.labels(check.name, check.state, check.reason).inc()
        marker = json.dumps(
            {
                "client_order_id": client_order_id(plan.plan_id),
                "qty": repr(p33.permit.safe_close_qty),
                "side": plan.side,
                "at": self._clock(),
            }
        )
        status = await self._scripts.consume_permits(
            plan_id=plan.plan_id,
            symbol=plan.symbol,
            governor_raw=governor.raw.decode(),
            p33_raw=p33.raw.decode(),
            marker=marker,
            now=self._clock(),
            latency_ms=(self._clock() - plan.created_at) * 1000,
            audit_maxlen=self.settings.audit_maxlen,
        )
        return "consumed" if status == "ok" else status

    # --- the order --------------------------------------------------------------------------------------

    async def _execute(self, plan: Plan, entry_id: str, p33: SlotCheck, deadline: float, log: Any) -> None:
        assert isinstance(p33.permit, P33Permit)
        qty = to_decimal(p33.permit.safe_close_qty)
        coid = client_order_id(plan.plan_id)
        window_end_ms = self.exchange.now_ms() + max(0.0, deadline - time.monotonic()) * 1000
        self._executing.add(plan.plan_id)
        try:
            outcome = await self.executor.execute(plan.symbol, order_side(plan.side), qty, coid, window_end_ms)
            self.metrics.orders.labels(outcome.kind).inc()
            await self._conclude(plan, entry_id, coid, outcome, log)
        finally:
            self._executing.discard(plan.plan_id)

    async def _conclude(self, plan: Plan, entry_id: str, coid: str, outcome: OrderOutcome, log: Any) -> None:
        """Publish the result an order outcome proves; for an unknown one, publish nothing and hold the symbol."""
        if outcome.kind == "unknown":
            # No result until the truth is known: hold the symbol so no other close can stack on this one.
            await self.redis.set(keys.symbol_in_flight(plan.symbol), plan.plan_id)
            log.error(
                f"{plan.symbol}: order {coid} outcome unknown; symbol held, resolving in the background",
                error=outcome.message,
            )
            return
        if outcome.report is not None:
            result = self._from_report(plan, outcome.report)
        else:
            error = {
                "rejected": reasons.EXCHANGE_REJECTED,
                "not_placed": reasons.ORDER_NOT_PLACED,
                "banned": reasons.EXCHANGE_BANNED,
                "throttled": reasons.RATE_LIMITED,
            }[outcome.kind]
            result = self._result(
                plan, error, reason=outcome.message[:200], client_order_id=coid, exchange_code=outcome.code
            )
            (log.error if outcome.kind == "banned" else log.warning)(
                f"{plan.symbol}: order not executed ({error})", code=outcome.code, msg=outcome.message
            )
        await self._finish(plan, entry_id, result, log)

    async def _recover(self, plan: Plan, entry_id: str, marker: str | None, log: Any) -> None:
        """An executed plan without a result (a restart, a racing handler): look the order up, never resend.

        What the other handler sent is unknown here, but not when: every send of a plan, the one resend
        included, leaves before the plan's window ends. So "absent" is final only once a request sent at the
        window's end could no longer land even after an "execution status unknown" answer.
        """
        detail = json.loads(marker) if marker else {}
        coid = str(detail.get("client_order_id") or client_order_id(plan.plan_id))
        skew = self.exchange_skew_ms()
        consumed_at_ms = float(detail.get("at") or plan.created_at) * 1000 - skew
        window_end_ms = (plan.created_at + self._wait_s) * 1000 - skew
        record = SendRecord(
            attempts=2,
            last_sent_ms=max(consumed_at_ms, window_end_ms),
            recv_window_ms=self.exchange.order_recv_window_ms,
            window_end_ms=0,
            late_execution_possible=True,
            max_attempts=2,
            late_horizon_ms=self.executor.late_horizon_ms,
        )
        outcome = await self.executor.resolve(plan.symbol, coid, record)
        assert outcome != "resend"  # attempts == max_attempts: resolve never asks for one
        await self._conclude(plan, entry_id, coid, outcome, log)

    def exchange_skew_ms(self) -> float:
        return time.time() * 1000 - self.exchange.now_ms()

    async def _sweep_intents(self) -> None:
        """Every few seconds (and at start): orders whose outcome is still unestablished, found by client id.

        Covers what a redelivered proposal does not: an unknown outcome that outlived its plan's handler, and
        intents of a consumer that no longer exists (renamed host). Never resends.
        """
        # Older than a whole window plus a whole resolution: no live handler is still working on it.
        stale_s = self._wait_s + self.executor.resolve_timeout_s + 1
        interval = min(INTENT_SWEEP_S, max(0.5, self.executor.resolve_timeout_s / 2))
        while True:
            try:
                due = await self.redis.zrangebyscore(keys.APPLY_INTENTS, "-inf", self._clock() - stale_s)
                self.metrics.unresolved.set(await self.redis.zcard(keys.APPLY_INTENTS))
                for plan_id in due:
                    if plan_id not in self._executing:
                        await self._resolve_intent(plan_id)
            except STORE_ERRORS as exc:
                self.log.warning("intent sweep: store unavailable", error=str(exc))
            await asyncio.sleep(interval)

    async def _resolve_intent(self, plan_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys.result_marker(plan_id))
            pipe.hgetall(keys.plan_record(plan_id))
            pipe.get(keys.executed_marker(plan_id))
            has_result, record, marker = await pipe.execute()
        if has_result or not record:
            await self.redis.zrem(keys.APPLY_INTENTS, plan_id)  # done, or its bookkeeping expired
            return
        plan = from_fields(Plan, record)
        log = self.log.bind(plan_id=plan_id, symbol=plan.symbol)
        self._executing.add(plan_id)
        try:
            await self._recover(plan, record.get("proposal_entry_id", ""), marker, log)
        finally:
            self._executing.discard(plan_id)

    def _from_report(self, plan: Plan, report: OrderReport) -> Result:
        return Result(
            plan_id=plan.plan_id,
            symbol=plan.symbol,
            side=plan.side,
            executed=report.filled,
            error="" if report.filled else reasons.ORDER_NOT_FILLED,
            reason=report.status,
            order_id=report.order_id,
            client_order_id=report.client_order_id,
            filled_qty=report.executed_qty,
            avg_price=report.avg_price,
        )

    def _result(self, plan: Plan, error: str, **fields: Any) -> Result:
        return Result(plan_id=plan.plan_id, symbol=plan.symbol, side=plan.side, executed=False, error=error, **fields)

    async def _finish(self, plan: Plan, entry_id: str, result: Result, log: Any) -> None:
        now = self._clock()
        result = msgspec.structs.replace(result, at=now, latency_ms=round((now - plan.created_at) * 1000, 3))
        published = await self._scripts.publish_result(
            plan_id=plan.plan_id,
            symbol=plan.symbol,
            fields=to_fields(result),
            proposal_entry_id=entry_id,
            result_maxlen=STREAM_MAXLEN,
        )
        if published:
            self.metrics.results.labels("executed" if result.executed else result.error).inc()
            log.info(
                f"{plan.symbol}: Result published (executed={result.executed}, error={result.error or 'none'})",
                filled_qty=str(result.filled_qty),
                order_id=result.order_id,
                latency_ms=result.latency_ms,
            )


def _raw(value: str | None) -> bytes | None:
    return value.encode() if value is not None else None
