"""Forged, replayed, expired, mismatched and tampered permits: Apply rejects and audits each, and executes
nothing on them; a genuine permit is used once even when two Apply instances race for the plan."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from forgery import ATTACKS, EXPECTED, p33_permit

from conftest import GOVERNOR_KEY, Chain, make_settings, set_position, sim_orders, wait_key
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.domain import reasons
from quantum_trader.domain.models import Plan, from_fields
from quantum_trader.domain.oracle import plan_of_order

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path, store_url: str, sim):
    return make_settings(tmp_path, store_url, sim.url, apply={"permit_wait_ms": 1500, "metrics_port": 0})


async def published_plan(rds, symbol: str) -> tuple[ops.Submitted, Plan]:
    sub = await ops.propose(rds, symbol, "FULL_CLOSE")
    await wait_key(rds, keys.plan_record(sub.plan_id))
    return sub, from_fields(Plan, await rds.hgetall(keys.plan_record(sub.plan_id)))


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_a_forged_governor_permit_is_rejected_audited_and_never_executed(
    attack: str, sim, rds, chain: Chain
) -> None:
    set_position(sim, "ETHUSDT", "-0.5")
    set_position(sim, "SOLUSDT", "40")
    await ops.set_governor_mode(rds, "manual", "test")  # the real Governor stays silent: only the forgery speaks
    await chain.start()
    _, other = await published_plan(rds, "SOLUSDT")
    sub, plan = await published_plan(rds, "ETHUSDT")
    await rds.set(keys.governor_permit(plan.plan_id), ATTACKS[attack](plan, other), ex=60)
    await rds.xadd(keys.AUDIT_STREAM, {"plan_id": plan.plan_id, "issuer": "governor", "decision": "allow"})
    result = await ops.wait_result(rds, sub.plan_id, 10, sub.result_cursor)
    assert result is not None and result.error == reasons.PERMIT_TIMEOUT and result.missing == "Governor"
    rejected = [e for e in await ops.plan_audit(rds, plan.plan_id) if e.decision == "rejected"]
    assert [(e.reason, e.subject) for e in rejected] == [(EXPECTED[attack], "governor")]
    assert [o for o in sim_orders(sim) if plan_of_order(o["clientOrderId"]) == plan.plan_id] == []


async def test_a_forged_p33_permit_is_rejected(sim, rds, chain: Chain) -> None:
    set_position(sim, "ETHUSDT", "-0.5")
    await ops.set_governor_mode(rds, "manual", "test")
    await chain.start("governor", "apply")  # no brain: only a forged P3.3 permit could complete the pair
    sub, plan = await published_plan(rds, "ETHUSDT")
    await ops.decide_manually(rds, chain.settings, plan.plan_id, grant=True, reason="", operator="t")
    await rds.set(keys.p33_permit(plan.plan_id), p33_permit(plan, key=GOVERNOR_KEY, safe_close_qty=99.0), ex=60)
    await rds.xadd(keys.AUDIT_STREAM, {"plan_id": plan.plan_id, "issuer": "p33", "decision": "allow"})
    result = await ops.wait_result(rds, sub.plan_id, 10, sub.result_cursor)
    assert result is not None and result.error == reasons.PERMIT_TIMEOUT and result.missing == "P3.3"
    rejected = [e.reason for e in await ops.plan_audit(rds, plan.plan_id) if e.decision == "rejected"]
    assert rejected == [reasons.BAD_SIGNATURE]
    assert sim_orders(sim) == []


async def test_a_genuine_permit_pair_is_used_once_by_racing_apply_instances(sim, rds, chain: Chain) -> None:
    """Two Apply instances verify the same two permits at once: the atomic consume lets exactly one send."""
    set_position(sim, "ETHUSDT", "-0.5")
    await ops.set_governor_mode(rds, "manual", "test")
    await chain.start("brain", "governor", "apply")
    second = await chain.start_named("apply", "apply-2")
    sub, plan = await published_plan(rds, "ETHUSDT")
    # the second instance adopts the same plan (as after a claim) and waits on it too
    ((_, proposal),) = await rds.xrange(keys.PROPOSAL_STREAM, sub.entry_id, sub.entry_id)
    race = asyncio.create_task(second.handler.handle_proposal(sub.entry_id, proposal))
    await asyncio.sleep(0.05)
    await ops.decide_manually(rds, chain.settings, plan.plan_id, grant=True, reason="", operator="t")
    result = await ops.wait_result(rds, sub.plan_id, 10, sub.result_cursor)
    await asyncio.wait_for(race, 20)
    assert result is not None and result.executed
    assert len([o for o in sim_orders(sim) if plan_of_order(o["clientOrderId"]) == plan.plan_id]) == 1
    results = [f for _, f in await rds.xrange(keys.RESULT_STREAM) if f["plan_id"] == plan.plan_id]
    assert len(results) == 1
    consumed = [e for e in await ops.plan_audit(rds, plan.plan_id) if e.decision == "consumed"]
    assert len(consumed) == 2  # one consume: both permits, once
    assert await rds.get(keys.governor_permit(plan.plan_id)) is None
