"""One proposal's path through Apply (services/apply/__init__.py has the steps): plan it, wait for its permits,
send its one order, publish its one result; or, for a plan handled before (a restart, a racing handler, a
forgetful store), resume, recover or adopt from what the store and the exchange say."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import msgspec
import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.bus.scripts import Scripts
from quantum_trader.bus.streams import STREAM_MAXLEN, dead_letter
from quantum_trader.clock import Clock
from quantum_trader.domain import reasons
from quantum_trader.domain.models import (
    MalformedEntry,
    P33Permit,
    Plan,
    Proposal,
    Result,
    Side,
    from_fields,
    to_fields,
)
from quantum_trader.domain.permits import SlotCheck
from quantum_trader.domain.planning import (
    PlanningContext,
    client_order_id,
    make_plan,
    order_side,
    plan_client_order_id,
    plan_id_for,
    refusal_plan_id,
    request_of,
    static_skip_reason,
)
from quantum_trader.domain.trust import Epoch
from quantum_trader.exchange.base import ExchangeBanned, ExchangeError, OrderBudget
from quantum_trader.services.apply.orders import OrderExecutor, OrderOutcome, OutcomeKind
from quantum_trader.services.apply.permit_waiter import PermitWaiter
from quantum_trader.services.apply.permits import PermitGate, WaitEnd
from quantum_trader.services.apply.plan_run import PlanLocks, PlanRun, read_markers
from quantum_trader.services.apply.position_reads import PositionReads
from quantum_trader.services.apply.results import (
    NOT_EXECUTED,
    ResultPublisher,
    from_report,
    not_executed,
    plan_stub,
    replace_result,
)
from quantum_trader.services.apply.truth import ExchangeTruth
from quantum_trader.services.metrics import ApplyMetrics
from quantum_trader.settings import Settings

CLOSED_BY: dict[str, Side] = {"BUY": "SHORT", "SELL": "LONG"}  # the position a reduce-only order of that side closes


class PlanHandler:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        scripts: Scripts,
        *,
        waiter: PermitWaiter,
        gate: PermitGate,
        truth: ExchangeTruth,
        positions: PositionReads,
        executor: OrderExecutor,
        publisher: ResultPublisher,
        metrics: ApplyMetrics,
        clock: Clock,
        log: Any,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self._scripts = scripts
        self.waiter = waiter
        self.gate = gate
        self.truth = truth
        self.positions = positions
        self.executor = executor
        self.publisher = publisher
        self.metrics = metrics
        self._clock = clock
        self.log = log
        self.executing: set[str] = set()  # plans whose order this process is sending or resolving now
        self._plans = PlanLocks()  # one handler per plan in this process: a client's retry waits for its first
        self.allowlist = frozenset(settings.symbols)
        self.wait_s = settings.apply.permit_wait_ms / 1000

    async def handle_proposal(self, entry_id: str, fields: dict[str, str], *, again: bool = False) -> None:
        """One proposal entry: dead-lettered, answered, or its plan made and followed. ``again``: handled again
        after a store error (the store may have changed instance meanwhile, and come back without it)."""
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
        plan_id = plan_id_for(proposal.proposal_id)
        log = self.log.bind(plan_id=plan_id, symbol=proposal.symbol, proposal_id=proposal.proposal_id)
        async with self._plans.hold(plan_id):
            await self._handle(proposal, plan_id, entry_id, log, again=again)

    async def _handle(self, proposal: Proposal, plan_id: str, entry_id: str, log: Any, *, again: bool) -> None:
        while True:  # until what is read was read on an instance whose word stands (searched, not changed since)
            if not await self.truth.wait_for_search(entry_id, log):
                await self._refuse(proposal, entry_id, log, reasons.SEARCH_INCOMPLETE)
                return
            before = self.truth.watch.epoch
            markers = await read_markers(self.redis, plan_id)
            if again and not await self.redis.xrange(keys.PROPOSAL_STREAM, entry_id, entry_id):
                # Handled again after a store error, on a store that came back without the entry: nothing is
                # planned for a proposal the store no longer has (its id would be newer than the instance's
                # floor, so the store would wrongly vouch for it). If its plan had an order, the search for
                # forgotten orders answers it; the client's retry finds that answer.
                log.warning(f"{proposal.symbol}: the store came back without this proposal; nothing is planned")
                return
            if self.truth.read_is_vouched(entry_id, before):
                break
        plan = markers.plan
        if not markers.same_request(request_of(proposal)):
            await self._refuse(proposal, entry_id, log, reasons.PROPOSAL_ID_CONFLICT)
            return
        if markers.has_result:
            if markers.proposal_entry_id not in ("", entry_id):
                self.metrics.repeats.inc()
                log.info(f"{proposal.symbol}: proposal {proposal.proposal_id} sent again; its plan's result stands")
            await self.redis.xack(keys.PROPOSAL_STREAM, keys.APPLY_GROUP, entry_id)
            return
        if markers.executed:
            assert plan is not None  # the marker is only ever set for a published plan
            log.warning(f"{plan.symbol}: recovering plan {plan_id}: executed, no result yet")
            await self.recover(plan, entry_id, markers.executed, log)
            return
        vouched = self.truth.vouching(entry_id)
        if vouched is None:
            await self._unvouched(proposal, plan_id, plan, entry_id, log)
        elif plan is not None:
            await self._resume(PlanRun(plan, entry_id, log, vouched))
        else:
            await self._plan_and_run(proposal, plan_id, entry_id, log, vouched)

    async def _refuse(self, proposal: Proposal, entry_id: str, log: Any, reason: str) -> None:
        """A proposal refused before its id's plan is made or followed: reusing the id of a different proposal
        (``proposal_id_conflict``: the id's plan answers the first one), or with no search for forgotten orders
        (``search_incomplete``). A SKIP plan of its own answers it (its id: the entry's, not the proposal id's,
        so a later retry is still planned normally). No order can be its outcome: the exchange is never asked."""
        plan_id = refusal_plan_id(entry_id, proposal.proposal_id)
        log = log.bind(plan_id=plan_id)
        markers = await read_markers(self.redis, plan_id)
        if markers.has_result:
            await self.redis.xack(keys.PROPOSAL_STREAM, keys.APPLY_GROUP, entry_id)
            return
        if reason == reasons.PROPOSAL_ID_CONFLICT:
            log.warning(f"{proposal.symbol}: proposal id {proposal.proposal_id} was used for a different proposal")
        ctx = PlanningContext(self.allowlist, None, refusal=reason)
        plan = markers.plan or await self._publish_skip(proposal, ctx, plan_id, entry_id)
        await self.publish(PlanRun(plan, entry_id, log, None), not_executed(plan, reasons.SKIPPED, reason=plan.reason))

    async def _publish_skip(self, proposal: Proposal, ctx: PlanningContext, plan_id: str, entry_id: str) -> Plan:
        """Publish a SKIP plan for the proposal (once: a plan published meanwhile by another handler is kept)."""
        plan = make_plan(proposal, ctx, plan_id, self._clock.wall())
        if await self._publish_plan(plan, entry_id, request_of(proposal)) == "exists":
            record = await self.redis.hgetall(keys.plan_record(plan_id))
            return from_fields(Plan, record)
        self.metrics.plans.labels(plan.decision, plan.reason).inc()
        return plan

    async def _unvouched(self, proposal: Proposal, plan_id: str, plan: Plan | None, entry_id: str, log: Any) -> None:
        """Older than the store instance: it may have been answered already (the answer forgotten), so it is
        never executed now. The exchange says whether it was: an order found is its result. Otherwise it is
        answered ``store_changed``, with a SKIP plan if it had none, so its client finds both by its id."""
        coid = plan_client_order_id(plan) if plan else client_order_id(proposal.proposal_id)
        found = await self.truth.ask(plan_id, coid, proposal.symbol, plan, log, "older_than_store")
        if found is not None:
            stand_in = plan or plan_stub(plan_id, proposal.proposal_id, proposal.symbol, "NONE", self._clock.wall())
            await self.adopt(PlanRun(stand_in, entry_id, log, self.truth.watch.epoch), found)
            return
        log.warning(f"{proposal.symbol}: proposal older than the store instance; not executing it")
        if plan is None:
            ctx = PlanningContext(self.allowlist, None, refusal=reasons.STORE_CHANGED)
            plan = await self._publish_skip(proposal, ctx, plan_id, entry_id)
        run = PlanRun(plan, entry_id, log, self.truth.watch.epoch)
        await self.publish(run, not_executed(plan, reasons.STORE_CHANGED))

    async def _plan_and_run(
        self, proposal: Proposal, plan_id: str, entry_id: str, log: Any, vouched: Epoch | None
    ) -> None:
        min_score = self.settings.apply.min_kill_score
        position = None
        refusal: str | None = None
        crowded = ""  # which exchange limit leaves no room for the plan's order and until when (or the ban)
        clocks = self.executor.clocks()
        if not clocks.ok:  # fail closed: an order sent now could not be proven absent or present safely
            log.error(f"{proposal.symbol}: clocks out of bounds; not planning a close", why=clocks.problem)
            refusal = reasons.CLOCK_OUT_OF_BOUNDS
        elif static_skip_reason(proposal, self.allowlist, min_score) is None:
            refusal, crowded = self._no_order_room()
            if refusal:  # refused now, before any permit is asked for: its order could not leave in its window
                log.warning(f"{proposal.symbol}: no order can leave now ({refusal})", why=crowded)
            else:
                try:
                    position = await self.positions.amount(proposal.symbol)
                except ExchangeError as exc:
                    log.warning(f"{proposal.symbol}: position unavailable", error=exc.message)
        ctx = PlanningContext(self.allowlist, position, min_kill_score=min_score, refusal=refusal)
        started = self._clock.mono()  # the permit window runs from the plan's creation, as the seed measures it
        plan = make_plan(proposal, ctx, plan_id, self._clock.wall())
        if plan.decision == "EXECUTE":
            self.waiter.register(plan_id)  # before publishing: no decision can slip past unseen
        request = request_of(proposal)
        try:
            published = await self._publish_plan(plan, entry_id, request)
            if published == "busy":  # another close of this symbol is under way: this plan is a SKIP
                plan = make_plan(proposal, replace(ctx, symbol_busy=True), plan_id, plan.created_at)
                published = await self._publish_plan(plan, entry_id, request)
            if published == "exists":  # another handler of this proposal id published it: follow that plan
                markers = await read_markers(self.redis, plan_id)
                if not markers.same_request(request):
                    await self._refuse(proposal, entry_id, log, reasons.PROPOSAL_ID_CONFLICT)
                elif markers.plan is not None:
                    await self._resume(PlanRun(markers.plan, entry_id, log, vouched))
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
            if plan.decision != "EXECUTE":
                await self.finish(run, _skip_result(plan, crowded))
                return
            await self._await_and_execute(run, started + self.wait_s)
        finally:
            self.waiter.release(plan_id)

    def _no_order_room(self) -> tuple[str | None, str]:
        """Why no order can leave now: ``rate_limited`` with the limit that leaves no room and when it frees, as
        the exchange client's budget sees them (exchange/throttle.py), or ``exchange_banned``; (None, "") when
        one can. Now, not within the permit window: a plan accepted to wait for the next window would hold its
        symbol meanwhile, and the proposals after it would be refused ``duplicate_in_flight`` for a limit that
        is the exchange's."""
        exchange = self.truth.exchange
        if not isinstance(exchange, OrderBudget):
            return None, ""
        try:
            crowded = exchange.order_room(exchange.now_ms())
        except ExchangeBanned as exc:
            return reasons.EXCHANGE_BANNED, exc.message
        return (reasons.RATE_LIMITED, crowded) if crowded else (None, "")

    async def _resume(self, run: PlanRun) -> None:
        """A plan published before a restart: wait out what is left of its window, never longer."""
        plan = run.plan
        if plan.decision != "EXECUTE":
            await self.finish(run, _skip_result(plan, ""))
            return
        left_s = plan.created_at + self.wait_s - self._clock.wall()
        run.log.info(f"{plan.symbol}: resuming plan {plan.plan_id}", window_left_ms=round(left_s * 1000))
        self.waiter.register(plan.plan_id)
        try:
            await self._await_and_execute(run, self._clock.mono() + left_s, resumed=True)
        finally:
            self.waiter.release(plan.plan_id)

    def handling_bound_s(self) -> float:
        """The longest a live handler keeps one proposal: window, sends, lookups, late-execution horizon."""
        return (
            self.wait_s
            + 2 * self.settings.exchange.timeout_ms / 1000
            + self.settings.apply.order_resolve_timeout_s
            + self.settings.exchange.late_execution_horizon_ms / 1000
        )

    async def _publish_plan(self, plan: Plan, entry_id: str, request: str) -> str:
        """Publish the plan once; an executing plan takes its symbol in the same step ("busy" if another holds it).

        The hold lasts the whole order path; its TTL only frees a symbol whose Apply died, and an unknown
        outcome extends it for as long as the order's intent is recorded."""
        executing = plan.decision == "EXECUTE"
        return await self._scripts.publish_plan(
            plan_id=plan.plan_id,
            fields=to_fields(plan),
            proposal_entry_id=entry_id,
            request=request,
            maxlen=STREAM_MAXLEN,
            hold_key=keys.symbol_in_flight(plan.symbol) if executing else "",
            hold_ms=round((self.handling_bound_s() + 5) * 1000),
        )

    async def _await_and_execute(self, run: PlanRun, deadline: float, *, resumed: bool = False) -> None:
        plan, log = run.plan, run.log
        published = self._clock.mono()
        window_open = deadline > published
        end, outcome, checks = await self.gate.wait(
            plan, deadline, log, check_first=resumed, consume=window_open, expected_epoch=_key(run)
        )
        waited_ms = (self._clock.mono() - published) * 1000
        if not resumed:
            self.metrics.permit_wait.labels(end.value).observe(waited_ms / 1000)
        if end is WaitEnd.CONSUMED:
            await self._execute(run, checks[1], deadline)
        elif end is WaitEnd.STORE_CHANGED:  # the consume script found another instance: nothing was consumed
            await self._not_sent_after_a_change(run, "store_changed_at_consume", consumed_here=False)
        elif end is WaitEnd.UNREPLICATED:  # consumed here, but a failover could forget it: never sent
            log.warning(
                f"{plan.symbol}: the consume reached fewer than {self.settings.apply.consume_replicas} replicas "
                f"within {self.settings.apply.consume_replicas_wait_ms} ms; not sending"
            )
            result = not_executed(plan, reasons.STORE_UNREPLICATED, client_order_id=plan_client_order_id(plan))
            await self.publish(run, result, consumed_here=True)
        elif end is WaitEnd.ALREADY_EXECUTED:
            await self.recover(plan, run.entry_id, await self.redis.get(keys.executed_marker(plan.plan_id)), log)
        elif end is WaitEnd.ALREADY_FINISHED:
            # its result is out (another handler's, of this entry or of another with the same proposal id):
            # this entry is answered by it
            await self.redis.xack(keys.PROPOSAL_STREAM, keys.APPLY_GROUP, run.entry_id)
        else:
            await self.finish(run, self.gate.unexecuted_result(plan, end, outcome, checks, waited_ms, log))

    async def _execute(self, run: PlanRun, p33: SlotCheck, deadline: float) -> None:
        assert isinstance(p33.permit, P33Permit)
        plan = run.plan
        coid = plan_client_order_id(plan)
        self.executing.add(plan.plan_id)
        try:
            if not self.truth.still_vouched(run):
                await self._not_sent_after_a_change(run, "store_changed_before_send", consumed_here=True)
                return
            window_end_ms = self.truth.exchange.now_ms() + max(0.0, deadline - self._clock.mono()) * 1000
            qty = p33.permit.safe_close_qty
            outcome = await self.executor.execute(plan.symbol, order_side(plan.side), qty, coid, window_end_ms)
            self.metrics.orders.labels(outcome.kind.value).inc()
            await self._conclude(run, coid, outcome)
        finally:
            self.executing.discard(plan.plan_id)

    async def _not_sent_after_a_change(self, run: PlanRun, why: str, *, consumed_here: bool) -> None:
        """The store changed instance since the plan was vouched for: what it said may be forgotten, and the plan
        is now older than the store. Never sent: an order the exchange has is its result, else store_changed
        (refused as usual while another handler holds the plan's permits, unless this one consumed them)."""
        plan = run.plan
        coid = plan_client_order_id(plan)
        found = await self.truth.ask(plan.plan_id, coid, plan.symbol, plan, run.log, why)
        if found is not None:
            await self._conclude(run, coid, found)
            return
        run.log.warning(f"{plan.symbol}: the store changed instance before the send; not sending")
        result = not_executed(plan, reasons.STORE_CHANGED, client_order_id=coid)
        await self.publish(run, result, consumed_here=consumed_here)

    async def _conclude(self, run: PlanRun, coid: str, outcome: OrderOutcome) -> None:
        """Publish the result an order outcome proves; for an unknown one, publish nothing and hold the symbol."""
        plan, log = run.plan, run.log
        if outcome.kind is OutcomeKind.UNKNOWN:
            # No result until the truth is known: hold the symbol (for as long as the intent is recorded) so no
            # other close can stack on this one; the intent sweep resolves it.
            if await self._scripts.hold_for_intent(plan_id=plan.plan_id, symbol=plan.symbol):
                log.error(
                    f"{plan.symbol}: order {coid} outcome unknown; symbol held, resolving in the background",
                    error=outcome.message,
                )
                return
            if await self.redis.exists(keys.result_marker(plan.plan_id)):
                return  # resolved meanwhile: its result is published
            # The store changed instance and came back without the intent: no sweep will ever look for it, so
            # this handler asks the exchange itself, for as long as it takes, and publishes what it finds.
            log.warning(
                f"{plan.symbol}: the intent of {coid} is no longer recorded (the store changed); resolving it here",
                error=outcome.message,
            )
            found = await self.truth.ask(plan.plan_id, coid, plan.symbol, plan, log, "unknown_outcome_forgotten")
            if found is not None:
                outcome = found
            else:
                outcome = OrderOutcome(OutcomeKind.NOT_PLACED, message="proven absent after the store changed")
        if outcome.report is not None:
            result = from_report(plan, outcome.report)
        else:
            error = NOT_EXECUTED[outcome.kind]
            result = not_executed(
                plan, error, reason=outcome.message[:200], client_order_id=coid, exchange_code=outcome.code
            )
            (log.error if outcome.kind is OutcomeKind.BANNED else log.warning)(
                f"{plan.symbol}: order not executed ({error})", code=outcome.code, msg=outcome.message
            )
        await self.publish(run, result, consumed_here=True)

    async def recover(self, plan: Plan, entry_id: str, marker: str | None, log: Any) -> None:
        """An executed plan without a result (a restart, a racing handler): look the order up, never resend.

        What the other handler sent is unknown here, but not when: every send of a plan, the one resend
        included, is signed before the plan's window ends (the deadline is checked right before). So "absent"
        is final only once a request signed at the window's end could no longer execute or show."""
        detail = _marker_detail(marker)
        coid = str(detail.get("client_order_id") or plan_client_order_id(plan))
        unseen = self.truth.unseen_sends(plan.created_at)
        consumed_ms = float(detail.get("at") or plan.created_at) * 1000 - self.truth.skew_ms()
        record = replace(unseen, last_signed_ms=max(unseen.last_signed_ms, consumed_ms))
        outcome = await self.executor.follow(plan.symbol, coid, record)
        await self._conclude(PlanRun(plan, entry_id, log, self.truth.watch.epoch), coid, outcome)

    async def finish_poisoned(self, entry_id: str, fields: dict[str, str]) -> None:
        """A proposal dead-lettered as poison whose plan exists still ends with its one result."""
        try:
            proposal = from_fields(Proposal, fields)
        except MalformedEntry:
            return  # never planned: the dead letter is its end
        markers = await read_markers(self.redis, plan_id_for(proposal.proposal_id))
        plan = markers.plan
        if markers.has_result or plan is None or markers.executed or markers.proposal_entry_id != entry_id:
            # done; never published; executed (the intent sweep establishes and publishes its outcome); or the
            # plan of an earlier proposal with this id (this one was a retry): that proposal's handling ends it
            return
        log = self.log.bind(plan_id=plan.plan_id, symbol=plan.symbol)
        run = PlanRun(plan, entry_id, log, None)  # a result without an order: the exchange is asked first
        await self.finish(run, not_executed(plan, reasons.DEAD_LETTERED, reason="delivered too often"))

    async def adopt(self, run: PlanRun, found: OrderOutcome) -> None:
        """An order the store forgot is the plan's outcome: its result is published (the ledger follows it).
        For a plan whose record is gone too, the side is the one the order closed."""
        report = found.report
        assert report is not None
        self.metrics.adopted.inc()
        plan = run.plan
        if plan.side == "NONE" and report.side in CLOSED_BY:
            plan = msgspec.structs.replace(plan, side=CLOSED_BY[report.side])
        run.log.warning(f"{plan.symbol}: found order {report.client_order_id} for plan {plan.plan_id}; adopting it")
        result = replace_result(from_report(plan, report), adopted=True)
        await self.publish(run, result)  # the side is the result's: publishing reads only the plan's id and times

    async def finish(self, run: PlanRun, result: Result) -> None:
        """Publish a result that the store's records decided (no order was sent for this plan). If the store
        cannot vouch for them any more (it changed instance), the exchange has the last word: an order found
        there is the result instead."""
        if not result.executed and not self.truth.still_vouched(run):
            if not await self._adopted_instead(run, "store_changed_before_result"):
                await self.publish(run, result)
            return
        # The store vouched for the records that decided it; the publication checks, inside the store, that it
        # is still that instance (it may have changed since the check above).
        if await self.publish(run, result, expected_epoch=_key(run) if not result.executed else "") == (
            "store_changed"
        ) and not await self._adopted_instead(run, "store_changed_at_result"):
            await self.publish(run, result)

    async def _adopted_instead(self, run: PlanRun, why: str) -> bool:
        """The exchange's word on a plan the store no longer vouches for: an order found is adopted as its
        result (True); none, and none can still execute (False)."""
        plan = run.plan
        found = await self.truth.ask(plan.plan_id, plan_client_order_id(plan), plan.symbol, plan, run.log, why)
        if found is None:
            return False
        await self.adopt(run, found)
        return True

    async def publish(
        self, run: PlanRun, result: Result, *, consumed_here: bool = False, expected_epoch: str = ""
    ) -> str:
        """Publish the plan's one result (services/apply/results.py); returns what the script did.

        A result decided without this handler consuming the permits (``consumed_here``: its own order's
        outcome, or the exchange's word) that says no order was sent (a timeout, a deny, a skip) is refused
        while the plan's permits are consumed: another handler got them, and may have sent the order. That
        plan is recovered from its intent instead, so only its order's outcome becomes its result. With
        ``expected_epoch`` it is refused ("store_changed") once the store is another instance than that."""
        plan, log = run.plan, run.log
        no_order = not result.executed and not result.order_id and not consumed_here
        status = await self.publisher.publish(run, result, no_order=no_order, expected_epoch=expected_epoch)
        if status == "executed":
            log.warning(f"{plan.symbol}: plan {plan.plan_id} was executed by another handler; recovering its outcome")
            await self.recover(plan, run.entry_id, await self.redis.get(keys.executed_marker(plan.plan_id)), log)
        elif status == "store_changed":
            log.warning(f"{plan.symbol}: the store changed instance before the result; asking the exchange")
        return status


def _skip_result(plan: Plan, detail: str) -> Result:
    """The result of a SKIP plan: ``skipped`` with its reason; a refusal for the exchange's limits or its ban is
    that error itself, with what named it (the limit and when it frees; after a restart, the code only)."""
    if plan.reason in (reasons.RATE_LIMITED, reasons.EXCHANGE_BANNED):
        return not_executed(plan, plan.reason, reason=(detail or plan.reason)[:200])
    return not_executed(plan, reasons.SKIPPED, reason=plan.reason)


def _key(run: PlanRun) -> str:
    """The epoch key the store's word on this plan rests on ("": none, no check)."""
    return run.vouched.key if run.vouched is not None else ""


def _marker_detail(marker: str | None) -> dict[str, Any]:
    try:
        detail = json.loads(marker) if marker else {}
    except ValueError:
        return {}
    return detail if isinstance(detail, dict) else {}
