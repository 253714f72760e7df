"""The Apply service around its handler (services/apply/service.py): the group loop hands each proposal to its own
task, at most ``max_in_flight`` at once, never twice at the same time; takes over proposals of a stopped Apply
only after the longest a live one could still be handling them; ends poison with its one result; retries a
plan's steps after a store error; and, when the store is another instance, starts the audit reader again and
searches the exchange for forgotten orders.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import pytest
import structlog
from apply_rig import SYMBOL, Rig, apply_rig, filled

from conftest import until
from quantum_trader.bus import keys
from quantum_trader.bus.embedded import EmbeddedStore
from quantum_trader.domain import reasons
from quantum_trader.domain.trust import StoreIdentity
from quantum_trader.exchange.base import ExchangeUnavailable
from quantum_trader.tasks import cancel_and_wait
from scripted import At, ScriptedExchange

pytestmark = pytest.mark.integration
D = Decimal


def scripted(held: dict[str, Decimal] | Exception | None = None) -> ScriptedExchange:
    # the store instance is new to Apply: its sweep searches the exchange for forgotten orders (none here)
    return ScriptedExchange(None, [], [], held=held, history={})  # type: ignore[arg-type]


def close(proposal_id: str, symbol: str) -> dict[str, str]:
    return {"proposal_id": proposal_id, "symbol": symbol, "action": "FULL_CLOSE"}


@asynccontextmanager
async def running(rig: Rig) -> AsyncIterator[asyncio.Task[None]]:
    """The whole service loop (group reader, audit reader, intent sweep) as a task."""
    task = asyncio.create_task(rig.apply.run())
    await asyncio.wait_for(rig.apply.waiter.ready.wait(), 10)
    try:
        yield task
    finally:
        await cancel_and_wait([task])


async def result_count(rig: Rig, count: int, within_s: float = 10) -> None:
    async def enough() -> bool:
        return len(await rig.results()) >= count

    await until(enough, within_s)


async def test_the_loop_takes_a_proposal_from_the_stream_to_its_result(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    before = asyncio.all_tasks()
    async with apply_rig(store_url, tmp_path, exchange, reader=False) as rig, running(rig):
        entry_id = await rig.rds.xadd(
            keys.PROPOSAL_STREAM, {"proposal_id": "p1", "symbol": SYMBOL, "action": "FULL_CLOSE"}
        )
        plan_id = (await rig.plan_of(entry_id)).plan_id
        exchange.places.append(At(filled(plan_id)))
        await rig.grant(await rig.plan(plan_id))
        await result_count(rig, 1)
        (result,) = await rig.results()
        assert result.executed and exchange.sends == 1
        await until(lambda: _pending_is(rig, 0), 5)
        assert rig.metric("qt_apply_plans_in_flight") == 0 and rig.metric("qt_apply_store_up") == 1
        symbols = sorted(rig.apply.settings.symbols)
        assert [symbol for symbol, _ in exchange.searches] == symbols  # the new instance, searched once
    assert asyncio.all_tasks() - before == set()  # stopped: its audit reader, sweep and handlers with it


async def test_the_store_up_gauge_follows_an_outage_of_the_store(tmp_path: Path) -> None:
    """A store killed under the loop (kill -9) and started again on its port."""
    store = EmbeddedStore(tmp_path / "store", persist=False)
    url = store.start()
    try:
        async with apply_rig(url, tmp_path, scripted(), reader=False) as rig, running(rig):

            async def up_is(value: float) -> bool:
                return rig.metric("qt_apply_store_up") == value

            await until(lambda: up_is(1), 5)
            store.kill()
            await until(lambda: up_is(0), 10)
            store.start()
            await until(lambda: up_is(1), 20)
    finally:
        store.stop()


async def _pending_is(rig: Rig, count: int) -> bool:
    return await rig.pending() == count


async def test_no_more_than_max_in_flight_proposals_are_handled_at_once(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010"), "ETHUSDT": D("1")})
    async with (
        apply_rig(
            store_url, tmp_path, exchange, reader=False, apply={"max_in_flight": 1, "permit_wait_ms": 5000}
        ) as rig,
        running(rig),
    ):
        first = await rig.rds.xadd(keys.PROPOSAL_STREAM, close("a", SYMBOL))
        second = await rig.rds.xadd(
            keys.PROPOSAL_STREAM, {"proposal_id": "b", "symbol": "ETHUSDT", "action": "FULL_CLOSE"}
        )
        plan = await rig.plan_of(first)
        await asyncio.sleep(0.3)  # time enough for the second to be planned, were a slot free
        assert rig.metric("qt_apply_plans_in_flight") == 1
        assert await rig.rds.xlen(keys.PLAN_STREAM) == 1 and exchange.position_reads == [[SYMBOL]]
        await rig.deny(plan, "governor", reasons.KILL_SWITCH_ON)  # the first ends: its slot goes to the second
        second_plan = await rig.plan_of(second)
        assert second_plan.symbol == "ETHUSDT"
        await rig.deny(second_plan, "governor", reasons.KILL_SWITCH_ON)
        await result_count(rig, 2)


async def test_a_proposal_handed_over_again_while_in_hand_is_not_handled_twice(store_url: str, tmp_path: Path) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        entry_id, fields, _ = await rig.propose()
        await rig.apply._dispatch(entry_id, fields)
        await rig.apply._dispatch(entry_id, fields)  # re-read after a reconnect, the first still waiting
        assert list(rig.apply._active) == [entry_id]
        await asyncio.wait_for(asyncio.gather(*rig.apply._active.values()), 5)
        assert exchange.position_reads == [[SYMBOL]]
        assert len(await rig.results()) == 1
        assert rig.apply._active == {} and rig.metric("qt_apply_plans_in_flight") == 0


async def test_a_store_error_mid_plan_retries_the_plan(store_url: str, tmp_path: Path) -> None:
    exchange = scripted(ConnectionResetError("connection reset by peer"))
    async with apply_rig(store_url, tmp_path, exchange, apply={"permit_wait_ms": 300}) as rig:
        entry_id, fields, _ = await rig.propose()
        with structlog.testing.capture_logs() as logged:
            await rig.apply._dispatch(entry_id, fields)

            async def retried() -> bool:
                return any(e["event"] == "store unavailable mid-plan, retrying" for e in logged)

            await until(retried, 5)
            exchange.held = {SYMBOL: D("0.010")}
            await asyncio.wait_for(asyncio.gather(*rig.apply._active.values()), 5)
        (line,) = [e for e in logged if e["event"] == "store unavailable mid-plan, retrying"][:1]
        assert line["entry_id"] == entry_id and line["error"] == "connection reset by peer"
        (result,) = await rig.results()
        assert result.error == reasons.PERMIT_TIMEOUT  # planned on the second try, then no permits came


async def test_an_unexpected_error_leaves_the_proposal_pending_and_the_service_running(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        entry_id, fields, plan_id = await rig.propose()
        await rig.rds.hset(keys.plan_record(plan_id), mapping={"plan_id": plan_id, "qty": "lots"})  # unreadable
        with structlog.testing.capture_logs() as logged:
            await rig.apply._dispatch(entry_id, fields)
            await asyncio.wait_for(asyncio.gather(*rig.apply._active.values()), 5)
        (line,) = [e for e in logged if e["event"] == "unexpected error; proposal left pending"]
        assert line["entry_id"] == entry_id and line["log_level"] == "error"
        assert await rig.pending() == 1 and await rig.results() == []
        assert rig.apply._active == {}


async def stranded(rig: Rig, idle_ms: int, deliveries: int = 1) -> tuple[str, str]:
    """A proposal pending with an Apply that stopped ``idle_ms`` ago, delivered ``deliveries`` times."""
    entry_id, _, plan_id = await rig.propose()
    await rig.rds.execute_command(
        "XCLAIM", keys.PROPOSAL_STREAM, keys.APPLY_GROUP, "apply-gone", 0, entry_id,
        "IDLE", idle_ms, "RETRYCOUNT", deliveries,
    )  # fmt: skip
    return entry_id, plan_id


async def test_a_stopped_applys_proposal_is_taken_over_only_after_the_handling_bound(
    store_url: str, tmp_path: Path
) -> None:
    """The claim looks for stranded entries when the loop starts, then every claim_every_s (5 s): the old one
    is taken at the first look (its result comes well before the second), the young one at neither."""
    exchange = scripted({SYMBOL: D("0.010")})
    overrides = {"claim_idle_s": 1.0, "apply": {"permit_wait_ms": 300}}
    async with apply_rig(store_url, tmp_path, exchange, reader=False, **overrides) as rig:
        bound_ms = round((rig.handler.handling_bound_s() + 15) * 1000)  # the handling bound decides, not claim_idle_s
        young, young_plan = await stranded(rig, bound_ms - 2000)
        old, _ = await stranded(rig, bound_ms + 500)
        async with running(rig):
            await result_count(rig, 1, within_s=2)  # at the first look, not the second (5 s on)
            await asyncio.sleep(0.3)
            assert not await rig.rds.exists(keys.plan_record(young_plan))  # a live Apply may still be on it
        (result,) = await rig.results()
        assert result.plan_id != young_plan and result.error == reasons.PERMIT_TIMEOUT
        owners = {e["message_id"]: e["consumer"] for e in await rig.rds.xpending_range(
            keys.PROPOSAL_STREAM, keys.APPLY_GROUP, "-", "+", 10)}  # fmt: skip
        assert owners == {young: "apply-gone"}  # the old one: taken over, answered and acknowledged
        assert old not in owners


def wall_ms(rig: Rig) -> float:
    return rig.clock.wall() * 1000


async def test_proposals_delivered_too_often_end_with_a_dead_letter_and_their_result_each(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted({SYMBOL: D("0.010")})
    async with apply_rig(store_url, tmp_path, exchange, reader=False, apply={"permit_wait_ms": 60_000}) as rig:
        bound_ms = round((rig.handler.handling_bound_s() + 15) * 1000)
        poison = [
            await stranded(rig, bound_ms + 3000, deliveries=rig.apply.settings.max_deliveries + 1) for _ in range(2)
        ]
        for entry_id, _ in poison:
            await rig.publish_plan(entry_id)  # planned by the Apply that kept dying on it
        # The first plan's first lookup fails (it is looked up again 0.2 s later: still being handled when the
        # second comes); then no order for either, each found absent once every request of it is settled (the
        # first answer moves the exchange's clock ahead, so the second comes later still).
        exchange.lookups += [At(ExchangeUnavailable("502")), At(None, ms=wall_ms(rig) + 10**8)]
        exchange.lookups.append(At(None, ms=wall_ms(rig) + 2 * 10**8))
        async with running(rig):
            await result_count(rig, 2)
        results = await rig.results()
        assert sorted((r.plan_id, r.error) for r in results) == sorted((p, reasons.DEAD_LETTERED) for _, p in poison)
        letters = [f for _, f in await rig.rds.xrange(keys.PROPOSAL_DLQ)]
        assert sorted(f["source_id"] for f in letters) == sorted(e for e, _ in poison)
        assert all(f["error"].startswith("poison: delivered") for f in letters)


async def test_another_store_instance_restarts_the_audit_reader_and_asks_for_the_orphan_search(
    store_url: str, tmp_path: Path
) -> None:
    async with apply_rig(store_url, tmp_path, scripted()) as rig:
        apply = rig.apply
        apply.sweeper.orphan_search.clear()
        event = apply.waiter.register("aa00000000000001")
        before = StoreIdentity("run-1", "repl-1")
        apply._store_changed(None, before, False)  # the first instance seen: nothing to restart
        assert not event.is_set() and not apply.sweeper.orphan_search.is_set()
        apply._store_changed(before, before, True)  # the same instance, never searched: search it
        assert apply.sweeper.orphan_search.is_set() and not event.is_set()
        apply.sweeper.orphan_search.clear()
        apply.watch.changes = 3
        apply._store_changed(before, StoreIdentity("run-2", "repl-2"), False)
        assert event.is_set()  # every waiting plan reads its permits itself
        assert rig.metric("qt_apply_store_instances_changed") == 3
        assert not apply.sweeper.orphan_search.is_set()
