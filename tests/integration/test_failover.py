"""Several brains and Governors side by side: each plan decided once per issuer; a dead consumer's pending
entries are taken over; an entry delivered too often is dead-lettered with its history."""

from __future__ import annotations

import asyncio
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from conftest import Chain, make_settings, set_position, sim_orders, until, wait_key
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.domain import reasons

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path, store_url: str, sim):
    return make_settings(
        tmp_path,
        store_url,
        sim.url,
        apply={"permit_wait_ms": 6000, "metrics_port": 0},
        governor={"max_per_symbol": 1000, "max_total": 1000, "cooldown_s": 0, "metrics_port": 0},
        claim_idle_s=1.0,
        max_deliveries=3,
    )


async def test_two_brains_and_two_governors_decide_each_plan_once(sim, rds, chain: Chain) -> None:
    set_position(sim, "XRPUSDT", "1000.0")
    await chain.start("brain", "governor")
    await chain.start_named("brain", "brain-2")
    await chain.start_named("governor", "governor-2")
    await chain.start_one("apply")
    plans = []
    for _ in range(12):
        sub = await ops.propose(rds, "XRPUSDT", "PARTIAL_CLOSE", qty=Decimal(10))
        result = await ops.wait_result(rds, sub.plan_id, 15, sub.result_cursor)
        assert result is not None and result.executed
        plans.append(sub.plan_id)
    decisions = Counter(
        (f["plan_id"], f["issuer"])
        for _, f in await rds.xrange(keys.AUDIT_STREAM)
        if f["decision"] in ("allow", "deny")
    )
    for plan_id in plans:
        assert decisions[(plan_id, "governor")] == 1 and decisions[(plan_id, "p33")] == 1
    assert len(sim_orders(sim)) == 12
    consumers = {c["name"] for c in await rds.xinfo_consumers(keys.PLAN_STREAM, keys.P33_GROUP)}
    assert {"brain-test", "brain-2"} <= consumers


async def test_a_dead_governors_pending_plan_is_claimed_and_decided(sim, rds, chain: Chain) -> None:
    set_position(sim, "SOLUSDT", "40")
    await chain.start("brain", "apply")
    sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
    await wait_key(rds, keys.plan_record(sub.plan_id))
    # A Governor instance read the plan and died before deciding: the entry sits in its pending list.
    await rds.xreadgroup(keys.GOVERNOR_GROUP, "governor-dead", {keys.PLAN_STREAM: ">"}, count=10)
    await chain.start_named("governor", "governor-live")
    result = await ops.wait_result(rds, sub.plan_id, 15, sub.result_cursor)
    assert result is not None and result.executed
    pending = await rds.xpending(keys.PLAN_STREAM, keys.GOVERNOR_GROUP)
    assert pending["pending"] == 0


async def test_an_entry_delivered_too_often_is_dead_lettered_with_its_history(sim, rds, chain: Chain) -> None:
    set_position(sim, "SOLUSDT", "40")
    await chain.start("brain", "apply")
    sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
    await wait_key(rds, keys.plan_record(sub.plan_id))
    read = await rds.xreadgroup(keys.GOVERNOR_GROUP, "governor-crashing", {keys.PLAN_STREAM: ">"}, count=10)
    entry_id = read[0][1][0][0]
    # It has already been handed out (and killed its consumer) many times.
    await rds.xclaim(keys.PLAN_STREAM, keys.GOVERNOR_GROUP, "governor-crashing", 0, [entry_id], retrycount=7)
    await chain.start_named("governor", "governor-live")
    deadline = asyncio.get_running_loop().time() + 10
    letters: list[dict[str, str]] = []
    while asyncio.get_running_loop().time() < deadline and not letters:
        letters = [f for _, f in await rds.xrange(keys.PLAN_DLQ) if f.get("source_id") == entry_id]
        await asyncio.sleep(0.05)
    assert letters and "poison: delivered" in letters[0]["error"] and "governor-crashing" in letters[0]["error"]
    assert letters[0]["orig.plan_id"] == sub.plan_id
    result = await ops.wait_result(rds, sub.plan_id, 15, sub.result_cursor)
    assert result is not None and result.error == "permit_timeout" and result.missing == "Governor"
    assert sim_orders(sim) == []


async def test_a_poisoned_proposal_whose_plan_exists_still_ends_with_one_result(sim, rds, chain: Chain) -> None:
    """The proposal was handed out (and killed its Apply) too often: it goes to the dead-letter stream, and the
    plan it already had ends with exactly one result, `dead_lettered`, never an order."""
    set_position(sim, "SOLUSDT", "40")
    await ops.set_governor_mode(rds, "manual", "test")
    await chain.start()
    sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
    await wait_key(rds, keys.p33_permit(sub.plan_id))
    await chain.crash("apply")
    # as if it had been delivered, and had crashed its consumer, seven times
    await rds.xclaim(keys.PROPOSAL_STREAM, keys.APPLY_GROUP, "apply-test", 0, [sub.entry_id], retrycount=7)
    await chain.start_one("apply")
    result = await ops.wait_result(rds, sub.plan_id, 15, sub.result_cursor)
    assert result is not None and not result.executed and result.error == reasons.DEAD_LETTERED, result
    letters = [f for _, f in await rds.xrange(keys.PROPOSAL_DLQ) if f.get("source_id") == sub.entry_id]
    assert len(letters) == 1 and "poison: delivered" in letters[0]["error"]
    # an operator's grant now changes nothing: a plan with its result is never executed
    with pytest.raises(ops.OperatorError, match="already has its result"):
        await ops.decide_manually(rds, chain.settings, sub.plan_id, grant=True, reason="", operator="t")
    await asyncio.sleep(0.5)
    assert sim_orders(sim) == []
    assert len([f for _, f in await rds.xrange(keys.RESULT_STREAM) if f["plan_id"] == sub.plan_id]) == 1


async def test_a_read_whose_batch_handler_fails_is_finished_entry_by_entry(rds) -> None:
    """A bug in the batch path (here: the third entry breaks it after the first was done) must not hold the read's
    other entries back until a restart: what is still pending is handled one by one, and only the entry that
    fails on its own stays pending."""
    from quantum_trader import logs
    from quantum_trader.services.consumer import Failover, consume_group
    from quantum_trader.tasks import cancel_and_wait

    stream, group = "test:batch:stream", "test-group"
    await rds.delete(stream)
    await rds.xgroup_create(stream, group, id="0", mkstream=True)
    ids = [await rds.xadd(stream, {"n": str(n)}) for n in range(4)]
    done: list[str] = []

    async def handle(entry_id: str, fields: dict[str, str]) -> None:
        if fields["n"] == "2":
            raise RuntimeError("a bug this entry triggers")
        done.append(fields["n"])
        await rds.xack(stream, group, entry_id)

    async def handle_batch(entries: list[tuple[str, dict[str, str]]]) -> None:
        for entry_id, fields in entries:
            await handle(entry_id, fields)

    task = asyncio.create_task(
        consume_group(
            rds,
            stream=stream,
            group=group,
            consumer="c1",
            handle=handle,
            handle_batch=handle_batch,
            log=logs.get("test"),
            store_up=lambda up: None,
            failover=Failover(claim_every_s=3600),
            service="test",
            block_ms=100,
        )
    )
    try:

        async def three_done() -> bool:
            return len(done) == 3

        await until(three_done, timeout=5)
    finally:
        await cancel_and_wait([task])
    assert done == ["0", "1", "3"]
    pending = await rds.xpending_range(stream, group, min="-", max="+", count=10)
    assert [p["message_id"] for p in pending] == [ids[2]]
