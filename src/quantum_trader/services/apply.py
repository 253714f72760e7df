"""Apply (P3): proposals become plans; a plan with both permits becomes exactly one reduce-only order.

Per proposal (each in its own task, at most ``max_in_flight`` at once):
1. validate it (bad → dead letter), derive the plan id from the stream entry (a redelivery finds its plan);
2. if the store cannot vouch for the plan (its proposal is older than the store instance: domain/trust.py),
   ask the exchange first: an order found with the plan's client id is the plan's outcome;
3. plan it against the exchange position and publish the plan;
4. wait for both permits, woken by the shared audit reader, bounded by ``permit_wait_ms``;
5. verify both, consume both and mark the plan executed in one atomic step, send one order;
6. publish the one result and acknowledge the proposal in one atomic step.
A restart at any point resumes from the markers of steps 3, 5 and 6 and never repeats an order; a store that
forgot them is caught by step 2 (and checked again before the send and before a not-executed result).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from enum import Enum
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from quantum_trader.bus import keys
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.bus.streams import STREAM_MAXLEN, dead_letter, ensure_topology
from quantum_trader.clock import SYSTEM_CLOCK, Clock
from quantum_trader.domain import reasons
from quantum_trader.domain.execution import SendRecord, is_final
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
from quantum_trader.domain.permits import SlotCheck, WaitOutcome, check_slot, combine
from quantum_trader.domain.planning import (
    PlanningContext,
    client_order_id,
    close_side,
    is_plan_id,
    make_plan,
    order_side,
    plan_id_for,
    static_skip_reason,
)
from quantum_trader.domain.text import to_bytes
from quantum_trader.domain.trust import Epoch, StoreIdentity, prior_sends_signed_before, trusted
from quantum_trader.exchange.base import Exchange, ExchangeError, OrderReport
from quantum_trader.secrets import permit_key
from quantum_trader.services.base import STORE_ERRORS, Backoff, Service, cancel_and_wait, consume_group
from quantum_trader.services.metrics import ApplyMetrics
from quantum_trader.services.orders import OrderExecutor, OrderOutcome, OutcomeKind
from quantum_trader.services.permit_waiter import PermitWaiter
from quantum_trader.services.position_reads import PositionReads
from quantum_trader.settings import Settings

INTENT_SWEEP_S = 5.0  # how often orders with an unestablished outcome are looked up again
# The search for orders a forgetful store lost: from a minute before its newest surviving proposal (the two
# clocks differ by milliseconds, a minute covers any skew), and never further back than the plans' bookkeeping
# lives (beyond it, results of old plans are gone from the store on purpose: they must not be re-published).
ORPHAN_SEARCH_MARGIN_S = 60.0
ORPHAN_SEARCH_MAX_S = keys.PLAN_BOOKKEEPING_TTL_S - 3600
TRUTH_RETRY_MAX_S = 5.0  # while the exchange cannot say whether a plan's order exists, ask again this often

NOT_EXECUTED = {
    OutcomeKind.REJECTED: reasons.EXCHANGE_REJECTED,
    OutcomeKind.NOT_PLACED: reasons.ORDER_NOT_PLACED,
    OutcomeKind.NOT_SENT: reasons.ORDER_NOT_SENT,
    OutcomeKind.BANNED: reasons.EXCHANGE_BANNED,
    OutcomeKind.THROTTLED: reasons.RATE_LIMITED,
}


class WaitEnd(Enum):
    """How a plan's wait for its permits ended."""

    CONSUMED = "consumed"  # both valid, consumed: send the order
    ALREADY_EXECUTED = "already_executed"  # another handler consumed them: recover its outcome
    ALREADY_FINISHED = "already_finished"  # the plan has its result already
    DENIED = "denied"
    TIMEOUT = "timeout"
    READY_LATE = "ready_late"  # both valid, but only after the window had closed (Apply was down)


@dataclass
class PlanRun:
    """One plan being handled. ``vouched`` is the store epoch in which the store's records of the plan were
    known complete (its proposal is newer than the epoch, or the exchange was asked); None: not (yet)."""

    plan: Plan
    entry_id: str
    log: Any
    vouched: Epoch | None


