"""Each service stopped abruptly in the middle of a plan, then restarted: no plan lost, no second order,
exactly one result per plan."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from conftest import SIM_ADMIN, Chain, make_settings, set_position, sim_orders, sim_position, until, wait_key
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.domain import reasons
from quantum_trader.tasks import cancel_and_wait

pytestmark = pytest.mark.integration

WAIT = 15.0


@pytest.fixture
def settings(tmp_path: Path, store_url: str, sim):
    # A longer window so a restart fits inside it.
    return make_settings(tmp_path, store_url, sim.url, apply={"permit_wait_ms": 4000, "metrics_port": 0})


async def results_for(rds, plan_id: str) -> list[dict[str, str]]:
    return [f for _, f in await rds.xrange(keys.RESULT_STREAM) if f["plan_id"] == plan_id]


def add_fault(sim, **rule) -> None:
    httpx.post(f"{sim.url}/_sim/faults", json=rule, headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()


async def test_apply_restarted_while_waiting_resumes_the_window_and_executes_once(sim, rds, chain: Chain) -> None:
    set_position(sim, "ETHUSDT", "-0.5")
    await ops.set_governor_mode(rds, "manual", "test")
    await chain.start()
    sub = await ops.propose(rds, "ETHUSDT", "FULL_CLOSE")

    await wait_key(rds, keys.plan_record(sub.plan_id))
    await chain.crash("apply")
    await ops.decide_manually(rds, chain.settings, sub.plan_id, grant=True, reason="", operator="t")
    await chain.start_one("apply")
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None and result.executed
    assert len(await results_for(rds, sub.plan_id)) == 1
    assert len(sim_orders(sim, "ETHUSDT")) == 1
    assert sim_position(sim, "ETHUSDT") == 0


async def test_a_resumed_plan_is_woken_by_the_grant_that_completes_its_permits(sim, rds, chain: Chain) -> None:
    """P3.3 allowed while Apply was down; after the restart the operator's grant is the only decision Apply's
    audit reader sees: it must still wake the plan (both slots allowed), not leave it to the window's end."""
    set_position(sim, "ETHUSDT", "-0.5")
    await ops.set_governor_mode(rds, "manual", "test")
    await chain.start()
    sub = await ops.propose(rds, "ETHUSDT", "FULL_CLOSE")
    await wait_key(rds, keys.p33_permit(sub.plan_id))
    await chain.crash("apply")
    await chain.start_one("apply")
    await asyncio.sleep(0.3)  # the resumed plan has read its slots and waits
    await ops.decide_manually(rds, chain.settings, sub.plan_id, grant=True, reason="", operator="t")
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None and result.executed
    window_ms = chain.settings.apply.permit_wait_ms
    assert result.latency_ms < window_ms - 2000, "executed at the window's end, not when the grant came"


async def test_apply_restarted_after_its_window_closed_publishes_a_timeout_not_an_order(
    sim, rds, chain: Chain, tmp_path: Path, store_url: str
) -> None:
    set_position(sim, "ETHUSDT", "-0.5")
    await ops.set_governor_mode(rds, "manual", "test")
    await chain.start()
    sub = await ops.propose(rds, "ETHUSDT", "FULL_CLOSE")

    await wait_key(rds, keys.plan_record(sub.plan_id))
    await chain.crash("apply")
    await asyncio.sleep(chain.settings.apply.permit_wait_ms / 1000 + 0.2)  # Apply stays down past the window
    await chain.start_one("apply")
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None and result.error == reasons.PERMIT_TIMEOUT and result.missing == "Governor"
    assert sim_orders(sim) == []


async def test_apply_killed_mid_order_recovers_the_true_outcome_without_resending(sim, rds, chain: Chain) -> None:
    set_position(sim, "BTCUSDT", "0.010")
    # The order request is held 0.7 s by the exchange (inside its 1 s recvWindow), then executed; Apply dies
    # while waiting for the reply.
    add_fault(sim, kind="latency", ms=700, path="/fapi/v1/order", method="POST", count=1)
    await chain.start()
    sub = await ops.propose(rds, "BTCUSDT", "FULL_CLOSE")

    await wait_key(rds, keys.executed_marker(sub.plan_id))
    await chain.crash("apply")
    await asyncio.sleep(1.2)  # the held order lands on the exchange meanwhile
    assert len(sim_orders(sim, "BTCUSDT")) == 1
    await chain.start_one("apply")
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None and result.executed and result.filled_qty == Decimal("0.010")
    assert len(sim_orders(sim, "BTCUSDT")) == 1, "recovery must query, never resend"
    assert len(await results_for(rds, sub.plan_id)) == 1


