"""One intent, one close: the proposal id is the client's idempotency key (issue 20, point 1).

On the Apply rig (a real store, a scripted exchange): a proposal sent again with the same id and the same
request, whenever it comes (after its result, while its plan waits, before its plan was published), is the
same plan: one plan entry, one order, one result, and every proposal entry acknowledged. The same id with
another request is refused with a plan of its own (``proposal_id_conflict``). Every plan and result carries
its proposal id, so a client finds the answer to its proposal from the streams alone, including the SKIP plan
of a proposal the store could not vouch for.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from apply_rig import SYMBOL, Rig, apply_rig, coid, filled

from quantum_trader.bus import keys
from quantum_trader.domain import reasons
from quantum_trader.domain.models import Plan, from_fields
from quantum_trader.domain.planning import plan_id_for, refusal_plan_id
from scripted import At, ScriptedExchange

pytestmark = pytest.mark.integration
D = Decimal
FAR_MS = 10**7  # exchange-clock ms after which every request of a plan is settled (absent is final)


def scripted(held: dict[str, Decimal] | None = None) -> ScriptedExchange:
    return ScriptedExchange(None, [], [], held=held)  # type: ignore[arg-type]


async def plans_on_stream(rig: Rig) -> list[Plan]:
    return [from_fields(Plan, fields) for _, fields in await rig.rds.xrange(keys.PLAN_STREAM)]


async def executed_once(rig: Rig, exchange: ScriptedExchange, proposal_id: str) -> tuple[str, str]:
    """The proposal ``proposal_id`` proposed, granted and executed: its entry id and plan id."""
    entry_id, fields, plan_id = await rig.propose(proposal_id=proposal_id)
    exchange.places.append(At(filled(plan_id)))
    task = asyncio.create_task(rig.handler.handle_proposal(entry_id, fields))
    await rig.grant(await rig.plan(plan_id))
    await asyncio.wait_for(task, 10)
    return entry_id, plan_id


async def test_a_retry_after_the_result_is_answered_by_it_and_sends_nothing(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        _, plan_id = await executed_once(rig, exchange, "strategy-7")
        again, fields, same_plan = await rig.propose(proposal_id="strategy-7", created_at="1700000999.5")
        await rig.handler.handle_proposal(again, fields)

        assert same_plan == plan_id
        assert exchange.kinds() == ["place"] and len(exchange.position_reads) == 1  # nothing read or sent again
        assert [p.plan_id for p in await plans_on_stream(rig)] == [plan_id]
        (result,) = await rig.results()
        assert (result.plan_id, result.proposal_id, result.executed) == (plan_id, "strategy-7", True)
        assert await rig.pending() == 0  # the retry's entry is acknowledged too
        assert rig.metric("qt_apply_repeated_proposals_total") == 1


async def test_a_retry_while_the_plan_waits_is_the_same_plan_one_order_one_result(
    store_url: str, tmp_path: Path
) -> None:
    """The retry arrives while the first waits for its permits: in this process it waits for the first (one
    handler per plan) and then finds its result."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        first, fields, plan_id = await rig.propose(proposal_id="strategy-8")
        exchange.places.append(At(filled(plan_id)))
        waiting = asyncio.create_task(rig.handler.handle_proposal(first, fields))
        plan = await rig.plan(plan_id)
        again, again_fields, _ = await rig.propose(proposal_id="strategy-8")
        retry = asyncio.create_task(rig.handler.handle_proposal(again, again_fields))
        await asyncio.sleep(0.05)
        assert not retry.done()  # it waits for the first handler of the plan
        await rig.grant(plan)
        await asyncio.wait_for(asyncio.gather(waiting, retry), 10)

        assert exchange.kinds() == ["place"]
        assert len(await plans_on_stream(rig)) == 1 and len(await rig.results()) == 1
        assert await rig.pending() == 0


