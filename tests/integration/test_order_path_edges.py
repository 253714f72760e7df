"""Edges of the order path against the simulator over HTTP and a real store: the deadline checked right before
the request leaves, the timestamp that bounds a late execution, the consume that refuses a finished plan,
and the hold of an unknown outcome that cannot outlive its intent."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import httpx
import pytest

from conftest import SIM_ADMIN, SIM_KEY, SIM_SECRET, set_position, sim_orders
from quantum_trader.bus import keys
from quantum_trader.bus.scripts import Scripts
from quantum_trader.exchange.base import NotSent, OutcomeUnknown
from quantum_trader.exchange.binance import make_exchange
from quantum_trader.settings import ExchangeSettings

pytestmark = pytest.mark.integration


def exchange_for(sim):
    return make_exchange(ExchangeSettings(mode="sim", sim_url=sim.url), SIM_KEY, SIM_SECRET, sim.url)


async def test_an_order_whose_deadline_passed_before_it_could_leave_is_not_sent(sim) -> None:
    set_position(sim, "SOLUSDT", "40")
    exchange = exchange_for(sim)
    try:
        await exchange.sync_time()
        with pytest.raises(NotSent):
            await exchange.place_reduce_only_market(
                "SOLUSDT", "SELL", Decimal(1), "qt-0123456789abcdef", deadline_ms=exchange.now_ms() - 1
            )
    finally:
        await exchange.close()
    assert sim_orders(sim) == []


async def test_an_unclear_answer_carries_the_timestamp_the_request_was_signed_with(sim) -> None:
    """The proof that a request can no longer execute starts at its own timestamp: the exchange's record of the
    request (the simulator's late-execution log) has exactly the timestamp Apply reports."""
    set_position(sim, "SOLUSDT", "40")
    rule = {"kind": "late_execution", "ms": 200, "answer": "-1007", "path": "/fapi/v1/order", "method": "POST"}
    headers = {"X-Sim-Admin-Token": SIM_ADMIN}
    httpx.post(f"{sim.url}/_sim/faults", json={"count": 1, **rule}, headers=headers).raise_for_status()
    exchange = exchange_for(sim)
    try:
        await exchange.sync_time()
        before = exchange.now_ms()
        with pytest.raises(OutcomeUnknown) as unclear:
            await exchange.place_reduce_only_market("SOLUSDT", "SELL", Decimal(1), "qt-0123456789abcdef")
        signed = unclear.value.signed_at_ms
        assert signed is not None and before - 1 <= signed <= exchange.now_ms() + 1  # whole milliseconds
    finally:
        await exchange.close()
    (late,) = httpx.get(f"{sim.url}/_sim/late", headers=headers).json()
    assert late["windowEnd"] - exchange.order_recv_window_ms == signed


async def test_a_plan_with_its_result_cannot_be_consumed_and_an_unknown_holds_only_while_its_intent_lives(
    rds,
) -> None:
    scripts = Scripts(rds)
    plan_id, symbol = "00000000000000aa", "SOLUSDT"
    await rds.set(keys.governor_permit(plan_id), "g")
    await rds.set(keys.p33_permit(plan_id), "p")
    await rds.set(keys.result_marker(plan_id), "1-0")
    status = await scripts.consume_permits(
        plan_id=plan_id,
        symbol=symbol,
        governor_raw=b"g",
        p33_raw=b"p",
        marker=json.dumps({"at": time.time()}),
        now=time.time(),
        latency_ms=1.0,
        audit_maxlen=1000,
    )
    assert status == "already_finished"
    assert not await rds.exists(keys.executed_marker(plan_id)) and await rds.get(keys.governor_permit(plan_id)) == "g"
    # no intent recorded: no hold
    assert await scripts.hold_for_intent(plan_id=plan_id, symbol=symbol) is False
    assert not await rds.exists(keys.symbol_in_flight(symbol))
    # an intent: the hold lasts as long as the plan's record (whose expiry ends the intent), and goes with the
    # result
    await rds.zadd(keys.APPLY_INTENTS, {plan_id: time.time()})
    await rds.hset(keys.plan_record(plan_id), mapping={"plan_id": plan_id})
    await rds.expire(keys.plan_record(plan_id), keys.PLAN_BOOKKEEPING_TTL_S - 60)  # published a minute ago
    assert await scripts.hold_for_intent(plan_id=plan_id, symbol=symbol) is True
    ttl_ms = await rds.pttl(keys.symbol_in_flight(symbol))
    record_ms = (keys.PLAN_BOOKKEEPING_TTL_S - 60) * 1000
    assert record_ms - 5000 < ttl_ms <= record_ms
    await rds.delete(keys.result_marker(plan_id))
    await scripts.publish_result(
        plan_id=plan_id, symbol=symbol, fields={"plan_id": plan_id}, proposal_entry_id="", result_maxlen=1000
    )
    assert not await rds.exists(keys.symbol_in_flight(symbol)) and await rds.zcard(keys.APPLY_INTENTS) == 0
