"""Apply's intent sweep (services/apply/sweep.py), on a real store with a scripted exchange: which intents a
round resolves and how, and the search for orders a forgetful store lost: which symbols are searched from
when, which orders are adopted with which result, and when the search counts as done.

Each test drives one step (``resolve_intent``, ``adopt_orphans``) directly, or the loop as a task with the wall
clock held still, so that what is due is decided by the scores the test wrote, not by how long the test took.
The expected bounds are written out as numbers (not read from sweep.py), so a changed constant shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog
from apply_rig import _PROPOSALS as PLANS_MADE
from apply_rig import SYMBOL, Rig, apply_rig, coid, filled, plan_of, proposal_of

from conftest import until
from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.domain import reasons
from quantum_trader.domain.models import Plan, to_fields
from quantum_trader.exchange.base import ExchangeUnavailable, OrderReport
from quantum_trader.tasks import cancel_and_wait
from scripted import At, ScriptedExchange

pytestmark = pytest.mark.integration
D = Decimal
FAST = {"order_resolve_timeout_s": 1}  # a round every 0.5 s; stale after 0.8 + 1 + 1 + 0.5 s
# the rig's permit window, the resolve timeout, one second (no live handler is that slow), and the most two Apply
# hosts' clocks may differ (the intent's time is its host's)
STALE_S = 0.8 + 1 + 1 + 0.5
BOOKKEEPING_LESS_AN_HOUR_S = 23 * 3600  # how far back the search goes at most
MARGIN_MS = 60_000  # the search starts a minute before the newest proposal the store kept
SEARCHED = "searched the exchange for orders the store forgot"
NO_STORE = "redis://127.0.0.1:9/0"  # nothing listens there: every command fails to connect


def venue(lookups: list[At] | None = None, history: dict[str, Any] | None = None) -> ScriptedExchange:
    return ScriptedExchange(None, [], lookups or [], history=history)  # type: ignore[arg-type]


def a_plan(plan_id: str, symbol: str = SYMBOL, side: str = "LONG") -> Plan:
    return Plan(
        plan_id=plan_id,
        proposal_id=proposal_of(plan_id) if plan_id in PLANS_MADE else "p1",
        symbol=symbol,
        side=side,  # type: ignore[arg-type]
        action="FULL_CLOSE",
        qty=D("0.010"),
        decision="EXECUTE",
        reason=reasons.READY,
        steps="[]",
        plan_hash="a" * 64,
        created_at=time.time() - 30,
    )


async def store_plan(rig: Rig, plan: Plan, entry_id: str = "") -> None:
    """The plan's record as PUBLISH_PLAN writes it."""
    await rig.rds.hset(keys.plan_record(plan.plan_id), mapping={**to_fields(plan), "proposal_entry_id": entry_id})


async def proposed_plan(rig: Rig, symbol: str = SYMBOL, side: str = "LONG", proposal_id: str = "") -> Plan:
    """A proposal read by Apply's group (pending) and its plan's record."""
    entry_id, _, plan_id = await rig.propose(symbol=symbol, proposal_id=proposal_id)
    plan = a_plan(plan_id, symbol, side)
    await store_plan(rig, plan, entry_id)
    return plan


async def mark_executed(rig: Rig, plan_id: str, coid: str, side: str = "LONG") -> None:
    marker = {"client_order_id": coid, "qty": "0.010", "side": side, "at": time.time() - 20}
    await rig.rds.set(keys.executed_marker(plan_id), json.dumps(marker))


async def mark_result(rig: Rig, plan_id: str) -> None:
    await rig.rds.set(keys.result_marker(plan_id), "1-0")


async def add_intent(rig: Rig, plan_id: str, score: float) -> None:
    await rig.rds.zadd(keys.APPLY_INTENTS, {plan_id: score})


async def intents(rig: Rig) -> list[str]:
    return list(await rig.rds.zrange(keys.APPLY_INTENTS, 0, -1))


def forgotten(n: int) -> str:
    """The plan id of an order the store forgot (its proposal is gone too)."""
    return plan_of(f"forgotten-{n}")