async def test_apply_killed_before_the_exchange_took_the_order_reports_not_placed(sim, rds, chain: Chain) -> None:
    set_position(sim, "BTCUSDT", "0.010")
    add_fault(sim, kind="timeout_before_fill", ms=1500, path="/fapi/v1/order", method="POST", count=1)
    await chain.start()
    sub = await ops.propose(rds, "BTCUSDT", "FULL_CLOSE")

    await wait_key(rds, keys.executed_marker(sub.plan_id))
    await chain.crash("apply")
    await chain.start_one("apply")
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None and not result.executed and result.error == reasons.ORDER_NOT_PLACED
    assert sim_orders(sim) == []
    assert sim_position(sim, "BTCUSDT") == Decimal("0.010")


async def test_governor_down_when_the_plan_is_published_decides_it_after_restart(sim, rds, chain: Chain) -> None:
    set_position(sim, "SOLUSDT", "40")
    await chain.start()
    await chain.crash("governor")
    sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")

    await wait_key(rds, keys.plan_record(sub.plan_id))
    await chain.start_one("governor")
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None and result.executed
    assert len(sim_orders(sim, "SOLUSDT")) == 1


async def test_governor_crashed_holding_a_pending_plan_decides_it_on_restart(sim, rds, chain: Chain) -> None:
    set_position(sim, "SOLUSDT", "40")
    await chain.start("brain", "apply")
    sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")

    await wait_key(rds, keys.plan_record(sub.plan_id))
    # The Governor read the plan (it is now pending for its consumer) and died before deciding.
    read = await rds.xreadgroup(keys.GOVERNOR_GROUP, "governor-test", {keys.PLAN_STREAM: ">"}, count=10)
    assert read and read[0][1]
    await chain.start_one("governor")
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None and result.executed
    pending = await rds.xpending(keys.PLAN_STREAM, keys.GOVERNOR_GROUP)
    assert pending["pending"] == 0


async def test_brain_restarted_mid_flow_reconciles_then_decides(sim, rds, chain: Chain) -> None:
    set_position(sim, "BNBUSDT", "3")
    await chain.start()
    await chain.crash("brain")
    sub = await ops.propose(rds, "BNBUSDT", "FULL_CLOSE")

    await wait_key(rds, keys.plan_record(sub.plan_id))
    await chain.start_one("brain")
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None and result.executed
    assert len(sim_orders(sim, "BNBUSDT")) == 1

    async def ledger_followed() -> bool:  # the brain's result follower applies the fill a moment later
        return Decimal((await rds.hgetall(keys.ledger("BNBUSDT")))["last_known_amt"]) == 0

    await until(ledger_followed, timeout=5)


async def test_brain_reconciles_a_drifted_ledger_on_start_with_one_audit_entry_per_change(
    sim, rds, chain: Chain
) -> None:
    set_position(sim, "BTCUSDT", "0.010")
    set_position(sim, "ETHUSDT", "-0.5")
    await chain.start("brain")
    await chain.crash("brain")
    set_position(sim, "BTCUSDT", "0.004")  # drift while the brain was down
    before = await rds.xlen(keys.LEDGER_AUDIT_STREAM)
    await chain.start_one("brain")
    entries = [f for _, f in await rds.xrange(keys.LEDGER_AUDIT_STREAM)][before:]
    assert [(e["symbol"], e["before"], e["after"], e["source"]) for e in entries] == [
        ("BTCUSDT", "0.010", "0.004", "reconcile")
    ]


async def test_a_redelivered_proposal_never_makes_a_second_plan_order_or_result(sim, rds, chain: Chain) -> None:
    set_position(sim, "BTCUSDT", "0.010")
    await chain.start()
    sub = await ops.propose(rds, "BTCUSDT", "FULL_CLOSE")
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None and result.executed
    fields = (await rds.xrange(keys.PROPOSAL_STREAM, sub.entry_id, sub.entry_id))[0][1]
    apply = chain.services["apply"]
    await asyncio.gather(*(apply.handler.handle_proposal(sub.entry_id, fields) for _ in range(3)))
    assert len(await results_for(rds, sub.plan_id)) == 1
    assert len(sim_orders(sim)) == 1
    assert len([f for _, f in await rds.xrange(keys.PLAN_STREAM) if f["plan_id"] == sub.plan_id]) == 1


