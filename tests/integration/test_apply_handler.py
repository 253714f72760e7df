"""One proposal's path through Apply's handler (services/apply/handler.py, permits.py, truth.py, results.py), on
a real store with a scripted exchange: for each situation, exactly which orders are sent, which result is
published, what the store holds afterwards and what is counted.

The rig (apply_rig.py) is Apply as the runner builds it, minus its group loop: each test hands the handler one
proposal, or a plan the store already holds, as the loop or a restart would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog
from apply_rig import SYMBOL, Rig, apply_rig, coid, filled
from forgery import governor_permit, p33_permit

from conftest import until
from quantum_trader.bus import keys
from quantum_trader.bus.streams import STREAM_MAXLEN
from quantum_trader.domain import reasons
from quantum_trader.domain.models import Plan
from quantum_trader.exchange.base import ExchangeBanned, ExchangeRejected, ExchangeUnavailable, OutcomeUnknown
from quantum_trader.services.apply.orders import OrderOutcome, OutcomeKind
from quantum_trader.services.apply.plan_run import PlanRun
from scripted import At, ScriptedExchange

pytestmark = pytest.mark.integration
D = Decimal
FAR_MS = 10**7  # exchange-clock ms after which every request of the plan is settled (absent is final)


def scripted(held: dict[str, Decimal] | ExchangeUnavailable | None = None, places=None, lookups=None):
    return ScriptedExchange(None, places or [], lookups or [], held=held)  # type: ignore[arg-type]


async def run_proposal(rig: Rig, entry_id: str, fields: dict[str, str]) -> asyncio.Task[None]:
    return asyncio.create_task(rig.handler.handle_proposal(entry_id, fields))


async def granted_run(rig: Rig, *, qty: float | None = None, **propose: str) -> tuple[Plan, str]:
    """Propose, wait for the plan, grant both permits, wait for the handler to finish."""
    entry_id, fields, plan_id = await rig.propose(**propose)
    task = await run_proposal(rig, entry_id, fields)
    plan = await rig.plan(plan_id)
    await rig.grant(plan, qty=qty)
    await asyncio.wait_for(task, 10)
    return plan, entry_id


# --- the straight path ----------------------------------------------------------------------------------------


async def test_a_granted_plan_sends_one_order_of_the_p33_quantity_and_publishes_its_fill(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        started_ms = rig.clock.wall() * 1000
        entry_id, fields, plan_id = await rig.propose()
        exchange.places.append(At(filled(plan_id, "0.004")))
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        assert (plan.decision, plan.side, plan.qty, plan.reason) == ("EXECUTE", "LONG", D("0.010"), reasons.READY)
        assert rig.handler.waiter.waiting == 1  # registered before it was published
        await rig.grant(plan, qty=0.004)
        await asyncio.wait_for(task, 10)

        (call,) = exchange.calls
        assert (call.kind, call.symbol, call.side, call.qty) == ("place", SYMBOL, "SELL", D("0.004"))
        assert call.client_order_id == coid(plan_id)
        # the deadline is the window's end (from the plan's creation) on the exchange clock
        assert call.deadline_ms is not None and abs(call.deadline_ms - (plan.created_at * 1000 + 800)) < 50
        assert started_ms < call.at_ms < call.deadline_ms
        assert exchange.position_reads == [[SYMBOL]]

        (result,) = await rig.results()
        assert (result.plan_id, result.symbol, result.side, result.executed, result.error) == (
            plan_id,
            SYMBOL,
            "LONG",
            True,
            "",
        )
        assert (result.order_id, result.client_order_id, result.filled_qty) == ("7001", coid(plan_id), D("0.004"))
        assert (result.avg_price, result.order_time_ms, result.reason, result.adopted) == (
            D(100),
            1234,
            "FILLED",
            False,
        )
        assert await rig.pending() == 0
        marker = json.loads(await rig.rds.get(keys.executed_marker(plan_id)))
        assert marker["client_order_id"] == coid(plan_id) and marker["qty"] == "0.004" and marker["side"] == "LONG"
        assert abs(marker["at"] - rig.clock.wall()) < 5
        assert not await rig.rds.exists(keys.symbol_in_flight(SYMBOL))  # the result released the hold
        assert await rig.rds.zcard(keys.APPLY_INTENTS) == 0
        assert rig.handler.waiter.waiting == 0 and rig.handler.executing == set()
        assert rig.metric("qt_apply_plans_total", decision="EXECUTE", reason=reasons.READY) == 1
        assert rig.metric("qt_apply_orders_total", outcome="filled") == 1
        assert rig.metric("qt_apply_results_total", outcome="executed") == 1
        assert rig.metric("qt_apply_permit_wait_seconds_count", outcome="consumed") == 1
        for issuer, reason in (("Governor", "policy_passed"), ("P3.3", "sanity_checks_passed")):
            assert rig.metric("qt_apply_permit_decisions_total", issuer=issuer, decision="allow", reason=reason) == 1


async def test_a_short_is_closed_with_a_buy(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("-0.5")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        exchange.places.append(At(filled(plan_id, "0.5", side="BUY")))
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        assert (plan.side, plan.qty) == ("SHORT", D("0.5"))
        await rig.grant(plan)
        await asyncio.wait_for(task, 10)
        (call,) = exchange.calls
        assert (call.side, call.qty) == ("BUY", D("0.5"))
        (result,) = await rig.results()
        assert (result.side, result.executed, result.filled_qty) == ("SHORT", True, D("0.5"))


async def test_the_sends_deadline_is_the_windows_end_to_the_millisecond(store_url: str, tmp_path: Path) -> None:
    """A long window: what is left of it is converted to exchange-clock milliseconds exactly (a send must be
    signed before the window's end, not a little after)."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 60_000}) as rig:
        plan, _ = await _granted_with(rig, exchange)
        (call,) = exchange.calls
        assert call.deadline_ms is not None and abs(call.deadline_ms - (plan.created_at * 1000 + 60_000)) < 20


async def test_permits_decided_before_the_publication_returns_wake_the_plan_at_once(
    store_url: str, tmp_path: Path
) -> None:
    """The issuers read the plan stream: both can decide (and the audit reader see it) before the reply to the
    publication reaches the handler. The plan waits registered from before its publication, so that is not
    missed: the order goes out at once, not when the window (5 s here) ends."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 5000}) as rig:
        entry_id, fields, plan_id = await rig.propose()
        exchange.places.append(At(filled(plan_id)))
        scripts = rig.handler._scripts
        publish = scripts.publish_plan

        async def decided_before_the_reply(**kwargs: object) -> str:
            published = str(await publish(**kwargs))
            await rig.grant(await rig.plan(plan_id))
            await asyncio.sleep(0.3)  # the audit reader reads both allows meanwhile (XREAD wakes on a new line)
            return published

        scripts.publish_plan = decided_before_the_reply
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 10)
        (call,) = exchange.calls
        plan = await rig.plan(plan_id)
        assert call.at_ms - plan.created_at * 1000 < 2500  # woken at once, not at the window's end


async def _granted_with(rig: Rig, exchange: ScriptedExchange) -> tuple[Plan, str]:
    entry_id, fields, plan_id = await rig.propose()
    exchange.places.append(At(filled(plan_id)))
    task = await run_proposal(rig, entry_id, fields)
    plan = await rig.plan(plan_id)
    await rig.grant(plan)
    await asyncio.wait_for(task, 10)
    return plan, entry_id


async def test_the_plan_holds_its_symbol_for_the_whole_handling_bound(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, exchange={"timeout_ms": 700}) as rig:
        bound = rig.handler.handling_bound_s()
        settings = rig.apply.settings
        assert bound == 0.8 + 2 * 0.7 + settings.apply.order_resolve_timeout_s + 2.0
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        await rig.plan(plan_id)
        assert await rig.rds.get(keys.symbol_in_flight(SYMBOL)) == plan_id
        ttl_ms = await rig.rds.pttl(keys.symbol_in_flight(SYMBOL))
        assert (bound + 5) * 1000 - 1000 < ttl_ms <= (bound + 5) * 1000
        await asyncio.wait_for(task, 10)  # times out: no permits
        (plan_entry,) = await rig.rds.xrange(keys.PLAN_STREAM)
        assert plan_entry[1]["plan_id"] == plan_id
        assert await rig.rds.hget(keys.plan_record(plan_id), "proposal_entry_id") == entry_id
        assert 0 < await rig.rds.ttl(keys.plan_record(plan_id)) <= keys.PLAN_BOOKKEEPING_TTL_S
        assert STREAM_MAXLEN > 0


# --- skips: no order, no wait ---------------------------------------------------------------------------------


async def test_a_symbol_outside_the_allowlist_is_skipped_without_reading_its_position(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose(symbol="DOGEUSDT")
        await rig.handler.handle_proposal(entry_id, fields)
        assert exchange.position_reads == [] and exchange.calls == []
        plan = await rig.plan(plan_id)
        assert (plan.decision, plan.reason) == ("SKIP", reasons.SYMBOL_NOT_ALLOWED)
        (result,) = await rig.results()
        assert (result.executed, result.error, result.reason) == (False, reasons.SKIPPED, reasons.SYMBOL_NOT_ALLOWED)
        assert await rig.pending() == 0
        assert not await rig.rds.exists(keys.symbol_in_flight("DOGEUSDT"))  # a skip takes no hold
        # what a skip writes, and nothing else: its plan (stream and record) and its result (stream and marker)
        written = {keys.PLAN_STREAM, keys.plan_record(plan_id), keys.RESULT_STREAM, keys.result_marker(plan_id)}
        assert set(await rig.rds.keys("*")) == written | {keys.PROPOSAL_STREAM, keys.STORE_EPOCH}
        assert rig.metric("qt_apply_plans_total", decision="SKIP", reason=reasons.SYMBOL_NOT_ALLOWED) == 1
        assert rig.metric("qt_apply_results_total", outcome=reasons.SKIPPED) == 1
        assert rig.handler.waiter.waiting == 0


@pytest.mark.parametrize(("score", "decision"), [("0.2", "SKIP"), ("0.7", "EXECUTE")])
async def test_a_kill_score_below_the_minimum_is_skipped_without_reading_its_position(
    store_url: str, tmp_path: Path, score: str, decision: str
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"min_kill_score": 0.5, "permit_wait_ms": 100}) as rig:
        fields = {"proposal_id": "p1", "symbol": SYMBOL, "action": "FULL_CLOSE", "kill_score": score}
        entry_id = await rig.rds.xadd(keys.PROPOSAL_STREAM, fields)
        await rig.handler.handle_proposal(entry_id, fields)
        plan = await rig.plan_of(entry_id)
        assert plan.decision == decision
        if decision == "SKIP":
            assert plan.reason == reasons.BELOW_THRESHOLD and exchange.position_reads == []
        else:
            assert exchange.position_reads == [[SYMBOL]]


async def test_a_position_the_exchange_cannot_give_makes_a_skip(store_url: str, tmp_path: Path) -> None:
    exchange = scripted(ExchangeUnavailable("positionRisk: 503"))
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        with structlog.testing.capture_logs() as logged:
            await rig.handler.handle_proposal(entry_id, fields)
        assert exchange.position_reads == [[SYMBOL]] and exchange.calls == []
        (result,) = await rig.results()
        assert (result.error, result.reason) == (reasons.SKIPPED, reasons.POSITION_UNAVAILABLE)
        (warning,) = [e for e in logged if e["log_level"] == "warning"]
        assert warning["error"] == "positionRisk: 503" and warning["plan_id"] == plan_id


async def test_a_position_reply_without_the_symbol_makes_a_skip_that_names_it(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({"ETHUSDT": D("1")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, _ = await rig.propose()
        with structlog.testing.capture_logs() as logged:
            await rig.handler.handle_proposal(entry_id, fields)
        (result,) = await rig.results()
        assert result.reason == reasons.POSITION_UNAVAILABLE
        (warning,) = [e for e in logged if e["log_level"] == "warning"]
        assert warning["error"] == f"positionRisk reply without {SYMBOL}"


async def test_no_position_makes_a_skip(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D(0)})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        await rig.handler.handle_proposal(entry_id, fields)
        (result,) = await rig.results()
        assert (result.plan_id, result.side, result.error, result.reason) == (
            plan_id,
            "NONE",
            reasons.SKIPPED,
            reasons.NO_POSITION,
        )


async def test_a_symbol_another_plan_holds_makes_this_plan_a_skip(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        await rig.rds.set(keys.symbol_in_flight(SYMBOL), "another-plan", px=60_000)
        entry_id, fields, plan_id = await rig.propose()
        await rig.handler.handle_proposal(entry_id, fields)
        plan = await rig.plan(plan_id)
        assert (plan.decision, plan.reason, plan.qty) == ("SKIP", reasons.DUPLICATE_IN_FLIGHT, D("0.010"))
        (result,) = await rig.results()
        assert (result.error, result.reason) == (reasons.SKIPPED, reasons.DUPLICATE_IN_FLIGHT)
        assert exchange.calls == [] and rig.handler.waiter.waiting == 0
        assert await rig.rds.get(keys.symbol_in_flight(SYMBOL)) == "another-plan"  # not taken, not released
        assert len(await rig.rds.xrange(keys.PLAN_STREAM)) == 1  # the SKIP is the one plan published


# --- permits that do not both come ----------------------------------------------------------------------------


async def test_a_governor_deny_ends_the_wait_at_once_with_the_deny_as_the_result(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 5000}) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        await rig.grant(plan, governor=False)
        await rig.deny(plan, "governor", reasons.KILL_SWITCH_ON)
        await asyncio.wait_for(task, 3)  # long before the 5 s window
        assert exchange.calls == []
        (result,) = await rig.results()
        assert (result.executed, result.error, result.reason, result.denied_by) == (
            False,
            reasons.PERMIT_DENIED,
            reasons.KILL_SWITCH_ON,
            "Governor",
        )
        assert await rig.pending() == 0 and not await rig.rds.exists(keys.executed_marker(plan_id))
        assert not await rig.rds.exists(keys.symbol_in_flight(SYMBOL))
        labels = {"issuer": "Governor", "decision": "deny", "reason": reasons.KILL_SWITCH_ON}
        assert rig.metric("qt_apply_permit_decisions_total", **labels) == 1
        labels = {"issuer": "P3.3", "decision": "allow", "reason": "sanity_checks_passed"}
        assert rig.metric("qt_apply_permit_decisions_total", **labels) == 1
        assert rig.metric("qt_apply_permit_wait_seconds_count", outcome="denied") == 1


async def test_a_p33_deny_alone_ends_the_wait(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 5000}) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        await rig.deny(plan, "p33", reasons.STALE_SNAPSHOT)
        await asyncio.wait_for(task, 3)
        (result,) = await rig.results()
        assert (result.error, result.reason, result.denied_by) == (
            reasons.PERMIT_DENIED,
            reasons.STALE_SNAPSHOT,
            "P3.3",
        )
        labels = {"issuer": "P3.3", "decision": "deny", "reason": reasons.STALE_SNAPSHOT}
        assert rig.metric("qt_apply_permit_decisions_total", **labels) == 1
        assert (
            rig.metric("qt_apply_permit_decisions_total", issuer="Governor", decision="allow", reason="policy_passed")
            == 0
        )


async def test_denies_from_both_issuers_name_both(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, _ = await rig.propose()
        plan = await rig.publish_plan(entry_id)  # both decided while Apply was away: read when it resumes
        await rig.deny(plan, "governor", reasons.KILL_SWITCH_ON)
        await rig.deny(plan, "p33", "position_mismatch")
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 5)
        (result,) = await rig.results()
        assert (result.error, result.denied_by) == (reasons.PERMIT_DENIED, "Governor, P3.3")


async def test_an_allow_found_on_resuming_and_the_other_one_arriving_later_wake_the_plan_at_once(
    store_url: str, tmp_path: Path
) -> None:
    """The Governor's allow came while Apply was away (its audit line is behind the reader); P3.3's comes
    later. The allow read on resuming is noted, so P3.3's audit line completes the pair: the order goes out
    at once, not when the window (10 s here) ends."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 10_000}) as rig:
        entry_id, fields, plan_id = await rig.propose()
        plan = await rig.publish_plan(entry_id)
        await rig.grant(plan, p33=False)
        exchange.places.append(At(filled(plan_id)))
        task = await run_proposal(rig, entry_id, fields)
        await asyncio.sleep(0.3)  # resumed, read the slots, waiting for P3.3
        assert not task.done() and exchange.calls == []
        await rig.grant(plan, governor=False)
        await asyncio.wait_for(task, 8)  # before the 10 s window (a loaded machine is slow)
        assert exchange.sends == 1


@pytest.mark.parametrize(
    ("granted", "missing"), [((), "Governor, P3.3"), (("governor",), "P3.3"), (("p33",), "Governor")]
)
async def test_a_window_without_both_permits_ends_in_a_timeout_naming_the_missing(
    store_url: str, tmp_path: Path, granted: tuple[str, ...], missing: str
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        await rig.grant(plan, governor="governor" in granted, p33="p33" in granted)
        await asyncio.wait_for(task, 5)
        assert exchange.calls == []
        (result,) = await rig.results()
        assert (result.executed, result.error, result.missing) == (False, reasons.PERMIT_TIMEOUT, missing)
        assert rig.metric("qt_apply_permit_wait_seconds_count", outcome="timeout") == 1
        assert rig.metric("qt_apply_permit_wait_seconds_sum", outcome="timeout") >= 0.3
        for slot, name in (("governor", "Governor"), ("p33", "P3.3")):
            assert rig.metric("qt_apply_permit_timeouts_total", missing=name) == (slot not in granted)
        assert await rig.pending() == 0


# --- the order's outcome --------------------------------------------------------------------------------------


async def test_a_rejection_is_the_result_with_the_exchanges_code_and_message(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        message = "ReduceOnly Order is rejected. " + "x" * 300
        exchange.places.append(At(ExchangeRejected(message, -2022)))
        plan, _ = await granted_run(rig)
        assert exchange.sends == 1
        (result,) = await rig.results()
        assert (result.executed, result.error, result.exchange_code) == (False, reasons.EXCHANGE_REJECTED, -2022)
        assert result.reason == message[:200] and result.client_order_id == coid(plan.plan_id)
        assert result.order_id == ""
        assert rig.metric("qt_apply_orders_total", outcome="rejected") == 1
        assert rig.metric("qt_apply_results_total", outcome=reasons.EXCHANGE_REJECTED) == 1


async def test_a_ban_is_logged_as_an_error(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        exchange.places.append(At(ExchangeBanned("IP banned until 1700000000000", 418)))
        with structlog.testing.capture_logs() as logged:
            await granted_run(rig)
        (result,) = await rig.results()
        assert (result.error, result.exchange_code) == (reasons.EXCHANGE_BANNED, 418)
        (line,) = [e for e in logged if e.get("code") == 418]
        assert line["log_level"] == "error" and line["msg"] == "IP banned until 1700000000000"


async def test_a_rejection_is_logged_as_a_warning(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        exchange.places.append(At(ExchangeRejected("refused", -2022)))
        with structlog.testing.capture_logs() as logged:
            await granted_run(rig)
        (line,) = [e for e in logged if e.get("code") == -2022]
        assert line["log_level"] == "warning" and line["msg"] == "refused"


async def test_an_unknown_outcome_publishes_nothing_and_holds_the_symbol_for_the_intent(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        exchange.places.append(At(OutcomeUnknown("RequestTimeout", 0)))
        exchange.lookups.append(At(ExchangeUnavailable("502"), mono_s=60))  # past the resolve bound at once
        plan, _ = await granted_run(rig)
        assert exchange.kinds() == ["place", "query"]
        assert await rig.results() == []
        assert await rig.pending() == 1  # the proposal stays pending: its outcome is not established
        assert await rig.rds.zscore(keys.APPLY_INTENTS, plan.plan_id) is not None
        assert await rig.rds.get(keys.symbol_in_flight(SYMBOL)) == plan.plan_id
        # held for as long as the plan's record lives, not the plan's handling bound
        ttl = await rig.rds.pttl(keys.symbol_in_flight(SYMBOL))
        assert ttl > rig.handler.handling_bound_s() * 1000 + 60_000
        assert rig.metric("qt_apply_orders_total", outcome="unknown") == 1
        assert rig.handler.executing == set()


async def test_an_unknown_outcome_holds_the_symbol_while_its_intent_is_recorded(store_url: str, tmp_path: Path) -> None:
    async with apply_rig(store_url, tmp_path, scripted()) as rig:
        entry_id, _, plan_id = await rig.propose()
        plan = await rig.publish_plan(entry_id)
        await rig.rds.zadd(keys.APPLY_INTENTS, {plan_id: rig.clock.wall()})
        run = PlanRun(plan, entry_id, rig.handler.log, rig.epoch)
        await rig.handler._conclude(run, coid(plan_id), OrderOutcome(OutcomeKind.UNKNOWN, message="timeout"))
        assert await rig.rds.get(keys.symbol_in_flight(SYMBOL)) == plan_id
        assert await rig.results() == []  # the intent sweep resolves it later


async def test_an_unknown_outcome_whose_intent_was_resolved_meanwhile_is_left_to_that_result(
    store_url: str, tmp_path: Path
) -> None:
    async with apply_rig(store_url, tmp_path, scripted()) as rig:
        entry_id, _, plan_id = await rig.propose()
        plan = await rig.publish_plan(entry_id)
        await rig.rds.set(keys.result_marker(plan_id), "5-0")  # the sweep published its result: no intent left
        run = PlanRun(plan, entry_id, rig.handler.log, rig.epoch)
        await rig.handler._conclude(run, coid(plan_id), OrderOutcome(OutcomeKind.UNKNOWN, message="timeout"))
        assert not await rig.rds.exists(keys.symbol_in_flight(SYMBOL))
        assert await rig.results() == []


async def test_an_unknown_outcome_whose_intent_the_store_forgot_is_resolved_by_its_handler(
    store_url: str, tmp_path: Path
) -> None:
    """The store changed instance while the order's outcome was unknown and came back without the plan's intent
    (and result): no sweep would ever find it. The handler keeps asking the exchange itself until it can tell,
    and publishes what it finds. Before the fix it logged and left the plan without a result."""
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, _, plan_id = await rig.propose()
        plan = await rig.publish_plan(entry_id)
        exchange.lookups += [At(ExchangeUnavailable("502 Bad Gateway"), mono_s=60), At(filled(plan_id))]
        run = PlanRun(plan, entry_id, rig.handler.log, rig.epoch)
        with structlog.testing.capture_logs() as logged:
            await asyncio.wait_for(
                rig.handler._conclude(run, coid(plan_id), OrderOutcome(OutcomeKind.UNKNOWN, message="timeout")), 10
            )
        assert [e for e in logged if "no longer recorded" in e["event"]]
        (result,) = await rig.results()
        assert (result.plan_id, result.executed, result.order_id) == (plan_id, True, "7001")
        assert exchange.kinds() == ["query", "query"]
        assert rig.metric("qt_apply_truth_lookups_total", why="unknown_outcome_forgotten") == 1


async def test_an_unclear_send_found_filled_is_the_fill_without_a_resend(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        exchange.places.append(At(OutcomeUnknown("-1007 timeout", -1007)))
        exchange.lookups.append(At(filled(plan_id)))
        task = await run_proposal(rig, entry_id, fields)
        await rig.grant(await rig.plan(plan_id))
        await asyncio.wait_for(task, 10)
        assert exchange.kinds() == ["place", "query"]
        (result,) = await rig.results()
        assert result.executed and result.order_id == "7001"


# --- plans the store holds already (a restart, a racing handler) --------------------------------------------


async def test_a_plan_resumed_inside_its_window_with_both_permits_is_sent_at_once(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 5000}) as rig:
        entry_id, fields, plan_id = await rig.propose()
        plan = await rig.publish_plan(entry_id, age_s=1.0)
        await rig.grant(plan)  # decided before the restart: no audit line will wake it now
        exchange.places.append(At(filled(plan_id)))
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 2)
        (call,) = exchange.calls
        assert call.kind == "place" and call.qty == D("0.010")
        # the window runs from the plan's creation: 4 s of the 5 s were left
        assert call.deadline_ms is not None and 3000 < call.deadline_ms - call.at_ms <= 4000
        (result,) = await rig.results()
        assert result.executed and await rig.pending() == 0
        assert exchange.position_reads == []  # planned before: no position read
        assert rig.metric("qt_apply_permit_wait_seconds_count", outcome="consumed") == 0  # a resume is not timed
        assert rig.handler.waiter.waiting == 0


async def test_the_consumption_is_audited_with_both_permits_and_the_plans_latency(
    store_url: str, tmp_path: Path
) -> None:
    """A plan published 50 s ago (another handler, before a restart) consumed now: two ``consumed`` audit lines
    with the exact permits, the time and the latency from the plan's creation; the marker keeps the order's
    quantity in plain digits (P3.3's safe quantity, 0.0000001 here, never 1E-7)."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 60_000}) as rig:
        entry_id, fields, plan_id = await rig.propose()
        plan = await rig.publish_plan(entry_id, age_s=50)
        await rig.grant(plan, qty=1e-7)
        slots = (keys.governor_permit(plan_id), keys.p33_permit(plan_id))
        raws = [await rig.rds.get(k) for k in slots]
        exchange.places.append(At(filled(plan_id, "0.0000001")))
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 10)
        consumed = [f for _, f in await rig.rds.xrange(keys.AUDIT_STREAM) if f.get("decision") == "consumed"]
        assert [(f["reason"], f["permit"]) for f in consumed] == [("governor", raws[0]), ("p33", raws[1])]
        assert [await rig.rds.get(k) for k in slots] == [None, None]  # consumed: gone
        marker = json.loads(await rig.rds.get(keys.executed_marker(plan_id)))
        assert marker["qty"] == "0.0000001"
        for line in consumed:
            assert (line["plan_id"], line["symbol"], line["issuer"]) == (plan_id, SYMBOL, "apply")
            assert 50_000 < float(line["latency_ms"]) < 50_040
            assert float(line["at"]) == marker["at"]
        (call,) = exchange.calls
        assert call.qty == D("0.0000001")


async def test_a_resumed_plan_waits_only_what_is_left_of_its_window(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 5000}) as rig:
        entry_id, fields, _ = await rig.propose()
        await rig.publish_plan(entry_id, age_s=4.7)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 4)
        assert asyncio.get_running_loop().time() - started < 2.0  # about 0.3 s, never a new 5 s window
        (result,) = await rig.results()
        assert (result.error, result.missing) == (reasons.PERMIT_TIMEOUT, "Governor, P3.3")


async def test_a_resumed_plan_whose_permits_come_after_its_window_is_not_sent(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        plan = await rig.publish_plan(entry_id, age_s=5.0)  # its 0.8 s window closed while Apply was down
        await rig.grant(plan)
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 2)
        assert exchange.calls == []
        (result,) = await rig.results()
        assert (result.executed, result.error) == (False, reasons.WINDOW_EXPIRED)
        assert not await rig.rds.exists(keys.executed_marker(plan_id))  # nothing consumed
        assert await rig.rds.exists(keys.governor_permit(plan_id)) and await rig.rds.exists(keys.p33_permit(plan_id))


async def test_a_resumed_skip_publishes_its_skip(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, _ = await rig.propose()
        plan = await rig.publish_plan(entry_id, qty="0")
        assert (plan.decision, plan.reason) == ("SKIP", reasons.NO_POSITION)
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 2)
        (result,) = await rig.results()
        assert (result.error, result.reason) == (reasons.SKIPPED, reasons.NO_POSITION)
        assert rig.handler.waiter.waiting == 0


async def test_a_proposal_with_a_result_is_only_acknowledged(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        await rig.rds.set(keys.result_marker(plan_id), "1")
        await rig.handler.handle_proposal(entry_id, fields)
        assert await rig.pending() == 0
        assert exchange.calls == [] and exchange.position_reads == []
        assert await rig.results() == [] and not await rig.rds.exists(keys.plan_record(plan_id))


async def test_two_handlers_of_one_proposal_publish_one_plan_and_send_one_order(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        exchange.places.append(At(filled(plan_id)))
        tasks = [await run_proposal(rig, entry_id, fields) for _ in range(2)]
        plan = await rig.plan(plan_id)
        await rig.grant(plan)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        # in one process the second waits for the first (one handler per plan) and finds the result: no lookup
        assert exchange.kinds() == ["place"]
        assert len(await rig.rds.xrange(keys.PLAN_STREAM)) == 1
        (result,) = await rig.results()
        assert result.executed and await rig.pending() == 0


async def test_a_plan_published_by_another_handler_meanwhile_is_followed_and_its_timeout_asks_nobody(
    store_url: str, tmp_path: Path
) -> None:
    """Another handler publishes the plan while this one reads the position: this one's publication finds it
    there and follows that plan, as vouched for as its own: its timeout needs no lookup (the store's records
    are complete)."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        entry_id, fields, plan_id = await rig.propose()

        async def the_other_handler_publishes() -> None:
            await rig.publish_plan(entry_id)

        exchange.during_position_read = the_other_handler_publishes
        with structlog.testing.capture_logs() as logged:
            await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 10)
        assert any("resuming plan" in e["event"] for e in logged)  # it followed the published plan
        assert exchange.calls == [] and exchange.position_reads == [[SYMBOL]]
        (result,) = await rig.results()
        assert (result.plan_id, result.error) == (plan_id, reasons.PERMIT_TIMEOUT)


# --- recovery: permits consumed, no result --------------------------------------------------------------------


async def test_an_executed_plan_without_a_result_is_looked_up_never_resent(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        plan = await rig.publish_plan(entry_id)
        await rig.consumed(plan, json.dumps({"client_order_id": "qt-elsewhere00000000", "at": plan.created_at}))
        exchange.lookups.append(At(filled(plan_id)))
        await rig.handler.handle_proposal(entry_id, fields)
        (call,) = exchange.calls
        assert (call.kind, call.client_order_id) == ("query", "qt-elsewhere00000000")  # the id the marker names
        (result,) = await rig.results()
        assert result.executed and result.order_id == "7001" and result.adopted is False
        assert await rig.pending() == 0


@pytest.mark.parametrize("marker", ["not json", "[1, 2]", ""])
async def test_an_unreadable_executed_marker_means_the_plans_own_client_id(
    store_url: str, tmp_path: Path, marker: str
) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        plan = await rig.publish_plan(entry_id)
        await rig.consumed(plan, marker or "{}")
        exchange.lookups.append(At(filled(plan_id)))
        await rig.handler.handle_proposal(entry_id, fields)
        (call,) = exchange.calls
        assert call.client_order_id == coid(plan_id)


async def test_a_plan_recovered_without_a_marker_is_looked_up_by_its_own_client_id(
    store_url: str, tmp_path: Path
) -> None:
    """The marker may be gone by the time a refused publication recovers the plan (it expires)."""
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, _, plan_id = await rig.propose()
        plan = await rig.publish_plan(entry_id)
        exchange.lookups.append(At(filled(plan_id)))
        await rig.handler.recover(plan, entry_id, None, rig.handler.log)
        (call,) = exchange.calls
        assert (call.client_order_id, call.symbol) == (coid(plan_id), SYMBOL)
        (result,) = await rig.results()
        assert result.executed


async def test_absent_is_final_only_after_a_send_signed_at_the_consumption_could_show(
    store_url: str, tmp_path: Path
) -> None:
    """A marker stamped after the plan's window (clocks apart): the lookups go on until a request signed then
    could no longer execute, not just until the window's end plus the horizon."""
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        plan = await rig.publish_plan(entry_id)
        await rig.consumed(plan, at=plan.created_at + 5.0)
        horizon = rig.apply.settings.exchange.late_execution_horizon_ms  # longer than recvWindow + margin here
        settled_ms = (plan.created_at + 5.0) * 1000 + horizon
        exchange.lookups += [At(None, ms=settled_ms - 5), At(None, ms=settled_ms + 1)]
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 5)
        assert exchange.kinds() == ["query", "query"]
        (result,) = await rig.results()
        assert (result.executed, result.error, result.client_order_id) == (
            False,
            reasons.ORDER_NOT_PLACED,
            coid(plan_id),
        )


async def test_absent_is_final_after_the_window_of_a_send_at_its_end(store_url: str, tmp_path: Path) -> None:
    """A marker from inside the window: the bound is a request signed at the window's end (a resend's latest)."""
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, _ = await rig.propose()
        plan = await rig.publish_plan(entry_id)
        await rig.consumed(plan, at=plan.created_at + 0.1)
        horizon = rig.apply.settings.exchange.late_execution_horizon_ms
        settled_ms = (plan.created_at + 0.8) * 1000 + horizon
        exchange.lookups += [At(None, ms=settled_ms - 5), At(None, ms=settled_ms + 1)]
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 5)
        assert exchange.kinds() == ["query", "query"]


async def test_the_consumption_time_is_put_on_the_exchanges_clock(store_url: str, tmp_path: Path) -> None:
    """The marker's time is Apply's clock; the exchange's runs 3 s ahead here: a request signed at the
    consumption could execute until 3 s later on the exchange's clock than on Apply's."""
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, _ = await rig.propose()
        plan = await rig.publish_plan(entry_id)
        await rig.consumed(plan, at=plan.created_at + 5.0)
        horizon = rig.apply.settings.exchange.late_execution_horizon_ms
        settled_ms = (plan.created_at + 5.0) * 1000 + 3000 + horizon
        exchange.lookups += [At(None, ms=settled_ms - 100), At(None, ms=settled_ms + 100)]
        exchange.ms = rig.clock.wall() * 1000 + 3000
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 5)
        assert exchange.kinds() == ["query", "query"]
        (result,) = await rig.results()
        assert result.error == reasons.ORDER_NOT_PLACED


# --- proposals the store cannot vouch for ---------------------------------------------------------------------

OLD_ENTRY = "1-1"  # older than the store's epoch (and than a day): the store may have forgotten its answer


async def test_an_old_proposal_whose_order_the_exchange_has_adopts_that_order(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose(entry_id=OLD_ENTRY)
        assert rig.handler.truth.vouching(entry_id) is None
        exchange.lookups.append(At(filled(plan_id, "0.3", side="BUY")))
        await rig.handler.handle_proposal(entry_id, fields)
        assert exchange.kinds() == ["query"] and exchange.calls[0].client_order_id == coid(plan_id)
        (result,) = await rig.results()
        # no record of the plan: its side is the one the order closed (a BUY closes a short)
        assert (result.plan_id, result.side, result.executed, result.adopted) == (plan_id, "SHORT", True, True)
        assert result.filled_qty == D("0.3") and await rig.pending() == 0
        assert rig.metric("qt_apply_adopted_orders_total") == 1
        assert rig.metric("qt_apply_truth_lookups_total", why="older_than_store") == 1
        assert not await rig.rds.exists(keys.plan_record(plan_id))  # never planned now


async def test_an_old_proposal_with_a_record_keeps_the_records_side(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose(entry_id=OLD_ENTRY)
        await rig.publish_plan(entry_id)
        exchange.lookups.append(At(filled(plan_id, side="BUY")))
        await rig.handler.handle_proposal(entry_id, fields)
        (result,) = await rig.results()
        assert (result.side, result.adopted) == ("LONG", True)


@pytest.mark.parametrize(("order_side", "side"), [("SELL", "LONG"), ("BUY", "SHORT"), ("", "NONE")])
async def test_an_old_proposal_without_a_record_takes_the_side_its_order_closed(
    store_url: str, tmp_path: Path, order_side: str, side: str
) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose(entry_id=OLD_ENTRY)
        exchange.lookups.append(At(filled(plan_id, side=order_side)))
        await rig.handler.handle_proposal(entry_id, fields)
        (result,) = await rig.results()
        assert (result.side, result.adopted) == (side, True)


async def test_an_old_proposal_with_an_old_record_is_absent_once_that_records_window_is_settled(
    store_url: str, tmp_path: Path
) -> None:
    """The record bounds the plan's sends by its own window (an hour ago here), not by the store's epoch (ten
    seconds ago): one lookup proves there is no order."""
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose(entry_id=OLD_ENTRY)
        await rig.publish_plan(entry_id, age_s=3600)
        rig.apply.watch.epoch = replace(rig.epoch, since=rig.clock.wall() - 10)
        exchange.lookups.append(At(None))
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 5)
        (call,) = exchange.calls
        assert (call.kind, call.client_order_id, call.symbol) == ("query", coid(plan_id), SYMBOL)
        (result,) = await rig.results()
        assert (result.error, result.side) == (reasons.STORE_CHANGED, "LONG")


async def test_an_old_proposal_without_an_order_is_not_executed(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose(entry_id=OLD_ENTRY)
        exchange.lookups.append(At(None, ms=rig.clock.wall() * 1000 + FAR_MS))  # settled: one lookup proves it
        await rig.handler.handle_proposal(entry_id, fields)
        assert exchange.kinds() == ["query"] and exchange.position_reads == []
        (result,) = await rig.results()
        assert (result.plan_id, result.side, result.executed, result.error) == (
            plan_id,
            "NONE",
            False,
            reasons.STORE_CHANGED,
        )
        assert await rig.pending() == 0 and rig.metric("qt_apply_adopted_orders_total") == 0


async def test_while_the_exchange_cannot_tell_the_lookup_is_asked_again(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, _ = await rig.propose(entry_id=OLD_ENTRY)
        settled = rig.clock.wall() * 1000 + FAR_MS  # one lookup that finds nothing proves it
        exchange.lookups += [At(ExchangeUnavailable("502 Bad Gateway"), mono_s=60), At(None, ms=settled)]
        with structlog.testing.capture_logs() as logged:
            await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 5)
        assert exchange.kinds() == ["query", "query"]
        (again,) = [e for e in logged if "asking again" in e["event"]]
        assert again["error"] == "502 Bad Gateway" and again["log_level"] == "warning"
        (result,) = await rig.results()
        assert result.error == reasons.STORE_CHANGED
        assert rig.metric("qt_apply_truth_lookups_total", why="older_than_store") == 1  # one ask, two lookups


async def another_epoch(rig: Rig) -> None:
    """The store became another instance (a restart, a failover) while the plan was handled."""
    epoch = rig.apply.watch.epoch
    rig.apply.watch.epoch = replace(epoch, since=epoch.since + 1, key=f"{epoch.key}-another")


async def test_a_store_change_after_the_consume_is_looked_up_and_not_sent(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        await another_epoch(rig)
        exchange.lookups.append(At(None, ms=rig.clock.wall() * 1000 + FAR_MS))
        await rig.grant(plan)
        await asyncio.wait_for(task, 5)
        assert exchange.kinds() == ["query"]
        (result,) = await rig.results()
        assert (result.executed, result.error, result.client_order_id) == (
            False,
            reasons.STORE_CHANGED,
            coid(plan_id),
        )
        assert await rig.rds.exists(keys.executed_marker(plan_id))  # consumed here: its result is its own word
        assert rig.metric("qt_apply_truth_lookups_total", why="store_changed_before_send") == 1
        assert rig.handler.executing == set()


async def test_a_store_change_after_the_consume_asks_until_the_plans_window_is_settled(
    store_url: str, tmp_path: Path
) -> None:
    """The lookups before the send that never happens: by the plan's client id and symbol, asked again while
    the exchange cannot tell, and absent only once a request signed at the plan's window end could no longer
    execute (the plan's own window, not the store's epoch, bounds its sends)."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        await another_epoch(rig)
        settled_ms = (plan.created_at + 0.8) * 1000 + rig.apply.settings.exchange.late_execution_horizon_ms
        exchange.lookups += [
            At(ExchangeUnavailable("502 Bad Gateway"), mono_s=60),
            At(None, ms=settled_ms - 5),
            At(None, ms=settled_ms + 1),
        ]
        with structlog.testing.capture_logs() as logged:
            await rig.grant(plan)
            await asyncio.wait_for(task, 5)
        assert exchange.kinds() == ["query"] * 3
        assert {(c.client_order_id, c.symbol) for c in exchange.calls} == {(coid(plan_id), SYMBOL)}
        (again,) = [e for e in logged if "asking again" in e["event"]]
        assert again["plan_id"] == plan_id  # the plan's own log
        (result,) = await rig.results()
        assert (result.executed, result.error) == (False, reasons.STORE_CHANGED)


async def test_a_store_change_after_the_consume_with_the_order_found_publishes_it(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        await another_epoch(rig)
        exchange.lookups.append(At(filled(plan_id)))
        await rig.grant(plan)
        await asyncio.wait_for(task, 5)
        assert exchange.kinds() == ["query"]
        (result,) = await rig.results()
        assert result.executed and result.adopted is False


async def timed_out_after_a_store_change(
    rig: Rig, lookups: Callable[[str], list[At]]
) -> tuple[str, list[dict[str, Any]]]:
    """A plan whose window ends without permits after the store became another instance: its timeout result
    waits for the exchange's word (``lookups(plan_id)`` scripts it). The plan id, and what was logged."""
    entry_id, fields, plan_id = await rig.propose()
    task = await run_proposal(rig, entry_id, fields)
    await rig.plan(plan_id)
    await another_epoch(rig)
    rig.exchange.lookups += lookups(plan_id)
    with structlog.testing.capture_logs() as logged:
        await asyncio.wait_for(task, 5)
    return plan_id, logged


async def test_a_store_change_before_a_timeout_result_lets_the_exchange_have_the_last_word(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        plan_id, _ = await timed_out_after_a_store_change(rig, lambda plan_id: [At(filled(plan_id))])
        (result,) = await rig.results()
        assert (result.executed, result.adopted) == (True, True)
        assert rig.metric("qt_apply_truth_lookups_total", why="store_changed_before_result") == 1
        assert [(c.client_order_id, c.symbol) for c in exchange.calls] == [(coid(plan_id), SYMBOL)]


async def test_a_store_change_before_a_timeout_result_asks_again_while_the_exchange_cannot_tell(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        plan_id, logged = await timed_out_after_a_store_change(
            rig, lambda plan_id: [At(ExchangeUnavailable("502 Bad Gateway"), mono_s=60), At(filled(plan_id))]
        )
        (again,) = [e for e in logged if "asking again" in e["event"]]
        assert again["plan_id"] == plan_id  # the plan's own log
        (result,) = await rig.results()
        assert (result.executed, result.adopted) == (True, True)


async def test_a_store_change_before_a_timeout_result_without_an_order_publishes_the_timeout(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        await timed_out_after_a_store_change(rig, lambda _: [At(None, ms=rig.clock.wall() * 1000 + FAR_MS)])
        (result,) = await rig.results()
        assert (result.error, result.adopted) == (reasons.PERMIT_TIMEOUT, False)


# --- the permits' own checks ----------------------------------------------------------------------------------


async def test_a_forged_permit_is_audited_once_per_distinct_bytes_and_the_genuine_one_is_used(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 5000}) as rig:
        entry_id, fields, plan_id = await rig.propose()
        exchange.places.append(At(filled(plan_id)))
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        await rig.grant(plan, governor=False)
        forged = governor_permit(plan, key="attacker-key")
        for _ in range(2):  # the same bytes twice: one audit line
            await rig.write_permit(plan, keys.governor_permit(plan_id), forged, "governor", "allow", "policy_passed")
            await until_audited(rig, 1)
        other = governor_permit(plan, key="attacker-key", reason="another")
        await rig.write_permit(plan, keys.governor_permit(plan_id), other, "governor", "allow", "policy_passed")
        await until_audited(rig, 2)
        await rig.grant(plan, p33=False)
        await asyncio.wait_for(task, 5)
        rejected = await rejections(rig)
        assert [(e["plan_id"], e["subject"], e["reason"], e["symbol"]) for e in rejected] == [
            (plan_id, "governor", reasons.BAD_SIGNATURE, SYMBOL)
        ] * 2
        assert all(abs(float(e["at"]) - rig.clock.wall()) < 5 for e in rejected)
        assert rig.metric("qt_apply_rejected_permits_total", reason=reasons.BAD_SIGNATURE) == 2
        assert exchange.sends == 1


async def test_a_permit_replaced_between_its_check_and_the_consume_is_read_again_and_the_new_one_used(
    store_url: str, tmp_path: Path
) -> None:
    """P3.3 reissues its permit (a smaller safe quantity) just after Apply checked the first one: the consume
    refuses the bytes Apply checked, Apply reads both slots again and sends what the new permit allows."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        exchange.places.append(At(filled(plan_id, "0.004")))
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        scripts = rig.handler.gate._scripts
        consume = scripts.consume_permits
        calls: list[str] = []

        async def reissued_first(**kwargs: object) -> str:
            if not calls:
                raw = p33_permit(plan, safe_close_qty=0.004)
                await rig.rds.set(keys.p33_permit(plan_id), raw, ex=60)
            calls.append(str(await consume(**kwargs)))
            return calls[-1]

        scripts.consume_permits = reissued_first
        with structlog.testing.capture_logs() as logged:
            await rig.grant(plan)
            await asyncio.wait_for(task, 10)
        assert calls[-1] == "ok" and len(calls) == 2
        (reread,) = [e for e in logged if "changed between check and consume" in e["event"]]
        assert reread["status"] == calls[0] and reread["plan_id"] == plan_id  # the plan's own log
        (call,) = exchange.calls
        assert call.qty == D("0.004")


async def test_a_rejections_audit_line_is_trimmed_like_every_audit_line(store_url: str, tmp_path: Path) -> None:
    """The audit stream is bounded (approximately, as the issuers trim it: whole stream nodes at a time)."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, audit_maxlen=1000) as rig:
        async with rig.rds.pipeline(transaction=False) as pipe:
            for n in range(1300):
                pipe.xadd(keys.AUDIT_STREAM, {"plan_id": f"old{n}", "issuer": "governor", "decision": "allow"})
            await pipe.execute()
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        forged = governor_permit(plan, key="attacker-key")
        await rig.write_permit(plan, keys.governor_permit(plan_id), forged, "governor", "deny", "kill_switch_on")
        await until_audited(rig, 1)
        assert 1000 < await rig.rds.xlen(keys.AUDIT_STREAM) < 1300
        await asyncio.wait_for(task, 5)  # no valid permit came: a timeout


async def rejections(rig: Rig) -> list[dict[str, str]]:
    entries = await rig.rds.xrange(keys.AUDIT_STREAM)
    return [f for _, f in entries if f.get("issuer") == "apply" and f.get("decision") == "rejected"]


async def until_audited(rig: Rig, count: int) -> None:
    async def audited() -> bool:
        return len(await rejections(rig)) >= count

    await until(audited, 5)
    await asyncio.sleep(0.05)  # a second audit line, if any, would be written by now
    assert len(await rejections(rig)) == count


async def test_permits_consumed_by_another_handler_mid_wait_are_recovered(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        # the other handler's marker names the client id it sent (the one it wrote, not this plan's default)
        await rig.consumed(plan, json.dumps({"client_order_id": "qt-elsewhere00000000", "at": plan.created_at}))
        exchange.lookups.append(At(filled(plan_id)))
        await rig.grant(plan)
        await asyncio.wait_for(task, 5)
        assert exchange.kinds() == ["query"]  # never a second send
        assert exchange.calls[0].client_order_id == "qt-elsewhere00000000"
        (result,) = await rig.results()
        assert result.executed


async def test_the_permit_wait_is_measured_on_the_monotonic_clock_in_seconds(store_url: str, tmp_path: Path) -> None:
    """The wait's histogram gets the time from the plan's publication to its end, in seconds: 100 s here (the
    monotonic clock moved on mid-wait), plus the few milliseconds the test takes."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 60_000}) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        rig.clock.mono_shift += 100
        await rig.deny(plan, "governor", "kill_switch_active")
        await asyncio.wait_for(task, 5)
        waited = rig.metric("qt_apply_permit_wait_seconds_sum", outcome="denied")
        assert 100.0 < waited < 100.08


async def test_a_plan_finished_by_another_handler_mid_wait_ends_quietly(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        await rig.rds.set(keys.result_marker(plan_id), "1")
        await rig.grant(plan)
        await asyncio.wait_for(task, 5)
        assert exchange.calls == [] and await rig.results() == []
        assert not await rig.rds.exists(keys.executed_marker(plan_id))
        assert rig.handler.waiter.waiting == 0


async def test_a_timeout_refused_because_another_handler_consumed_recovers_that_order(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        await rig.consumed(plan)  # its permits went to another handler (and are gone from the keys)
        exchange.lookups.append(At(filled(plan_id)))
        await asyncio.wait_for(task, 5)
        assert exchange.kinds() == ["query"]
        (result,) = await rig.results()
        assert result.executed and result.error == ""


# --- what never becomes a plan --------------------------------------------------------------------------------


async def test_a_malformed_proposal_is_dead_lettered_and_acknowledged(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        fields = {"symbol": SYMBOL, "action": "FULL_CLOSE"}  # no proposal_id
        entry_id = await rig.rds.xadd(keys.PROPOSAL_STREAM, fields)
        await rig.rds.xreadgroup(keys.APPLY_GROUP, "apply-rig", {keys.PROPOSAL_STREAM: ">"})
        await rig.handler.handle_proposal(entry_id, fields)
        (dead,) = [f for _, f in await rig.rds.xrange(keys.PROPOSAL_DLQ)]
        assert (dead["source_id"], dead["source_stream"], dead["service"]) == (entry_id, keys.PROPOSAL_STREAM, "apply")
        assert (dead["orig.symbol"], dead["orig.action"]) == (SYMBOL, "FULL_CLOSE")  # the entry's own fields
        assert dead["error"].startswith(f"{reasons.MALFORMED_ENTRY}: ") and "proposal_id" in dead["error"]
        assert await rig.pending() == 0 and await rig.rds.xlen(keys.PLAN_STREAM) == 0
        assert rig.metric("qt_apply_dead_letters_total") == 1
        assert exchange.calls == [] and exchange.position_reads == []


async def test_a_poisoned_proposal_whose_plan_waits_ends_with_its_one_result(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        await rig.publish_plan(entry_id)
        exchange.lookups.append(At(None, ms=rig.clock.wall() * 1000 + FAR_MS))  # asked first: no order
        await rig.handler.finish_poisoned(entry_id, fields)
        assert exchange.kinds() == ["query"]
        (result,) = await rig.results()
        assert (result.plan_id, result.error, result.reason) == (plan_id, reasons.DEAD_LETTERED, "delivered too often")
        assert rig.metric("qt_apply_truth_lookups_total", why="store_changed_before_result") == 1


async def test_a_poisoned_proposal_whose_order_exists_adopts_it(store_url: str, tmp_path: Path) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        await rig.publish_plan(entry_id)
        exchange.lookups.append(At(filled(plan_id)))
        await rig.handler.finish_poisoned(entry_id, fields)
        (result,) = await rig.results()
        assert (result.executed, result.adopted) == (True, True)


@pytest.mark.parametrize("state", ["malformed", "never_planned", "has_result", "executed"])
async def test_a_poisoned_proposal_without_a_waiting_plan_publishes_nothing(
    store_url: str, tmp_path: Path, state: str
) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        if state == "malformed":
            fields = {"symbol": SYMBOL}
        if state in ("has_result", "executed", "malformed"):
            plan = await rig.publish_plan(entry_id)
            if state == "has_result":
                await rig.rds.set(keys.result_marker(plan_id), "1")
            if state == "executed":
                await rig.consumed(plan)
        await rig.handler.finish_poisoned(entry_id, fields)
        assert await rig.results() == [] and exchange.calls == []


# --- the store changes instance between the handler's check and the script (issue 20, point 5) ---------------


async def another_instance_recorded(rig: Rig) -> None:
    """What a connection reaching another instance writes before anything else: that instance's epoch. The
    handler's own view (its watch's epoch) has not changed yet: only the scripts, inside the store, can see it."""
    await rig.rds.hset(
        keys.STORE_EPOCH, mapping={"run_id": "another-instance", "floor": "1-0", "key": "another-instance|1-0"}
    )


async def test_the_consume_script_refuses_once_the_store_is_another_instance_and_nothing_is_sent(
    store_url: str, tmp_path: Path
) -> None:
    """Both permits arrive after the store changed instance: the consume script compares the epoch the plan was
    vouched on with the store's record, consumes nothing, and the exchange decides (no order: store_changed).
    Before the check the permits were consumed on the new instance and the order was sent."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        plan = await rig.plan(plan_id)
        await another_instance_recorded(rig)
        exchange.lookups.append(At(None, ms=rig.clock.wall() * 1000 + FAR_MS))
        await rig.grant(plan)
        await asyncio.wait_for(task, 10)

        assert exchange.kinds() == ["query"]
        assert not await rig.rds.exists(keys.executed_marker(plan_id))
        assert await rig.rds.exists(keys.governor_permit(plan_id), keys.p33_permit(plan_id)) == 2  # not consumed
        (result,) = await rig.results()
        assert (result.executed, result.error) == (False, reasons.STORE_CHANGED)
        assert rig.metric("qt_apply_truth_lookups_total", why="store_changed_at_consume") == 1


async def test_a_timeout_is_not_published_once_the_store_is_another_instance_the_order_found_is(
    store_url: str, tmp_path: Path
) -> None:
    """The plan times out after the store changed instance (another handler may have consumed its permits on
    the old one and sent the order): the result script refuses the timeout, the exchange is asked, and the
    order it has is the result. Before the check ``permit_timeout`` was published while that order filled."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        entry_id, fields, plan_id = await rig.propose()
        task = await run_proposal(rig, entry_id, fields)
        await rig.plan(plan_id)
        await another_instance_recorded(rig)
        exchange.lookups.append(At(filled(plan_id)))
        await asyncio.wait_for(task, 10)

        assert exchange.kinds() == ["query"]
        (result,) = await rig.results()
        assert (result.executed, result.adopted, result.order_id) == (True, True, "7001")
        assert rig.metric("qt_apply_truth_lookups_total", why="store_changed_at_result") == 1


async def test_a_timeout_on_the_same_instance_is_published_without_asking(store_url: str, tmp_path: Path) -> None:
    """The check costs nothing when the store is the instance that vouched: no lookup, the timeout stands."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        entry_id, fields, _ = await rig.propose()
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 10)
        assert exchange.kinds() == []
        (result,) = await rig.results()
        assert result.error == reasons.PERMIT_TIMEOUT