def freeze_wall(rig: Rig, monkeypatch: pytest.MonkeyPatch, at: float | None = None) -> float:
    """Hold Apply's wall clock still (the monotonic one runs on: the sweep's rounds are real sleeps)."""
    now = time.time() if at is None else at
    monkeypatch.setattr(rig.clock, "wall", lambda: now)
    return now


def with_floor(rig: Rig, floor_ms: int, kept_ms: int) -> None:
    """The store's epoch as if the instance's floor were at ``floor_ms`` and the newest proposal it kept of what
    came before it at ``kept_ms``."""
    assert rig.apply.watch.epoch is not None
    rig.apply.watch.epoch = dataclasses.replace(rig.apply.watch.epoch, floor=(floor_ms, 7), kept=(kept_ms, 3))


async def searched_mark(rig: Rig) -> str | None:
    value = await rig.rds.hget(keys.STORE_EPOCH, "searched")
    return None if value is None else str(value)


@contextlib.asynccontextmanager
async def sweeping(rig: Rig) -> AsyncIterator[asyncio.Task[None]]:
    """The sweep's loop as the service runs it, stopped at the end."""
    task = asyncio.create_task(rig.apply.sweeper.run())
    try:
        yield task
    finally:
        await cancel_and_wait([task])


def unresolved(rig: Rig) -> float:
    return rig.metric("qt_apply_unresolved_orders")


async def gauge_is(rig: Rig, value: float, timeout: float = 3.0) -> None:
    async def reached() -> bool:
        return unresolved(rig) == value

    await until(reached, timeout)


# --- resolving one intent -------------------------------------------------------------------------------------


async def test_an_intent_whose_plan_has_a_result_is_dropped_without_asking_the_exchange(
    store_url: str, tmp_path: Path
) -> None:
    """Its outcome is established: nothing is looked up (even though the plan was executed), nothing published."""
    exchange = venue()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        plan = await proposed_plan(rig)
        await mark_executed(rig, plan.plan_id, coid(plan.plan_id))
        await mark_result(rig, plan.plan_id)
        await add_intent(rig, plan.plan_id, time.time() - 100)
        await rig.apply.sweeper.resolve_intent(plan.plan_id)
        assert await intents(rig) == []
        assert exchange.calls == [] and await rig.results() == []
        assert rig.handler.executing == set()


async def test_an_intent_whose_plan_record_is_gone_is_dropped_without_asking_the_exchange(
    store_url: str, tmp_path: Path
) -> None:
    """Its bookkeeping expired: there is no plan to publish a result for (the executed marker alone is not one)."""
    exchange = venue()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        plan_id = forgotten(1)
        await mark_executed(rig, plan_id, coid(plan_id))
        await add_intent(rig, plan_id, time.time() - 100)
        await add_intent(rig, forgotten(2), time.time() - 100)  # another intent stays
        await rig.apply.sweeper.resolve_intent(plan_id)
        assert await intents(rig) == [forgotten(2)]
        assert exchange.calls == [] and await rig.results() == []


async def test_an_executed_intent_is_recovered_from_the_order_its_marker_names(store_url: str, tmp_path: Path) -> None:
    """The order is looked up by the client id the executed marker recorded (never resent) while the plan counts
    as executing here, and its report is the plan's result, which acknowledges the plan's proposal."""
    exchange = venue()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        plan = await proposed_plan(rig)
        coid = f"qt-{plan.plan_id}-1"  # not the default client id: only the marker's can be looked up
        await mark_executed(rig, plan.plan_id, coid)
        await add_intent(rig, plan.plan_id, time.time() - 100)
        report = OrderReport("7001", coid, "FILLED", D("0.010"), D(100), "SELL", 1234)
        exchange.lookups.append(At(report))
        executing_at_lookup: list[set[str]] = []
        exchange.on_lookup = lambda: executing_at_lookup.append(set(rig.handler.executing))
        assert await rig.pending() == 1
        with structlog.testing.capture_logs() as logged:
            await rig.apply.sweeper.resolve_intent(plan.plan_id)

        assert [(c.kind, c.symbol, c.client_order_id) for c in exchange.calls] == [("query", SYMBOL, coid)]
        assert executing_at_lookup == [{plan.plan_id}]
        assert rig.handler.executing == set()
        (result,) = await rig.results()
        assert (result.plan_id, result.symbol, result.side, result.executed, result.error, result.reason) == (
            plan.plan_id,
            SYMBOL,
            "LONG",
            True,
            "",
            "FILLED",
        )
        assert (result.order_id, result.client_order_id, result.filled_qty, result.avg_price) == (
            "7001",
            coid,
            D("0.010"),
            D(100),
        )
        assert (result.order_time_ms, result.adopted) == (1234, False)
        assert await intents(rig) == [] and await rig.pending() == 0
        assert rig.metric("qt_apply_results_total", outcome="executed") == 1
        (published,) = [e for e in logged if "Result published" in e["event"]]
        assert (published["plan_id"], published["symbol"]) == (plan.plan_id, SYMBOL)


