"""The services' error paths, each caused for real: records and keys a hostile or broken writer left unreadable,
an exchange that fails the reads a plan needs, streams deleted under the running services. Every time: the
service says what and where, goes on with the rest of its work, and nothing is sent that should not be.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import httpx
import pytest
import redis

from conftest import SIM_ADMIN, Chain, make_settings, set_position, sim_orders, until, wait_key
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.streams import ensure_topology
from quantum_trader.domain import reasons
from quantum_trader.tasks import cancel_and_wait

pytestmark = pytest.mark.integration


def fault(sim, **rule) -> None:
    httpx.post(f"{sim.url}/_sim/faults", json=rule, headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()


def clear_faults(sim) -> None:
    httpx.delete(f"{sim.url}/_sim/faults", headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()


class Output:
    """Everything the in-process services printed so far (capsys hands each line out once)."""

    def __init__(self, capsys) -> None:
        self.capsys = capsys
        self.text = ""

    def __call__(self) -> str:
        captured = self.capsys.readouterr()
        self.text += captured.out + captured.err
        return self.text


async def alive(chain: Chain) -> None:
    assert all(not task.done() for task in chain.tasks.values()), {
        name: task.exception() for name, task in chain.tasks.items() if task.done()
    }


async def served(rds, symbol: str = "SOLUSDT") -> None:
    """The chain still serves: a fresh close of ``symbol`` executes."""
    sub = await ops.propose(rds, symbol, "FULL_CLOSE")
    result = await ops.wait_result(rds, sub.plan_id, 20, sub.result_cursor)
    assert result is not None and result.executed, result


async def test_an_unreadable_plan_record_leaves_its_proposal_pending_and_apply_goes_on(sim, rds, chain, capsys) -> None:
    """Only Apply writes plan records: one it cannot read is a store fault, never a reason to act on the
    proposal (no plan, no order); the proposal stays pending for an operator, the others are served."""
    set_position(sim, "SOLUSDT", "40")
    set_position(sim, "XRPUSDT", "100")
    await chain.start("brain", "governor")
    victim = await ops.propose(rds, "XRPUSDT", "FULL_CLOSE")
    await rds.hset(keys.plan_record(victim.plan_id), mapping={"plan_id": victim.plan_id, "qty": "lots"})
    await chain.start_one("apply")
    await served(rds)
    await alive(chain)
    assert f"plan record {victim.plan_id} is unreadable" in Output(capsys)()
    pending = await rds.xpending_range(keys.PROPOSAL_STREAM, keys.APPLY_GROUP, "-", "+", 10)
    assert [p["message_id"] for p in pending] == [victim.entry_id]
    assert not await rds.exists(keys.result_marker(victim.plan_id))
    assert [o["symbol"] for o in sim_orders(sim)] == ["SOLUSDT"]


async def test_a_failing_position_read_plans_a_skip_with_its_reason(sim, rds, chain, capsys) -> None:
    """Without P3.3 there is no fresh snapshot to plan from: Apply reads the exchange, which fails."""
    set_position(sim, "SOLUSDT", "40")
    await chain.start("governor", "apply")
    fault(sim, kind="http_5xx", status=503, path="/fapi/v2/positionRisk", method="GET", count=50)
    sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
    result = await ops.wait_result(rds, sub.plan_id, 30, sub.result_cursor)
    assert result is not None and not result.executed
    plan = await rds.hgetall(keys.plan_record(sub.plan_id))
    assert plan["decision"] == "SKIP" and plan["reason"] == reasons.POSITION_UNAVAILABLE, plan
    assert "SOLUSDT: position unavailable" in Output(capsys)()
    assert sim_orders(sim) == []
    clear_faults(sim)
    await chain.start("brain")
    await served(rds)


async def test_a_malformed_proposal_delivered_too_often_is_dead_lettered_once_and_never_planned(
    sim, rds, chain
) -> None:
    set_position(sim, "SOLUSDT", "40")
    await ensure_topology(rds)
    entry_id = await rds.xadd(keys.PROPOSAL_STREAM, {"symbol": "SOLUSDT", "action": "EXPLODE"})
    await rds.xreadgroup(keys.APPLY_GROUP, "apply-test", {keys.PROPOSAL_STREAM: ">"}, count=10)
    # as if it had been handed out, and had crashed its consumer, seven times
    await rds.xclaim(keys.PROPOSAL_STREAM, keys.APPLY_GROUP, "apply-test", 0, [entry_id], retrycount=7)
    await chain.start()
    await served(rds)
    letters = [f for _, f in await rds.xrange(keys.PROPOSAL_DLQ) if f.get("source_id") == entry_id]
    assert len(letters) == 1 and "poison: delivered" in letters[0]["error"], letters
    assert await rds.xpending(keys.PROPOSAL_STREAM, keys.APPLY_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
    assert await rds.xlen(keys.RESULT_STREAM) == 1  # the served close's; nothing for the malformed proposal


async def test_an_executed_marker_that_is_not_json_is_recovered_by_the_plans_client_order_id(sim, rds, chain) -> None:
    """Recovery reads the client order id from the executed marker; a marker a writer garbled still recovers
    the plan (its id is derived from the plan id), and the order is never sent again."""
    set_position(sim, "SOLUSDT", "40")
    await chain.start()
    # the order fills, its reply is lost: Apply is killed while it looks the order up
    fault(sim, kind="timeout_after_fill", ms=3000, path="/fapi/v1/order", method="POST", count=1)
    sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
    await wait_key(rds, keys.executed_marker(sub.plan_id))
    await chain.crash("apply")
    ttl = await rds.ttl(keys.executed_marker(sub.plan_id))
    await rds.set(keys.executed_marker(sub.plan_id), "{not json", ex=ttl)
    clear_faults(sim)
    await chain.start_one("apply")
    result = await ops.wait_result(rds, sub.plan_id, 30, sub.result_cursor)
    assert result is not None and result.executed and result.filled_qty == Decimal(40), result
    orders = sim_orders(sim)
    assert [o["clientOrderId"] for o in orders] == [sub.client_order_id]


async def test_a_proposal_stream_deleted_under_the_services_is_recreated_and_served(sim, rds, chain, capsys) -> None:
    set_position(sim, "SOLUSDT", "40")
    set_position(sim, "XRPUSDT", "100")
    await chain.start()
    await served(rds, "XRPUSDT")
    await rds.delete(keys.PROPOSAL_STREAM)  # the stream and Apply's consumer group with it
    await asyncio.sleep(1.5)  # Apply's blocked read ends (1 s) and finds the group gone
    await served(rds)
    await alive(chain)
    assert "stream or consumer group missing, recreating" in Output(capsys)()


async def test_an_intent_whose_plan_record_is_unreadable_does_not_stop_the_sweep(
    sim, rds, store_url, tmp_path, capsys
) -> None:
    """The intent sweep resolves orders whose outcome is unestablished; one it cannot read is logged and
    tried again next round, and the sweep goes on."""
    chain = Chain(make_settings(tmp_path, store_url, sim.url, apply={"order_resolve_timeout_s": 1}))
    set_position(sim, "SOLUSDT", "40")
    broken = "0123456789abcdef"
    await rds.hset(keys.plan_record(broken), mapping={"plan_id": broken, "qty": "lots"})
    await rds.zadd(keys.APPLY_INTENTS, {broken: 1.0})  # long stale: the first sweep takes it
    seen = Output(capsys)
    try:
        await chain.start()

        async def logged() -> bool:
            return f"intent {broken} failed" in seen()

        await until(logged, timeout=20)
        await served(rds)
        await alive(chain)
        assert await rds.zscore(keys.APPLY_INTENTS, broken) == 1.0  # kept: tried again, and shown to operators
    finally:
        await chain.stop()


async def test_a_search_for_forgotten_orders_the_exchange_fails_is_made_again_until_complete(
    sim, rds, chain, capsys
) -> None:
    """On a store instance nobody has searched yet, Apply asks the exchange for orders the store may have
    forgotten; while the exchange fails that search it is not recorded as done, and it is made again."""
    set_position(sim, "SOLUSDT", "40")
    fault(sim, kind="http_5xx", status=503, path="/fapi/v1/allOrders", method="GET", count=1000)
    seen = Output(capsys)
    await chain.start()

    async def failed() -> bool:
        return "cannot search for forgotten orders now" in seen()

    await until(failed, timeout=20)
    assert await rds.hget(keys.STORE_EPOCH, "searched") != "1"
    clear_faults(sim)

    async def searched() -> bool:
        return await rds.hget(keys.STORE_EPOCH, "searched") == "1"

    await until(searched, timeout=30)
    await served(rds)


# --- the runner's bookkeeping: a store that answers errors never stops a service ---------------------------


async def test_a_groups_backlog_is_zero_before_its_stream_exists_and_an_error_otherwise(rds) -> None:
    from quantum_trader.services.runner import group_backlog

    assert await group_backlog(rds, keys.PLAN_STREAM, keys.GOVERNOR_GROUP) == (0, 0)  # a fresh store
    await rds.set(keys.PLAN_STREAM, "not a stream")  # a hostile writer
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        await group_backlog(rds, keys.PLAN_STREAM, keys.GOVERNOR_GROUP)


async def test_a_heartbeat_the_store_answers_with_an_error_is_logged_and_beats_again(rds, capsys) -> None:
    from prometheus_client import CollectorRegistry

    from quantum_trader.services.metrics import GovernorMetrics
    from quantum_trader.services.runner import heartbeat

    await ensure_topology(rds)
    key = keys.health("governor", "governor-x")
    await rds.set(key, "not a hash")  # a hostile writer
    seen = Output(capsys)
    ready = asyncio.Event()
    beat = asyncio.create_task(heartbeat(rds, "governor", "governor-x", ready, GovernorMetrics(CollectorRegistry())))
    try:

        async def failed() -> bool:
            return "heartbeat failed" in seen() and "WRONGTYPE" in seen.text

        await until(failed, timeout=10)
        await rds.delete(key)  # the writer is gone: the next beat writes the hash again
        ready.set()

        async def beating() -> bool:
            return await rds.hget(key, "ready") == "1"

        await until(beating, timeout=10)
    finally:
        await cancel_and_wait([beat])


async def test_a_service_event_the_store_refuses_is_logged_not_raised(rds, capsys) -> None:
    from quantum_trader.services.runner import service_event

    await rds.set(keys.SERVICE_EVENTS_STREAM, "not a stream")
    await service_event(rds, "governor", "governor-x", "start")
    assert "could not record the service event" in Output(capsys)()
    assert await rds.get(keys.SERVICE_EVENTS_STREAM) == "not a stream"


# --- P3.3 and the permit audit stream --------------------------------------------------------------------


async def test_p33_waits_out_an_exchange_that_fails_its_reconcile_and_issues_nothing_meanwhile(
    sim, rds, chain, capsys
) -> None:
    set_position(sim, "SOLUSDT", "40")
    fault(sim, kind="http_5xx", status=503, path="/fapi/v2/positionRisk", method="GET", count=1000)
    seen = Output(capsys)
    brain = await chain.start_one("brain", wait_ready=False)

    async def failing() -> bool:
        return "reconcile failed; issuing nothing until it succeeds" in seen()

    await until(failing, timeout=20)
    assert not brain.ready.is_set()
    clear_faults(sim)
    await asyncio.wait_for(brain.ready.wait(), 20)
    await chain.start("governor", "apply")
    await served(rds)


async def test_a_ledger_a_writer_garbled_is_read_as_missing_until_it_is_reconciled(sim, rds, chain) -> None:
    """P3.3 never decides on a ledger it cannot read: the plan is denied as if the ledger were missing, and a
    reconcile writes it again from the exchange."""
    set_position(sim, "SOLUSDT", "40")
    await chain.start()
    await rds.hset(keys.ledger("SOLUSDT"), mapping={"last_known_amt": "forty", "updated_at": "yesterday"})
    sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
    result = await ops.wait_result(rds, sub.plan_id, 20, sub.result_cursor)
    assert result is not None and not result.executed and result.reason == reasons.LEDGER_MISSING, result
    await ops.request_reconcile(rds, "test")

    async def repaired() -> bool:
        return (await rds.hgetall(keys.ledger("SOLUSDT"))).get("last_known_amt") == "40"

    await until(repaired, timeout=20)
    await served(rds)
    assert len(sim_orders(sim)) == 1


async def test_an_audit_stream_replaced_by_a_string_stops_no_service(sim, rds, chain, capsys) -> None:
    set_position(sim, "SOLUSDT", "40")
    await chain.start()
    seen = Output(capsys)
    await rds.delete(keys.AUDIT_STREAM)
    await rds.set(keys.AUDIT_STREAM, "not a stream")  # a hostile writer

    async def noticed() -> bool:
        return "audit reader: unexpected error; reading again" in seen()

    await until(noticed, timeout=20)
    await alive(chain)
    await rds.delete(keys.AUDIT_STREAM)
    await served(rds)


async def test_an_unreadable_audit_line_whose_dead_letter_fails_is_skipped_and_apply_goes_on(
    sim, rds, chain, capsys
) -> None:
    set_position(sim, "SOLUSDT", "40")
    await chain.start()
    seen = Output(capsys)
    await rds.set(keys.AUDIT_DLQ, "not a stream")  # where the unreadable line would go cannot take it
    raw = make_raw_client(rds)
    await raw.xadd(keys.AUDIT_STREAM, {b"plan_id": b"\xff\xfe", b"issuer": b"governor"})
    await raw.aclose()

    async def noticed() -> bool:
        return "could not dead-letter an unreadable entry" in seen()

    await until(noticed, timeout=20)
    await alive(chain)
    await served(rds)


def make_raw_client(rds):
    kwargs = rds.connection_pool.connection_kwargs
    return redis.asyncio.Redis(host=kwargs["host"], port=kwargs["port"], db=kwargs.get("db", 0))