async def test_a_retry_in_another_apply_before_the_first_plan_is_published_follows_that_plan(
    store_url: str, tmp_path: Path
) -> None:
    """Two handlers that do not share a process (the retry in a second Apply, here a second handler call made
    while the first reads the position): the second publication finds the plan published and follows it."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        first, fields, plan_id = await rig.propose(proposal_id="strategy-9")
        again, _, _ = await rig.propose(proposal_id="strategy-9")

        async def the_retry_is_published_meanwhile() -> None:
            await rig.publish_plan(again)

        exchange.during_position_read = the_retry_is_published_meanwhile
        await asyncio.wait_for(rig.handler.handle_proposal(first, fields), 10)  # follows it: times out
        (plan,) = await plans_on_stream(rig)
        assert plan.plan_id == plan_id
        (result,) = await rig.results()
        assert (result.plan_id, result.proposal_id, result.error) == (plan_id, "strategy-9", reasons.PERMIT_TIMEOUT)
        assert exchange.kinds() == []


@pytest.mark.parametrize(
    "changed",
    [{"symbol": "ETHUSDT"}, {"action": "PARTIAL_CLOSE", "qty": "0.004"}],
    ids=["other_symbol", "other_size"],
)
async def test_the_same_id_for_another_request_is_refused_with_a_plan_of_its_own(
    store_url: str, tmp_path: Path, changed: dict[str, str]
) -> None:
    exchange = scripted({SYMBOL: D("0.010"), "ETHUSDT": D("0.5")})
    async with apply_rig(store_url, tmp_path, exchange, symbols=[SYMBOL, "ETHUSDT"]) as rig:
        _, plan_id = await executed_once(rig, exchange, "strategy-10")
        extra = dict(changed)  # (the parameter is shared by the store parametrizations: not changed here)
        symbol = extra.pop("symbol", SYMBOL)
        action = extra.pop("action", "FULL_CLOSE")
        other, fields, _ = await rig.propose(symbol=symbol, action=action, proposal_id="strategy-10", **extra)
        await rig.handler.handle_proposal(other, fields)
        await rig.handler.handle_proposal(other, fields)  # redelivered: still one refusal

        refused_id = refusal_plan_id(other, "strategy-10")
        first, refusal = await plans_on_stream(rig)
        assert first.plan_id == plan_id
        assert (refusal.plan_id, refusal.proposal_id, refusal.symbol, refusal.action) == (
            refused_id,
            "strategy-10",
            symbol,
            action,
        )
        assert (refusal.decision, refusal.reason) == ("SKIP", reasons.PROPOSAL_ID_CONFLICT)
        executed, refused = await rig.results()
        assert (executed.plan_id, executed.executed) == (plan_id, True)
        assert (refused.plan_id, refused.proposal_id, refused.executed, refused.error, refused.reason) == (
            refused_id,
            "strategy-10",
            False,
            reasons.SKIPPED,
            reasons.PROPOSAL_ID_CONFLICT,
        )
        assert exchange.kinds() == ["place"]  # never looked up: the refusal's id names the first plan's order
        assert await rig.pending() == 0


async def test_a_conflict_found_at_publication_is_refused_too(store_url: str, tmp_path: Path) -> None:
    """The other request's plan is published while this one reads the position: its publication finds a plan
    that asks something else, and this proposal is refused instead of following that plan."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        first, fields, plan_id = await rig.propose(proposal_id="strategy-11", action="PARTIAL_CLOSE", qty="0.002")
        other, _, _ = await rig.propose(proposal_id="strategy-11")  # a FULL_CLOSE: another request

        async def the_other_is_published_meanwhile() -> None:
            await rig.publish_plan(other)

        exchange.during_position_read = the_other_is_published_meanwhile
        await asyncio.wait_for(rig.handler.handle_proposal(first, fields), 10)
        results = {r.plan_id: r for r in await rig.results()}
        refused = results[refusal_plan_id(first, "strategy-11")]
        assert (refused.proposal_id, refused.reason) == ("strategy-11", reasons.PROPOSAL_ID_CONFLICT)
        assert plan_id not in results  # the other proposal's plan is left to its own handler


async def test_an_old_proposal_the_store_cannot_vouch_for_gets_a_skip_plan_and_a_result_with_its_id(
    store_url: str, tmp_path: Path
) -> None:
    """Older than the store instance, no plan, no order: answered ``store_changed`` with a SKIP plan on the plan
    stream and a result, both carrying the proposal id (the client finds both by it)."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose(proposal_id="strategy-12", entry_id="1-1")
        exchange.lookups.append(At(None, ms=rig.clock.wall() * 1000 + FAR_MS))
        await rig.handler.handle_proposal(entry_id, fields)

        (plan,) = await plans_on_stream(rig)
        assert (plan.plan_id, plan.proposal_id, plan.decision, plan.reason) == (
            plan_id,
            "strategy-12",
            "SKIP",
            reasons.STORE_CHANGED,
        )
        (result,) = await rig.results()
        assert (result.plan_id, result.proposal_id, result.error) == (plan_id, "strategy-12", reasons.STORE_CHANGED)
        assert [(c.kind, c.client_order_id) for c in exchange.calls] == [("query", "qt-strategy-12")]
        assert await rig.pending() == 0


async def test_an_order_found_for_a_forgotten_plan_is_answered_under_its_proposal_id(
    store_url: str, tmp_path: Path
) -> None:
    """The store lost the plan but kept the proposal: the order found by the proposal's client id is its result,
    under the plan and proposal id that client id leads back to."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose(proposal_id="strategy-13", entry_id="1-2")
        exchange.lookups.append(At(filled(plan_id)))
        await rig.handler.handle_proposal(entry_id, fields)
        (result,) = await rig.results()
        assert (result.plan_id, result.proposal_id, result.client_order_id, result.adopted) == (
            plan_id_for("strategy-13"),
            "strategy-13",
            coid(plan_id),
            True,
        )