async def test_two_handlers_racing_for_one_fresh_proposal_send_one_order(sim, rds, chain: Chain) -> None:
    set_position(sim, "BTCUSDT", "0.010")
    await chain.start("brain", "governor")
    apply = await chain.start_one("apply")
    # its search for forgotten orders done first (a fresh proposal waits for it, and a crash mid-search would
    # leave it undone: this test drives the handler, not the sweeper)
    for _ in range(1000):
        if apply.handler.truth.searched.is_set():
            break
        await asyncio.sleep(0.01)
    await chain.crash("apply", keep_connections=True)  # stop its loop, keep its clients: we drive its handler
    waiter = asyncio.create_task(apply.waiter.run())
    await apply.waiter.ready.wait()
    entry_id = await rds.xadd(
        keys.PROPOSAL_STREAM, {"proposal_id": "race", "symbol": "BTCUSDT", "action": "FULL_CLOSE"}
    )
    fields = {"proposal_id": "race", "symbol": "BTCUSDT", "action": "FULL_CLOSE"}
    await rds.xreadgroup(keys.APPLY_GROUP, "apply-test", {keys.PROPOSAL_STREAM: ">"})
    handler = apply.handler
    await asyncio.gather(handler.handle_proposal(entry_id, fields), handler.handle_proposal(entry_id, fields))
    await cancel_and_wait([waiter])
    from quantum_trader.domain.planning import plan_id_for

    plan_id = plan_id_for("race")
    assert len(await results_for(rds, plan_id)) == 1
    assert len(sim_orders(sim)) == 1
    assert len([f for _, f in await rds.xrange(keys.PLAN_STREAM) if f["plan_id"] == plan_id]) == 1


async def test_an_intent_left_by_a_vanished_consumer_is_resolved_by_another_instance(
    sim, rds, tmp_path: Path, store_url: str
) -> None:
    """Apply dies mid-order and comes back under another consumer name (a renamed host): its old pending
    proposal is not redelivered to it, but the recorded intent is found and resolved from the exchange."""
    settings = make_settings(
        tmp_path,
        store_url,
        sim.url,
        apply={"permit_wait_ms": 1000, "metrics_port": 0, "order_resolve_timeout_s": 1},
        exchange={"timeout_ms": 500, "order_recv_window_ms": 500},
    )
    chain = Chain(settings)
    set_position(sim, "BTCUSDT", "0.010")
    add_fault(sim, kind="latency", ms=300, path="/fapi/v1/order", method="POST", count=1)
    await chain.start()
    try:
        sub = await ops.propose(rds, "BTCUSDT", "FULL_CLOSE")
        await wait_key(rds, keys.executed_marker(sub.plan_id))
        await chain.crash("apply")
        await asyncio.sleep(0.6)  # the order lands meanwhile
        from quantum_trader.bus.connection import make_client
        from quantum_trader.bus.identity import StoreWatch
        from quantum_trader.exchange.binance import make_exchange
        from quantum_trader.services.apply import ApplyService

        exchange = make_exchange(settings.exchange, "test-api-key", "test-api-secret", sim.url)
        watch = StoreWatch(record_epoch=True)
        client = make_client(settings.redis_url, watch)
        other = ApplyService(settings, client, exchange, consumer="apply-renamed-host", watch=watch)
        task = asyncio.create_task(other.run())
        try:
            result = await ops.wait_result(rds, sub.plan_id, 15, sub.result_cursor)
        finally:
            await cancel_and_wait([task])
            await exchange.close()
            await client.aclose()
        assert result is not None and result.executed and result.filled_qty == Decimal("0.010")
        assert len(sim_orders(sim, "BTCUSDT")) == 1
        assert await rds.zcard(keys.APPLY_INTENTS) == 0
    finally:
        await chain.stop()


async def test_a_plan_asking_for_a_fresh_snapshot_is_not_failed_by_an_earlier_poll(sim, rds, chain: Chain) -> None:
    """A poll that failed before the plan asked says nothing about the poll the plan asks for: the plan gets
    the next one (here fresh), not an immediate "no snapshot" that would deny it stale_snapshot."""
    await chain.start()
    brain = chain.services["brain"]
    since = time.time()
    add_fault(sim, kind="http_5xx", status=503, path="/fapi/v2/positionRisk", method="GET", count=1)
    brain.snapshots.ask_refresh(["XRPUSDT"], force=True)  # a poll now, even with the stream healthy
    await until(lambda: _faults_left_none(sim), timeout=5)  # that poll ran into the 503
    assert await brain.snapshots.snapshots_since(["XRPUSDT"], since)


async def _faults_left_none(sim) -> bool:
    return not httpx.get(f"{sim.url}/_sim/faults", headers={"X-Sim-Admin-Token": SIM_ADMIN}).json()