class ApplyService(Service):
    name = "apply"

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        exchange: Exchange,
        *,
        watch: StoreWatch,
        consumer: str = "",
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(settings, redis, consumer=consumer, clock=clock)
        if not watch.record_epoch:
            raise ValueError("Apply needs a StoreWatch that records the store's epoch (record_epoch=True)")
        self.exchange = exchange
        self.watch = watch
        self.metrics = ApplyMetrics(registry or CollectorRegistry())
        self.waiter = PermitWaiter(redis, self.log)
        self.positions = PositionReads(exchange)
        self.executor = OrderExecutor(
            exchange,
            self.log,
            settings.apply.order_resolve_timeout_s,
            settings.exchange.late_execution_horizon_ms,
            clock,
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
        self._orphan_search = asyncio.Event()  # set while the store instance's forgotten orders are not searched
        watch.subscribe(self._store_changed)  # last: a change already seen is delivered at once

    # --- the loop ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        await self.until_store(lambda: ensure_topology(self.redis))
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
                failover=replace(
                    self.failover(keys.PROPOSAL_DLQ, min_idle_s=self._handling_bound_s() + 15),
                    poisoned=self._dispatch_poisoned,
                ),
                service=self.name,
                count=64,
            )
        finally:
            await cancel_and_wait([reader, sweeper, *self._active.values()])

    def _store_changed(self, before: StoreIdentity | None, after: StoreIdentity, unsearched: bool) -> None:
        """A connection reached another store instance than before: plans published on the old one are looked
        up before they are sent, and the audit reader starts again at the new stream's end. While nobody has
        searched the exchange for orders the instance may have forgotten, this Apply does."""
        if unsearched:
            self._orphan_search.set()
        if before is None or before == after:
            return
        self.metrics.store_changes.set(self.watch.changes)
        self.log.warning(
            "the store is another instance than before (restart or failover): plans it cannot vouch for are "
            "looked up on the exchange",
            run_id=after.run_id,
            previous_run_id=before.run_id,
        )
        self.waiter.restart()

    async def _dispatch(self, entry_id: str, fields: dict[str, str]) -> None:
        await self._start(entry_id, self._handle_retrying(entry_id, fields))

    async def _dispatch_poisoned(self, entry_id: str, fields: dict[str, str]) -> None:
        await self._start(entry_id, self._retrying(entry_id, lambda: self._finish_poisoned(entry_id, fields)))

    async def _start(self, entry_id: str, work: Any) -> None:
        """Handle one proposal concurrently; wait for a free slot first (backpressure)."""
        if entry_id in self._active:  # re-read after a reconnect while still being handled
            work.close()
            return
        await self._slots.acquire()
        task = asyncio.create_task(work, name=f"proposal-{entry_id}")
        self._active[entry_id] = task
        self.metrics.in_flight.set(len(self._active))

        def done(_: asyncio.Task[None]) -> None:
            self._active.pop(entry_id, None)
            self._slots.release()
            self.metrics.in_flight.set(len(self._active))

        task.add_done_callback(done)

    async def _handle_retrying(self, entry_id: str, fields: dict[str, str]) -> None:
        await self._retrying(entry_id, lambda: self.handle_proposal(entry_id, fields))

    async def _retrying(self, entry_id: str, step: Any) -> None:
        """Handling before the send is idempotent (every step checks its marker), so a store outage there just
        means: again. (After the send only the result's publication is retried: ``_publish``.)"""
        backoff = Backoff()
        while True:
            try:
                await step()
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
        has_result, plan, executed = await self._markers(plan_id)
        if has_result:
            await self.redis.xack(keys.PROPOSAL_STREAM, keys.APPLY_GROUP, entry_id)
            return
        if executed:
            assert plan is not None  # the marker is only ever set for a published plan
            log.warning(f"{plan.symbol}: recovering plan {plan_id}: executed, no result yet")
            await self._recover(plan, entry_id, executed, log)
            return
        vouched = self._vouching(entry_id)
        if vouched is None:
            # Older than the store instance: it may have been answered already (the answer forgotten), so it is
            # never executed now. The exchange says whether it was: an order found is its result.
            found = await self._ask_exchange(plan_id, proposal.symbol, plan, log, "older_than_store")
            stand_in = plan or _plan_stub(plan_id, proposal.symbol, "NONE", self._clock.wall())
            run = PlanRun(stand_in, entry_id, log, self.watch.epoch)
            if found is not None:
                await self._adopt(run, found)
            else:
                log.warning(f"{proposal.symbol}: proposal older than the store instance; not executing it")
                await self._publish(run, self._result(stand_in, reasons.STORE_CHANGED))
            return
        if plan is not None:
            await self._resume(PlanRun(plan, entry_id, log, vouched))
        else:
            await self._plan_and_run(proposal, plan_id, entry_id, log, vouched)

    async def _markers(self, plan_id: str) -> tuple[bool, Plan | None, str | None]:
        """(has a result, the published plan, the executed marker) of a plan, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys.result_marker(plan_id))
            pipe.hgetall(keys.plan_record(plan_id))
            pipe.get(keys.executed_marker(plan_id))
            has_result, record, executed = await pipe.execute()
        plan = None
        if record:
            try:
                plan = from_fields(Plan, record)
            except MalformedEntry as exc:
                # only Apply writes plan records: an unreadable one is a store fault, never a reason to act
                raise RuntimeError(
                    f"plan record {plan_id} is unreadable ({exc}); leaving the proposal pending"
                ) from None
        return bool(has_result), plan, executed

    def _vouching(self, entry_id: str) -> Epoch | None:
        """The current epoch if the store can vouch for the plan of this proposal entry, else None."""
        epoch = self.watch.epoch
        return epoch if trusted(epoch, entry_id, self._clock.wall()) else None

    def _still_vouched(self, run: PlanRun) -> bool:
        return run.vouched is not None and run.vouched.same_as(self.watch.epoch)

    async def _plan_and_run(
        self, proposal: Proposal, plan_id: str, entry_id: str, log: Any, vouched: Epoch | None
    ) -> None:
        min_score = self.settings.apply.min_kill_score
        position = None
        if static_skip_reason(proposal, self._allowlist, min_score) is None:
            try:
                position = await self.positions.amount(proposal.symbol)
            except ExchangeError as exc:
                log.warning(f"{proposal.symbol}: position unavailable", error=exc.message)
        ctx = PlanningContext(self._allowlist, position, False, min_score)
        started = self._clock.mono()  # the permit window runs from the plan's creation, as the seed measures it
        plan = make_plan(proposal, ctx, plan_id, self._clock.wall())
        executing = plan.decision == "EXECUTE"
        if executing:
            self.waiter.register(plan_id)  # before publishing: no decision can slip past unseen
        try:
            published = await self._publish_plan(plan, entry_id)
            if published == "busy":  # another close of this symbol is under way: this plan is a SKIP
                plan = make_plan(proposal, replace(ctx, symbol_busy=True), plan_id, plan.created_at)
                executing = False
                published = await self._publish_plan(plan, entry_id)
            if published == "exists":  # another handler of this very proposal published it: follow that plan
                record = await self.redis.hgetall(keys.plan_record(plan_id))
                await self._resume(PlanRun(from_fields(Plan, record), entry_id, log, vouched))
                return
            run = PlanRun(plan, entry_id, log, vouched)
            self.metrics.plans.labels(plan.decision, plan.reason).inc()
            steps = len(json.loads(plan.steps))
            log.info(
                f"{plan.symbol}: Plan {plan_id} published (decision={plan.decision}, steps={steps})",
                reason=plan.reason,
                side=plan.side,
                qty=str(plan.qty),
            )
            if not executing:
                await self._finish(run, self._result(plan, reasons.SKIPPED, reason=plan.reason))
                return
            await self._await_and_execute(run, started + self._wait_s)
        finally:
            self.waiter.release(plan_id)

    async def _resume(self, run: PlanRun) -> None:
        """A plan published before a restart: wait out what is left of its window, never longer."""
        plan = run.plan
        if plan.decision != "EXECUTE":
            await self._finish(run, self._result(plan, reasons.SKIPPED, reason=plan.reason))
            return
        left_s = plan.created_at + self._wait_s - self._clock.wall()
        run.log.info(f"{plan.symbol}: resuming plan {plan.plan_id}", window_left_ms=round(left_s * 1000))
        self.waiter.register(plan.plan_id)
        try:
            await self._await_and_execute(run, self._clock.mono() + left_s, resumed=True)
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

    async def _publish_plan(self, plan: Plan, entry_id: str) -> str:
        """Publish the plan once; an executing plan takes its symbol in the same step ("busy" if another holds it).

        The hold lasts the whole order path; its TTL only frees a symbol whose Apply died, and an unknown
        outcome extends it for as long as the order's intent is recorded."""
        executing = plan.decision == "EXECUTE"
        return await self._scripts.publish_plan(
            plan_id=plan.plan_id,
            fields=to_fields(plan),
            proposal_entry_id=entry_id,
            maxlen=STREAM_MAXLEN,
            hold_key=keys.symbol_in_flight(plan.symbol) if executing else "",
            hold_ms=round((self._handling_bound_s() + 5) * 1000),
        )

    # --- what the exchange says when the store cannot vouch for a plan ---------------------------------------

    def _unseen_sends(self, plan_created_at: float | None) -> SendRecord:
        """The sends of a plan this process did not see, as far as they can be bounded (domain/trust.py)."""
        now = self._clock.wall()
        signed_before = prior_sends_signed_before(self.watch.epoch, plan_created_at, self._wait_s, now)
        return SendRecord.unseen(
            signed_before * 1000 - self.exchange_skew_ms(),
            self.exchange.order_recv_window_ms,
            self.executor.late_horizon_ms,
        )

    async def _ask_exchange(
        self, plan_id: str, symbol: str, plan: Plan | None, log: Any, why: str
    ) -> OrderOutcome | None:
        """The order the exchange has with the plan's client id (final), or None once it is proven that none
        exists and none can still execute. While the exchange cannot answer, ask again: nothing is planned,
        sent or published for the plan meanwhile (fail closed)."""
        self.metrics.lookups.labels(why).inc()
        coid = client_order_id(plan_id)
        backoff = Backoff(start_s=0.5, max_s=TRUTH_RETRY_MAX_S)
        while True:
            outcome = await self.executor.follow(symbol, coid, self._unseen_sends(plan.created_at if plan else None))
            if outcome.kind is OutcomeKind.NOT_PLACED:
                return None
            if outcome.exists:
                return outcome
            log.warning(
                f"{symbol}: cannot tell whether plan {plan_id} has an order; asking again", error=outcome.message
            )
            await backoff.wait()

    async def _adopt(self, run: PlanRun, found: OrderOutcome) -> None:
        """An order the store forgot is the plan's outcome: its result is published (the ledger follows it).
        For a plan whose record is gone too, the side is the one the order closed."""
        report = found.report
        assert report is not None
        self.metrics.adopted.inc()
        plan = run.plan
        if plan.side == "NONE" and report.side in ("BUY", "SELL"):  # a BUY closes a short, a SELL a long
            plan = msgspec.structs.replace(plan, side=close_side(Decimal(-1 if report.side == "BUY" else 1)))
        run.log.warning(f"{plan.symbol}: found order {report.client_order_id} for plan {plan.plan_id}; adopting it")
        result = replace_result(self._from_report(plan, report), adopted=True)
        await self._publish(PlanRun(plan, run.entry_id, run.log, run.vouched), result)

    # --- waiting for permits ----------------------------------------------------------------------------

    async def _await_and_execute(self, run: PlanRun, deadline: float, *, resumed: bool = False) -> None:
        plan, log = run.plan, run.log
        published = self._clock.mono()
        window_open = deadline > published
        end, outcome, checks = await self._wait(plan, deadline, log, check_first=resumed, consume=window_open)
        waited_ms = (self._clock.mono() - published) * 1000
        if not resumed:
            self.metrics.permit_wait.labels(end.value).observe(waited_ms / 1000)
        if end is WaitEnd.CONSUMED:
            await self._execute(run, checks[1], deadline)
            return
        if end is WaitEnd.ALREADY_EXECUTED:
            await self._recover(plan, run.entry_id, await self.redis.get(keys.executed_marker(plan.plan_id)), log)
            return
        if end is WaitEnd.ALREADY_FINISHED:
            return
        if end is WaitEnd.DENIED:
            for check in checks:  # the deny, and the other slot's decision if it came (consumed plans count theirs)
                if check.state in ("allow", "deny"):
                    self.metrics.permit_decisions.labels(check.name, check.state, check.reason).inc()
            who = ", ".join(outcome.denied_by)
            log.warning(f"{plan.symbol}: Permit denied by {who} ({outcome.deny_reason})")
            result = self._result(plan, reasons.PERMIT_DENIED, reason=outcome.deny_reason, denied_by=who)
        elif end is WaitEnd.READY_LATE:
            log.warning(f"{plan.symbol}: permits found after the window closed; not executing")
            result = self._result(plan, reasons.WINDOW_EXPIRED)
        else:
            missing = ", ".join(outcome.missing)
            log.warning(f"{plan.symbol}: Permit timeout after {waited_ms:.0f}ms (missing: {missing})")
            for name in outcome.missing:
                self.metrics.timeouts.labels(name).inc()
            result = self._result(plan, reasons.PERMIT_TIMEOUT, missing=missing)
        await self._finish(run, result)

    async def _wait(
        self, plan: Plan, deadline: float, log: Any, *, check_first: bool, consume: bool
    ) -> tuple[WaitEnd, WaitOutcome, tuple[SlotCheck, SlotCheck]]:
        """Wait until both issuers decided, one denied, or the deadline passed (then look one last time)."""
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
                    return WaitEnd.DENIED, outcome, checks
                if outcome.kind == "ready":
                    if not consume:
                        return WaitEnd.READY_LATE, outcome, checks
                    status = await self._consume(plan, checks)
                    if status in ("ok", "already_executed", "already_finished"):
                        end = {"ok": WaitEnd.CONSUMED, "already_executed": WaitEnd.ALREADY_EXECUTED}
                        return end.get(status, WaitEnd.ALREADY_FINISHED), outcome, checks
                    log.warning("permit changed between check and consume; re-reading", status=status)
                    continue
                if final:
                    return WaitEnd.TIMEOUT, outcome, checks
            left = deadline - self._clock.mono()
            if left <= 0:
                check_now, final = True, True
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)
            check_now = True

    async def _read_slots(self, plan: Plan, audited: set[bytes]) -> tuple[SlotCheck, SlotCheck]:
        raw_gov, raw_p33 = await self.redis.mget(keys.governor_permit(plan.plan_id), keys.p33_permit(plan.plan_id))
        now = self._clock.wall()
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
            at=self._clock.wall(),
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
        now = self._clock.wall()
        marker = json.dumps(
            {
                "client_order_id": client_order_id(plan.plan_id),
                "qty": format(p33.permit.safe_close_qty, "f"),
                "side": plan.side,
                "at": now,
            }
        )
        return await self._scripts.consume_permits(
            plan_id=plan.plan_id,
            symbol=plan.symbol,
            governor_raw=governor.raw,
            p33_raw=p33.raw,
            marker=marker,
            now=now,
            latency_ms=(now - plan.created_at) * 1000,
            audit_maxlen=self.settings.audit_maxlen,
        )

    # --- the order --------------------------------------------------------------------------------------

    async def _execute(self, run: PlanRun, p33: SlotCheck, deadline: float) -> None:
        assert isinstance(p33.permit, P33Permit)
        plan = run.plan
        coid = client_order_id(plan.plan_id)
        self._executing.add(plan.plan_id)
        try:
            if not self._still_vouched(run):
                # The store changed instance since the plan was vouched for: what it said may be forgotten, and
                # the plan is now older than the store. Never sent: an order the exchange has is its result.
                found = await self._ask_exchange(plan.plan_id, plan.symbol, plan, run.log, "store_changed_before_send")
                run.vouched = self.watch.epoch
                if found is not None:
                    await self._conclude(run, coid, found)
                else:
                    run.log.warning(f"{plan.symbol}: the store changed instance before the send; not sending")
                    result = self._result(plan, reasons.STORE_CHANGED, client_order_id=coid)
                    await self._publish(run, result, consumed_here=True)
                return
            window_end_ms = self.exchange.now_ms() + max(0.0, deadline - self._clock.mono()) * 1000
            qty = p33.permit.safe_close_qty
            outcome = await self.executor.execute(plan.symbol, order_side(plan.side), qty, coid, window_end_ms)
            self.metrics.orders.labels(outcome.kind.value).inc()
            await self._conclude(run, coid, outcome)
        finally:
            self._executing.discard(plan.plan_id)

    async def _conclude(self, run: PlanRun, coid: str, outcome: OrderOutcome) -> None:
        """Publish the result an order outcome proves; for an unknown one, publish nothing and hold the symbol."""
        plan, log = run.plan, run.log
        if outcome.kind is OutcomeKind.UNKNOWN:
            # No result until the truth is known: hold the symbol (for as long as the intent is recorded) so no
            # other close can stack on this one.
            if not await self._scripts.hold_for_intent(plan_id=plan.plan_id, symbol=plan.symbol):
                log.warning(f"{plan.symbol}: the intent of {coid} is no longer recorded; not holding the symbol")
            log.error(
                f"{plan.symbol}: order {coid} outcome unknown; symbol held, resolving in the background",
                error=outcome.message,
            )
            return
        if outcome.report is not None:
            result = self._from_report(plan, outcome.report)
        else:
            error = NOT_EXECUTED[outcome.kind]
            result = self._result(
                plan, error, reason=outcome.message[:200], client_order_id=coid, exchange_code=outcome.code
            )
            (log.error if outcome.kind is OutcomeKind.BANNED else log.warning)(
                f"{plan.symbol}: order not executed ({error})", code=outcome.code, msg=outcome.message
            )
        await self._publish(run, result, consumed_here=True)

    async def _recover(self, plan: Plan, entry_id: str, marker: str | None, log: Any) -> None:
        """An executed plan without a result (a restart, a racing handler): look the order up, never resend.

        What the other handler sent is unknown here, but not when: every send of a plan, the one resend
        included, is signed before the plan's window ends (the deadline is checked right before). So "absent"
        is final only once a request signed at the window's end could no longer execute or show."""
        detail = _marker_detail(marker)
        coid = str(detail.get("client_order_id") or client_order_id(plan.plan_id))
        unseen = self._unseen_sends(plan.created_at)
        consumed_ms = float(detail.get("at") or plan.created_at) * 1000 - self.exchange_skew_ms()
        record = replace(unseen, last_signed_ms=max(unseen.last_signed_ms, consumed_ms))
        outcome = await self.executor.follow(plan.symbol, coid, record)
        await self._conclude(PlanRun(plan, entry_id, log, self.watch.epoch), coid, outcome)

    def exchange_skew_ms(self) -> float:
        return self._clock.wall() * 1000 - self.exchange.now_ms()

    async def _finish_poisoned(self, entry_id: str, fields: dict[str, str]) -> None:
        """A proposal dead-lettered as poison whose plan exists still ends with its one result."""
        try:
            proposal = from_fields(Proposal, fields)
        except MalformedEntry:
            return  # never planned: the dead letter is its end
        plan_id = plan_id_for(entry_id, proposal.proposal_id)
        has_result, plan, executed = await self._markers(plan_id)
        if has_result or plan is None or executed:
            return  # done; never published; or executed: the intent sweep establishes and publishes its outcome
        log = self.log.bind(plan_id=plan_id, symbol=plan.symbol)
        run = PlanRun(plan, entry_id, log, None)  # a result without an order: the exchange is asked first
        await self._finish(run, self._result(plan, reasons.DEAD_LETTERED, reason="delivered too often"))

    async def _sweep_intents(self) -> None:
        """Every few seconds (and at start): orders whose outcome is still unestablished, found by client id;
        and, while the store's instance has not had it, the search for orders it forgot.

        Covers what a redelivered proposal does not: an unknown outcome that outlived its plan's handler, and
        intents of a consumer that no longer exists (renamed host). Never resends. One intent that cannot be
        resolved (the exchange, the store, an unreadable record) does not hold back the others.
        """
        # Older than a whole window plus a whole resolution: no live handler is still working on it.
        stale_s = self._wait_s + self.executor.resolve_timeout_s + 1
        interval = min(INTENT_SWEEP_S, max(0.5, self.executor.resolve_timeout_s / 2))
        while True:
            if self._orphan_search.is_set():
                with self._sweep_step("the search for orders the store forgot"):
                    if await self._adopt_orphans():
                        self._orphan_search.clear()
            due: list[str] = []
            with self._sweep_step("the intents"):
                due = await self.redis.zrangebyscore(keys.APPLY_INTENTS, "-inf", self._clock.wall() - stale_s)
                self.metrics.unresolved.set(await self.redis.zcard(keys.APPLY_INTENTS))
            for plan_id in due:
                if plan_id not in self._executing:
                    with self._sweep_step(f"intent {plan_id}"):
                        await self._resolve_intent(plan_id)
            await asyncio.sleep(interval)

    @contextlib.contextmanager
    def _sweep_step(self, what: str) -> Iterator[None]:
        """One step of the sweep: whatever it raises is logged and the sweep goes on (next step, next round)."""
        try:
            yield
        except STORE_ERRORS as exc:
            self.log.warning(f"intent sweep: store unavailable ({what})", error=str(exc))
        except Exception:  # (the exchange's failures are handled inside each step: lookups retry, searches resume)
            self.log.exception(f"intent sweep: {what} failed; trying again next round")

    async def _adopt_orphans(self) -> bool:
        """On a store instance nobody had searched yet: orders of ours on the exchange whose plan the store has
        no result for, not even an intent (its proposal may be forgotten too, so no redelivery would bring it
        back), get their result from the exchange. Searched from a minute before the newest proposal the
        instance kept (a forgotten proposal, and so its order, is newer than that), at most a day back.
        Returns True when every symbol was searched (then recorded in the epoch); False: search again later."""
        epoch = self.watch.epoch
        if epoch is None:
            return False
        newest_kept_ms = min(epoch.last_id[0], epoch.floor[0])
        since_ms = (
            max(newest_kept_ms, (self._clock.wall() - ORPHAN_SEARCH_MAX_S) * 1000) - ORPHAN_SEARCH_MARGIN_S * 1000
        )
        adopted, complete = 0, True
        for symbol in sorted(self._allowlist):
            try:
                found = await self.exchange.orders_since(symbol, since_ms)
            except ExchangeError as exc:
                self.log.warning(f"{symbol}: cannot search for forgotten orders now", error=exc.message)
                complete = False
                continue
            for report in found:
                plan_id = report.client_order_id.removeprefix("qt-")
                if report.client_order_id == plan_id or not is_plan_id(plan_id) or plan_id in self._executing:
                    continue
                if not is_final(report.status):
                    complete = False  # still open: looked at again in the next search
                    continue
                has_result, plan, marker = await self._markers(plan_id)
                if has_result or marker:  # done, or the intent's resolution will publish it
                    continue
                entry_id = await self.redis.hget(keys.plan_record(plan_id), "proposal_entry_id") if plan else ""
                log = self.log.bind(plan_id=plan_id, symbol=symbol)
                stand_in = plan or _plan_stub(plan_id, symbol, "NONE", self._clock.wall())
                await self._adopt(PlanRun(stand_in, entry_id or "", log, epoch), OrderOutcome.of(report))
                adopted += 1
        self.log.info("searched the exchange for orders the store forgot", adopted=adopted, complete=complete)
        if complete:
            await self.watch.mark_searched(self.redis)
        return complete

    async def _resolve_intent(self, plan_id: str) -> None:
        has_result, plan, marker = await self._markers(plan_id)
        if has_result or plan is None:
            await self.redis.zrem(keys.APPLY_INTENTS, plan_id)  # done, or its bookkeeping expired
            return
        record = await self.redis.hget(keys.plan_record(plan_id), "proposal_entry_id")
        log = self.log.bind(plan_id=plan_id, symbol=plan.symbol)
        self._executing.add(plan_id)
        try:
            await self._recover(plan, record or "", marker, log)
        finally:
            self._executing.discard(plan_id)

    # --- results ----------------------------------------------------------------------------------------

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
            order_time_ms=report.update_time_ms,
        )

    def _result(self, plan: Plan, error: str, **fields: Any) -> Result:
        return Result(plan_id=plan.plan_id, symbol=plan.symbol, side=plan.side, executed=False, error=error, **fields)

    async def _finish(self, run: PlanRun, result: Result) -> None:
        """Publish a result that the store's records decided (no order was sent for this plan). If the store
        cannot vouch for them any more (it changed instance), the exchange has the last word: an order found
        there is the result instead."""
        if not result.executed and not self._still_vouched(run):
            plan = run.plan
            found = await self._ask_exchange(plan.plan_id, plan.symbol, plan, run.log, "store_changed_before_result")
            if found is not None:
                await self._adopt(run, found)
                return
        await self._publish(run, result)

    async def _publish(self, run: PlanRun, result: Result, *, consumed_here: bool = False) -> None:
        """Publish the plan's one result and acknowledge its proposal. A store error here retries only this
        step: the outcome is established, nothing before it is done again.

        A result decided without this handler consuming the permits (``consumed_here``: its own order's
        outcome, or the exchange's word) that says no order was sent (a timeout, a deny, a skip) is refused
        while the plan's permits are consumed: another handler got them, and may have sent the order. That
        plan is recovered from its intent instead, so only its order's outcome becomes its result."""
        plan, log = run.plan, run.log
        no_order = not result.executed and not result.order_id and not consumed_here
        backoff = Backoff()
        while True:
            now = self._clock.wall()
            stamped = replace_result(result, at=now, latency_ms=round((now - plan.created_at) * 1000, 3))
            try:
                status = await self._scripts.publish_result(
                    plan_id=plan.plan_id,
                    symbol=plan.symbol,
                    fields=to_fields(stamped),
                    proposal_entry_id=run.entry_id,
                    result_maxlen=STREAM_MAXLEN,
                    no_order=no_order,
                )
                break
            except STORE_ERRORS as exc:
                log.warning("store unavailable while publishing a result; retrying it", error=str(exc))
                await backoff.wait()
        if status == "executed":
            log.warning(f"{plan.symbol}: plan {plan.plan_id} was executed by another handler; recovering its outcome")
            await self._recover(plan, run.entry_id, await self.redis.get(keys.executed_marker(plan.plan_id)), log)
            return
        if status == "published":
            self.metrics.results.labels("executed" if result.executed else result.error).inc()
            log.info(
                f"{plan.symbol}: Result published (executed={result.executed}, error={result.error or 'none'})",
                filled_qty=str(result.filled_qty),
                order_id=result.order_id,
                latency_ms=stamped.latency_ms,
                adopted=result.adopted,
            )


def replace_result(result: Result, **changes: Any) -> Result:
    return msgspec.structs.replace(result, **changes)


def _plan_stub(plan_id: str, symbol: str, side: Any, now: float) -> Plan:
    """A stand-in for a plan whose record the store lost, to publish the result of the order found for it."""
    return Plan(
        plan_id=plan_id,
        proposal_id="",
        symbol=symbol,
        side=side,
        action="FULL_CLOSE",
        qty=0,  # type: ignore[arg-type]
        decision="SKIP",
        reason="",
        steps="[]",
        plan_hash="0" * 64,
        created_at=now,
    )


def _marker_detail(marker: str | None) -> dict[str, Any]:
    try:
        detail = json.loads(marker) if marker else {}
    except ValueError:
        return {}
    return detail if isinstance(detail, dict) else {}


def _raw(value: str | None) -> bytes | None:
    return to_bytes(value) if value is not None else None