async def test_an_intent_still_unknown_after_its_lookups_stays_and_leaves_executing(
    store_url: str, tmp_path: Path
) -> None:
    """Lookups that fail past the resolve bound establish nothing: no result, the intent is kept for the next
    round, the symbol is held, and the plan no longer counts as executing."""
    exchange = venue([At(ExchangeUnavailable("order: 502"), mono_s=60)])
    async with apply_rig(store_url, tmp_path, exchange, apply=FAST) as rig:
        plan = await proposed_plan(rig)
        await mark_executed(rig, plan.plan_id, coid(plan.plan_id))
        await add_intent(rig, plan.plan_id, time.time() - 100)
        await rig.apply.sweeper.resolve_intent(plan.plan_id)
        assert exchange.kinds() == ["query"]
        assert await rig.results() == [] and await intents(rig) == [plan.plan_id]
        assert await rig.rds.get(keys.symbol_in_flight(SYMBOL)) == plan.plan_id
        assert rig.handler.executing == set() and await rig.pending() == 1


# --- the search for orders the store forgot -----------------------------------------------------------------


async def test_without_an_epoch_nothing_is_searched(store_url: str, tmp_path: Path) -> None:
    exchange = venue(history={})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        rig.apply.watch.epoch = None
        assert await rig.apply.sweeper.adopt_orphans() is False
        assert exchange.searches == [] and await searched_mark(rig) is None


async def test_the_search_covers_every_symbol_from_a_minute_before_the_newest_kept_proposal(
    store_url: str, tmp_path: Path
) -> None:
    """Sorted, each symbol of the allowlist; from the epoch's newest kept proposal (ms, not the sequence) less a
    minute, not its floor (later: proposals came after the instance began); and a search that covered every
    symbol is recorded in the instance's epoch."""
    exchange = venue(history={})
    symbols = ["XRPUSDT", "BTCUSDT", "ETHUSDT"]
    async with apply_rig(store_url, tmp_path, exchange, symbols=symbols) as rig:
        now_ms = round(time.time() * 1000)
        with_floor(rig, now_ms - 1_800_000, now_ms - 3_600_000)
        with structlog.testing.capture_logs() as logged:
            assert await rig.apply.sweeper.adopt_orphans() is True
        since = now_ms - 3_600_000 - MARGIN_MS
        assert exchange.searches == [("BTCUSDT", since), ("ETHUSDT", since), ("XRPUSDT", since)]
        assert await searched_mark(rig) == "1"
        assert [(e["event"], e["adopted"], e["complete"]) for e in logged if e["event"] == SEARCHED] == [
            (SEARCHED, 0, True)
        ]
        assert await rig.results() == []