# --- a retry after the store forgot everything: the search for forgotten orders comes first -----------------


async def test_a_retry_of_a_forgotten_proposal_waits_for_the_search_and_is_answered_by_its_order(
    store_url: str, tmp_path: Path
) -> None:
    """The store forgot a proposal, its plan and its result; the exchange has its order. The client's retry
    (a new entry, newer than the store instance, so the store would vouch for it) waits until the exchange
    was searched, which answers the plan with its order: the retry finds that result, reads no position and
    sends nothing (before the fix it was planned at once, and a second order could follow)."""
    exchange = ScriptedExchange(None, [], [], held={SYMBOL: D("0.010")}, history={})  # type: ignore[arg-type]
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        truth = rig.apply.handler.truth
        truth.searched.clear()  # a store instance nobody has searched yet
        again, fields, plan_id = await rig.propose(proposal_id="strategy-20")
        exchange.history = {SYMBOL: [filled(plan_id)]}  # the order of the forgotten plan
        retry = asyncio.create_task(rig.handler.handle_proposal(again, fields))
        await asyncio.sleep(0.2)
        assert not retry.done() and exchange.position_reads == [] and await plans_on_stream(rig) == []

        assert await rig.apply.sweeper.adopt_orphans() is True
        assert truth.searched.is_set()
        await asyncio.wait_for(retry, 5)

        (result,) = await rig.results()
        assert (result.plan_id, result.proposal_id, result.executed, result.adopted) == (
            plan_id,
            "strategy-20",
            True,
            True,
        )
        assert exchange.kinds() == [] and exchange.position_reads == []
        assert await plans_on_stream(rig) == []  # the forgotten plan is not published again: its result is
        assert await rig.pending() == 0


async def test_a_proposal_older_than_the_instance_does_not_wait_for_the_search(store_url: str, tmp_path: Path) -> None:
    """It is looked up on the exchange anyway: waiting would only delay its answer."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        rig.apply.handler.truth.searched.clear()
        entry_id, fields, _ = await rig.propose(proposal_id="strategy-21", entry_id="1-3")
        exchange.lookups.append(At(None, ms=rig.clock.wall() * 1000 + FAR_MS))
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 5)
        (result,) = await rig.results()
        assert result.error == reasons.STORE_CHANGED


async def test_a_proposal_handled_again_after_a_store_error_on_a_store_that_lost_it_plans_nothing(
    store_url: str, tmp_path: Path
) -> None:
    """The handler held the entry in memory through a store outage; the store came back without it (an older
    snapshot). Its id is newer than the new instance's floor, so the store would vouch for it: it must not be
    planned (its first plan may have been answered, or executed, on the instance that is gone)."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, _ = await rig.propose(proposal_id="strategy-22")
        await rig.rds.xdel(keys.PROPOSAL_STREAM, entry_id)  # what the store came back without
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields, again=True), 5)
        assert await plans_on_stream(rig) == [] and await rig.results() == []
        assert exchange.position_reads == [] and exchange.kinds() == []


async def test_a_read_made_while_the_store_changed_instance_is_not_taken_at_its_word(
    store_url: str, tmp_path: Path
) -> None:
    """The handler's read of a plan's markers can be the first to reach a new instance: what it read is taken
    only if the epoch is the one it was before the read, and that epoch's forgotten orders were searched."""
    async with apply_rig(store_url, tmp_path, scripted()) as rig:
        truth = rig.apply.handler.truth
        entry_id, _, _ = await rig.propose(proposal_id="strategy-23")
        before = rig.epoch
        assert truth.read_is_vouched(entry_id, before)
        rig.apply.watch.epoch = replace(before, key="another")  # another epoch since the read began
        assert not truth.read_is_vouched(entry_id, before)
        rig.apply.watch.epoch = before
        truth.searched.clear()
        assert not truth.read_is_vouched(entry_id, before)  # not searched: wait, then read again
        assert truth.read_is_vouched("1-1", before)  # an older proposal is looked up anyway


async def test_a_proposal_that_waited_a_minute_for_an_unfinished_search_is_refused_with_a_reason(
    store_url: str, tmp_path: Path
) -> None:
    """Fail closed with an answer: search_incomplete, a SKIP plan of its own (a later retry is planned anew)."""
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        truth = rig.apply.handler.truth
        truth.searched.clear()
        truth.search_wait_s = 0.2
        entry_id, fields, _ = await rig.propose(proposal_id="strategy-24")
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 5)
        (plan,) = await plans_on_stream(rig)
        assert (plan.plan_id, plan.reason) == (refusal_plan_id(entry_id, "strategy-24"), reasons.SEARCH_INCOMPLETE)
        (result,) = await rig.results()
        assert (result.proposal_id, result.reason) == ("strategy-24", reasons.SEARCH_INCOMPLETE)
        assert exchange.position_reads == [] and await rig.pending() == 0
