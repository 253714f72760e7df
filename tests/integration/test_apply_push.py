"""Apply with the user-data stream (issue 22, item 4), on the running chain against the simulator's real
WebSocket and REST API: a plan's position is P3.3's pushed snapshot (no request per plan), and an order whose
outcome the exchange left unclear is resolved by its ``ORDER_TRADE_UPDATE`` as soon as it shows, with the REST
lookups kept for what the stream cannot prove. Each test counts the exchange's own requests (the simulator's
per-endpoint count) to prove which path answered.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from test_brain_push import admin, chain_with, until

from conftest import Chain, set_position, sim_orders
from quantum_trader import ops
from quantum_trader.exchange.sim import SimServer

pytestmark = pytest.mark.integration

SYMBOL = "ETHUSDT"
QUERY = "GET /fapi/v1/order"
POSITIONS = "GET /fapi/v2/positionRisk"


def requests(sim: SimServer) -> dict[str, int]:
    counts: dict[str, int] = admin(sim, "GET", "/_sim/state")["rateLimits"]["requests"]
    return counts


async def healthy(chain: Chain, *names: str) -> None:
    for name in names:
        service = chain.services[name]
        await until(lambda s=service: _healthy(s), f"{name}'s stream resynced")


async def _healthy(service: Any) -> bool:
    return bool(service.stream is not None and service.stream.health.healthy)


async def close_and_wait(rds: aioredis.Redis, qty: str, timeout_s: float = 20.0) -> Any:
    sub = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=Decimal(qty), source="test")
    result = await ops.wait_result(rds, sub.plan_id, timeout_s, sub.result_cursor)
    assert result is not None, "no result"
    return result


@pytest.mark.parametrize("push", [True, False])
async def test_an_unclear_order_is_resolved_by_its_stream_event(
    sim: SimServer, rds: aioredis.Redis, tmp_path: Path, store_url: str, push: bool
) -> None:
    """The exchange answers the order ``-1007`` (execution status unknown) and executes it 0.5 s later (inside
    its recvWindow). With push the fill's event ends Apply's wait: one lookup (the one that finds it absent at
    first). Poll only: lookups until one finds it (the horizon's, 2 s here)."""
    set_position(sim, SYMBOL, "2.000")
    chain = chain_with(tmp_path, store_url, sim, stream={"push": push}, brain={"snapshot_interval_s": 0.5})
    await chain.start()
    try:
        if push:
            await healthy(chain, "brain", "apply")
        rule = {"kind": "late_execution", "path": "/fapi/v1/order", "method": "POST", "count": 1, "ms": 500}
        admin(sim, "POST", "/_sim/faults", rule)
        before = requests(sim)
        result = await close_and_wait(rds, "0.500")
        after = requests(sim)
        assert result.executed and Decimal(result.filled_qty) == Decimal("0.500")
        assert [o["clientOrderId"] for o in sim_orders(sim, SYMBOL)] == [result.client_order_id]  # one order
        lookups = after.get(QUERY, 0) - before.get(QUERY, 0)
        if push:
            assert lookups == 1, after
            assert chain.services["apply"].pushed.events >= 1
        else:
            assert lookups >= 2, after
    finally:
        await chain.stop()


async def test_plans_take_their_position_from_the_pushed_snapshot(
    sim: SimServer, rds: aioredis.Redis, tmp_path: Path, store_url: str
) -> None:
    """Three closes in a row: no position read by Apply (the snapshot P3.3 keeps from the stream is fresh), and
    each plan's quantity is capped by the position the previous fills left (P3.3's snapshot within ms)."""
    set_position(sim, SYMBOL, "1.000")
    chain = chain_with(tmp_path, store_url, sim)  # P3.3's polls 300 s apart: every snapshot is pushed
    await chain.start()
    try:
        await healthy(chain, "brain", "apply")
        apply = chain.services["apply"]
        before = requests(sim)
        first = await close_and_wait(rds, "0.400")
        second = await close_and_wait(rds, "0.400")
        await until(lambda: _snapshot_is(rds, "0.200"), "the second fill in the snapshot", 2.0)
        third = await close_and_wait(rds, "0.400")  # capped at the 0.200 left
        after = requests(sim)
        assert [Decimal(r.filled_qty) for r in (first, second, third)] == [Decimal("0.400")] * 2 + [Decimal("0.200")]
        assert after.get(POSITIONS, 0) == before.get(POSITIONS, 0)  # nobody read positions over REST
        assert apply.metrics.position_reads.labels("snapshot")._value.get() == 3
        assert apply.metrics.position_reads.labels("exchange")._value.get() == 0
        fourth = await close_and_wait(rds, "0.400")  # nothing left: skipped from the snapshot
        assert not fourth.executed and fourth.reason == "no_position"
    finally:
        await chain.stop()


async def _snapshot_is(rds: aioredis.Redis, amt: str) -> bool:
    got = await rds.hget(f"quantum:position:snapshot:{SYMBOL}", "position_amt")
    return got is not None and Decimal(got) == Decimal(amt)


async def test_without_a_fresh_snapshot_the_plan_reads_the_exchange(
    sim: SimServer, rds: aioredis.Redis, tmp_path: Path, store_url: str
) -> None:
    """P3.3 is not running: no snapshot is fresh, and Apply's plan reads the position over REST (the plan is
    then refused: the Governor has no mark price, P3.3 no permit)."""
    set_position(sim, SYMBOL, "1.000")
    chain = chain_with(tmp_path, store_url, sim, apply={"permit_wait_ms": 300})
    await chain.start("governor", "apply")
    try:
        before = requests(sim)
        result = await close_and_wait(rds, "0.400")
        after = requests(sim)
        assert not result.executed and result.error in ("permit_denied", "permit_timeout")
        assert result.reason != "no_position"  # planned from the exchange's 1.000: an EXECUTE plan
        assert after.get(POSITIONS, 0) - before.get(POSITIONS, 0) == 1
        assert chain.services["apply"].metrics.position_reads.labels("exchange")._value.get() == 1
    finally:
        await chain.stop()


async def test_while_banned_a_proposal_is_refused_exchange_banned_before_any_permit(
    sim: SimServer, rds: aioredis.Redis, tmp_path: Path, store_url: str
) -> None:
    """A 418 on an order bans the IP: the next proposal is answered ``exchange_banned`` when it is planned (a
    SKIP plan; neither issuer is asked), not ``rate_limited`` and not after a permit wait."""
    set_position(sim, SYMBOL, "1.000")
    chain = chain_with(tmp_path, store_url, sim)
    await chain.start()
    try:
        await healthy(chain, "brain", "apply")
        rule = {"kind": "http_418", "path": "/fapi/v1/order", "method": "POST", "count": 1, "retry_after": 120}
        admin(sim, "POST", "/_sim/faults", rule)
        first = await close_and_wait(rds, "0.100")
        assert not first.executed and first.error == "exchange_banned", first
        second = await close_and_wait(rds, "0.100")
        assert not second.executed and second.error == "exchange_banned" and "banned" in second.reason, second
        plan = await rds.hgetall(f"quantum:plan:{second.plan_id}")
        assert (plan["decision"], plan["reason"]) == ("SKIP", "exchange_banned")
        story = await ops.plan_audit(rds, second.plan_id)
        assert not [e for e in story if e.decision in ("allow", "deny")]  # no issuer was asked
        assert [o["clientOrderId"] for o in sim_orders(sim, SYMBOL)] == []
    finally:
        await chain.stop()