async def test_the_search_goes_back_no_further_than_the_bookkeeping_lives_less_an_hour(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two days on, the store's newest proposal is older than any plan's records: the search starts 23 h back
    (less the minute), not at the proposal."""
    exchange = venue(history={})
    async with apply_rig(store_url, tmp_path, exchange, symbols=["ETHUSDT", "BTCUSDT"]) as rig:
        now_ms = round(time.time() * 1000)
        with_floor(rig, now_ms - 3_600_000, now_ms - 1_800_000)
        later = freeze_wall(rig, monkeypatch, float(now_ms // 1000 + 2 * 86400))
        assert await rig.apply.sweeper.adopt_orphans() is True
        since = (later - BOOKKEEPING_LESS_AN_HOUR_S) * 1000 - MARGIN_MS
        assert exchange.searches == [("BTCUSDT", since), ("ETHUSDT", since)]


async def test_only_final_orders_of_our_plans_without_result_or_intent_are_adopted(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipped: another client's order, a bare plan id (no ``qt-``), a ``qt-`` id that is no plan id, a plan
    executing here, one with a result, one with an executed marker (its intent publishes it). Adopted, each
    with adopted=True: orders of plans the store forgot entirely (the side is what the order closed: a SELL a
    LONG, a BUY a SHORT; the symbol is the one searched), and of a plan whose record is there (its own side,
    whatever the order's; its proposal acknowledged)."""
    exchange = venue(history={})
    async with apply_rig(store_url, tmp_path, exchange, symbols=["BTCUSDT", "ETHUSDT"]) as rig:
        now = freeze_wall(rig, monkeypatch)
        busy, done, executed = forgotten(2), forgotten(3), forgotten(4)
        rig.handler.executing.add(busy)
        await mark_result(rig, done)
        await mark_executed(rig, executed, coid(executed))
        kept = await proposed_plan(rig, side="LONG")
        skipped = [
            OrderReport("8001", "web_5f1c2a", "FILLED", D(1), D(100), "SELL", 1),
            OrderReport("8002", forgotten(1), "FILLED", D(1), D(100), "SELL", 2),
            OrderReport("8003", "qt-" + "x" * 33, "FILLED", D(1), D(100), "SELL", 3),  # too long for a proposal id
            OrderReport("8004", "qt-not a proposal", "FILLED", D(1), D(100), "SELL", 4),
            filled(busy),
            filled(done),
            filled(executed),
        ]
        exchange.history = {
            "BTCUSDT": [
                *skipped,
                filled(forgotten(5), "0.010", side="SELL"),
                filled(kept.plan_id, "0.010", side="BUY"),
                filled(forgotten(7), "0", side="SELL", status="EXPIRED"),
            ],
            "ETHUSDT": [filled(forgotten(6), "0.5", side="BUY")],
        }
        with structlog.testing.capture_logs() as logged:
            # not complete: the plan executing here is looked at again if it has no result by then
            assert await rig.apply.sweeper.adopt_orphans() is False

        results = await rig.results()
        assert [(r.plan_id, r.symbol, r.side, r.executed, r.error, r.reason, r.filled_qty) for r in results] == [
            (forgotten(5), "BTCUSDT", "LONG", True, "", "FILLED", D("0.010")),
            (kept.plan_id, "BTCUSDT", "LONG", True, "", "FILLED", D("0.010")),
            (forgotten(7), "BTCUSDT", "LONG", False, reasons.ORDER_NOT_FILLED, "EXPIRED", D(0)),
            (forgotten(6), "ETHUSDT", "SHORT", True, "", "FILLED", D("0.5")),
        ]
        assert all(r.adopted and r.order_id == "7001" and r.client_order_id == coid(r.plan_id) for r in results)
        stubs = [r for r in results if r.plan_id != kept.plan_id]
        assert [r.latency_ms for r in stubs] == [0.0, 0.0, 0.0]  # stand-ins made now, published now
        assert await rig.pending() == 0  # the kept plan's proposal is acknowledged by its result
        assert rig.metric("qt_apply_adopted_orders_total") == 4
        assert [(e["adopted"], e["complete"]) for e in logged if e["event"] == SEARCHED] == [(4, False)]
        adopting = [(e["plan_id"], e["symbol"]) for e in logged if "adopting it" in e["event"]]
        assert adopting == [
            (forgotten(5), "BTCUSDT"),
            (kept.plan_id, "BTCUSDT"),
            (forgotten(7), "BTCUSDT"),
            (forgotten(6), "ETHUSDT"),
        ]
        assert await searched_mark(rig) is None  # to be done again: the busy plan may still need its result
        assert rig.handler.executing == {busy}
        assert not await rig.rds.exists(keys.result_marker(busy), keys.result_marker(executed))
        assert results[0].at == now


async def test_an_open_order_leaves_the_search_incomplete_and_is_not_adopted(store_url: str, tmp_path: Path) -> None:
    """An order still open may yet fill: it is looked at again in the next search, so this one is not done
    (not recorded); the final orders after it are adopted all the same."""
    exchange = venue(history={})
    async with apply_rig(store_url, tmp_path, exchange, symbols=["BTCUSDT"]) as rig:
        exchange.history = {
            "BTCUSDT": [filled(forgotten(1), "0", status="NEW"), filled(forgotten(2), "0.010", side="SELL")]
        }
        with structlog.testing.capture_logs() as logged:
            assert await rig.apply.sweeper.adopt_orphans() is False
        assert [(r.plan_id, r.adopted) for r in await rig.results()] == [(forgotten(2), True)]
        assert await searched_mark(rig) is None
        assert [(e["adopted"], e["complete"]) for e in logged if e["event"] == SEARCHED] == [(1, False)]
        assert rig.metric("qt_apply_adopted_orders_total") == 1


async def test_a_symbol_the_exchange_cannot_search_leaves_it_incomplete_and_the_others_are_searched(
    store_url: str, tmp_path: Path
) -> None:
    exchange = venue(history={"BTCUSDT": ExchangeUnavailable("allOrders: 503"), "ETHUSDT": []})
    async with apply_rig(store_url, tmp_path, exchange, symbols=["BTCUSDT", "ETHUSDT", "SOLUSDT"]) as rig:
        exchange.history = {
            "BTCUSDT": ExchangeUnavailable("allOrders: 503"),
            "ETHUSDT": [filled(forgotten(1), "0.5", side="BUY")],
        }
        with structlog.testing.capture_logs() as logged:
            assert await rig.apply.sweeper.adopt_orphans() is False
        assert [symbol for symbol, _ in exchange.searches] == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
        assert [(r.plan_id, r.symbol, r.side, r.adopted) for r in await rig.results()] == [
            (forgotten(1), "ETHUSDT", "SHORT", True)
        ]
        warnings = [(e["event"], e["error"]) for e in logged if e["log_level"] == "warning" and "error" in e]
        assert warnings == [("BTCUSDT: cannot search for forgotten orders now", "allOrders: 503")]
        assert [(e["adopted"], e["complete"]) for e in logged if e["event"] == SEARCHED] == [(1, False)]
        assert await searched_mark(rig) is None


# --- the loop ---------------------------------------------------------------------------------------------------


async def test_a_round_resolves_the_stale_intents_only_and_counts_every_intent(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stale: older than the window plus a whole resolution plus a second plus the hosts' clock gap bound (3.3 s
    here). A fresher intent, and a
    stale one whose plan is executing in this process, are left alone; the gauge is the intents recorded."""
    exchange = venue()
    async with apply_rig(store_url, tmp_path, exchange, apply=FAST) as rig:
        rig.apply.sweeper.orphan_search.clear()
        now = freeze_wall(rig, monkeypatch)
        stale, fresh, busy = forgotten(1), forgotten(2), forgotten(3)
        for plan_id in (stale, fresh, busy):
            await mark_result(rig, plan_id)  # resolving one drops it at once: what was resolved shows
        await add_intent(rig, stale, now - STALE_S - 0.05)
        await add_intent(rig, fresh, now - STALE_S + 0.05)
        await add_intent(rig, busy, now - 100)
        rig.handler.executing.add(busy)
        async with sweeping(rig):

            async def stale_gone() -> bool:
                return stale not in await intents(rig)

            await until(stale_gone, 3)
            assert unresolved(rig) == 3  # counted before the round resolved any
            await gauge_is(rig, 2)  # the next round counts what is left
            assert await intents(rig) == [busy, fresh]
        assert exchange.calls == []


async def test_a_round_comes_every_half_resolve_timeout(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half the resolve timeout (0.8 s here), at least half a second, at most five."""
    async with apply_rig(store_url, tmp_path, venue(), apply={"order_resolve_timeout_s": 1.6}) as rig:
        rig.apply.sweeper.orphan_search.clear()
        now = freeze_wall(rig, monkeypatch)
        await add_intent(rig, forgotten(1), now)
        async with sweeping(rig):
            await gauge_is(rig, 1)
            counted = time.monotonic()
            await add_intent(rig, forgotten(2), now)
            await gauge_is(rig, 2)
            between = time.monotonic() - counted
        assert 0.7 < between < 1.2, between


async def test_a_failing_intent_is_logged_and_the_next_one_is_still_resolved(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreadable plan record is a store fault: logged, its intent kept (never acted on), the round goes on."""
    exchange = venue()
    async with apply_rig(store_url, tmp_path, exchange, apply=FAST) as rig:
        rig.apply.sweeper.orphan_search.clear()
        now = freeze_wall(rig, monkeypatch)
        unreadable, resolvable = forgotten(1), forgotten(2)
        await rig.rds.hset(keys.plan_record(unreadable), mapping={"plan_id": unreadable, "qty": "lots"})
        await mark_result(rig, resolvable)
        await add_intent(rig, unreadable, now - 20)  # first in the round
        await add_intent(rig, resolvable, now - 10)
        with structlog.testing.capture_logs() as logged:
            async with sweeping(rig):

                async def resolved() -> bool:
                    return await intents(rig) == [unreadable]

                await until(resolved, 3)
        failures = [(e["event"], e.get("exc_info")) for e in logged if e["log_level"] == "error"]
        assert failures == [(f"intent sweep: intent {unreadable} failed; trying again next round", True)]
        assert exchange.calls == [] and await rig.results() == []


async def test_the_orphan_search_runs_until_complete_and_then_no_more(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exchange = venue(history={})
    async with apply_rig(store_url, tmp_path, exchange, apply=FAST, symbols=["ETHUSDT", "BTCUSDT"]) as rig:
        now = freeze_wall(rig, monkeypatch)
        rig.apply.sweeper.orphan_search.set()
        async with sweeping(rig):

            async def done() -> bool:
                return not rig.apply.sweeper.orphan_search.is_set()

            await until(done, 3)
            await add_intent(rig, forgotten(1), now)
            await gauge_is(rig, 1)  # one round more: no second search
        since = (now - BOOKKEEPING_LESS_AN_HOUR_S) * 1000 - MARGIN_MS  # the rig's epoch: a fresh, empty store
        assert exchange.searches == [("BTCUSDT", since), ("ETHUSDT", since)]
        assert await searched_mark(rig) == "1"


async def test_an_incomplete_orphan_search_is_tried_again_next_round(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exchange = venue(history={"BTCUSDT": ExchangeUnavailable("allOrders: 503")})
    async with apply_rig(store_url, tmp_path, exchange, apply=FAST, symbols=["ETHUSDT", "BTCUSDT"]) as rig:
        now = freeze_wall(rig, monkeypatch)
        rig.apply.sweeper.orphan_search.set()
        async with sweeping(rig):

            async def twice() -> bool:
                return len(exchange.searches) >= 4

            await until(twice, 3)
        since = (now - BOOKKEEPING_LESS_AN_HOUR_S) * 1000 - MARGIN_MS
        assert exchange.searches == [("BTCUSDT", since), ("ETHUSDT", since)] * 2
        assert rig.apply.sweeper.orphan_search.is_set()
        assert await searched_mark(rig) is None


async def test_a_store_outage_is_logged_and_the_sweep_goes_on_when_the_store_is_back(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the store cannot be reached, the search is not recorded (and so not cleared) and no intent is read;
    each step says so. Once it answers, the next round does both."""
    exchange = venue(history={})
    async with apply_rig(store_url, tmp_path, exchange, apply=FAST, symbols=["BTCUSDT"]) as rig:
        sweeper = rig.apply.sweeper
        now = freeze_wall(rig, monkeypatch)
        await mark_result(rig, forgotten(1))
        await add_intent(rig, forgotten(1), now - 10)
        sweeper.orphan_search.set()
        store, unreachable = sweeper.redis, make_client(NO_STORE)
        sweeper.redis = unreachable
        try:
            with structlog.testing.capture_logs() as logged:
                async with sweeping(rig):

                    async def warned() -> bool:
                        return len([e for e in logged if e["log_level"] == "warning"]) >= 3

                    await until(warned, 3)
                    sweeper.redis = store

                    async def recovered() -> bool:
                        return not sweeper.orphan_search.is_set() and await intents(rig) == []

                    await until(recovered, 3)
        finally:
            sweeper.redis = store
            await unreachable.aclose()
        warnings = [e for e in logged if e["log_level"] == "warning"]
        assert [e["event"] for e in warnings[:3]] == [
            "intent sweep: store unavailable (the search for orders the store forgot)",
            "intent sweep: store unavailable (the intents)",
            "intent sweep: store unavailable (the store's replication)",
        ]
        assert all("127.0.0.1:9" in e["error"] for e in warnings[:3])
        assert await searched_mark(rig) == "1"


async def test_a_search_made_while_requests_from_before_the_instance_can_still_show_is_done_again(
    store_url: str, tmp_path: Path
) -> None:
    """The instance began a moment ago: an order request sent to the old one may still execute or show. The
    search adopts what it finds, but is not complete (new proposals keep waiting) until it is made again after
    every such request settled (the permit window and the late-execution horizon after the instance began)."""
    exchange = venue(history={})
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        truth = rig.apply.handler.truth
        truth.searched.clear()
        await rig.rds.hset(keys.STORE_EPOCH, "since", repr(rig.clock.wall()))  # in its record: every connection
        await rig.apply.redis.connection_pool.disconnect()  # reads it
        await rig.apply.redis.ping()
        assert await rig.apply.sweeper.adopt_orphans() is False
        assert exchange.searches and not truth.searched.is_set() and await searched_mark(rig) is None
        rig.clock.wall_shift += 0.8 + 2.0 + 0.05  # the permit window and the horizon later
        assert await rig.apply.sweeper.adopt_orphans() is True
        assert truth.searched.is_set() and await searched_mark(rig) == "1"


async def test_the_first_search_of_a_new_instance_starts_at_once(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change to an instance nobody searched wakes the sweep (it does not wait out its interval): new
    proposals wait for that search."""
    exchange = venue(history={})
    async with apply_rig(store_url, tmp_path, exchange, symbols=["BTCUSDT"]) as rig:
        rig.apply.sweeper.orphan_search.clear()  # (the rig's own instance counts as searched)
        async with sweeping(rig):
            await asyncio.sleep(0.1)  # the first round is over: the sweep sleeps its interval (2.5 s here)
            rig.apply.sweeper.search_needed()
            assert not rig.apply.handler.truth.searched.is_set()

            async def searched() -> bool:
                return rig.apply.handler.truth.searched.is_set()

            await until(searched, 1.0)
        assert [symbol for symbol, _ in exchange.searches] == ["BTCUSDT"]


async def test_a_search_during_which_the_store_changed_instance_marks_nothing_searched(
    store_url: str, tmp_path: Path
) -> None:
    """The search began on one instance; before it ended the store became another (a new epoch, with its own
    window and settle time). Neither instance is marked searched, new proposals keep waiting, and the search is
    still due (before the fix the new instance was recorded as searched by a search of the old one's window)."""
    exchange = venue(history={})
    async with apply_rig(store_url, tmp_path, exchange, symbols=["BTCUSDT", "ETHUSDT"]) as rig:
        truth = rig.apply.handler.truth
        rig.apply.sweeper.search_needed()
        assert rig.apply.watch.epoch is not None
        first = rig.apply.watch.epoch

        def the_store_changes() -> None:
            rig.apply.watch.epoch = dataclasses.replace(first, since=first.since + 5, key="another|epoch")

        exchange.on_search = the_store_changes
        assert await rig.apply.sweeper.adopt_orphans() is False
        assert await searched_mark(rig) is None and not truth.searched.is_set()
        assert rig.apply.sweeper.orphan_search.is_set()


async def test_an_incomplete_search_after_the_settle_time_is_repeated_each_round_not_in_a_loop(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every search costs request weight per symbol: an incomplete one is tried again at the sweep's interval
    (0.5 s here), not every 50 ms (which spent Binance's weight budget in seconds)."""
    exchange = venue(history={"BTCUSDT": ExchangeUnavailable("allOrders: 503")})
    async with apply_rig(store_url, tmp_path, exchange, apply=FAST, symbols=["BTCUSDT"]) as rig:
        freeze_wall(rig, monkeypatch)
        rig.apply.sweeper.search_needed()
        async with sweeping(rig):
            await asyncio.sleep(1.2)
        assert 2 <= len(exchange.searches) <= 3  # at 0, 0.5 and 1.0 s
