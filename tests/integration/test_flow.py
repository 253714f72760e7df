"""The whole chain over a real store and the simulator over HTTP (through ccxt): every outcome a plan can
have, with the result, the audit trail and the exchange's order book checked together."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import pytest

from conftest import Chain, set_position, sim_orders, sim_position, until, wait_key
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.domain import reasons
from quantum_trader.domain.models import Result

pytestmark = pytest.mark.integration

WAIT = 10.0


async def propose(rds, symbol: str, action: str = "FULL_CLOSE", **kw) -> tuple[ops.Submitted, Result]:
    sub = await ops.propose(rds, symbol, action, **kw)
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None, f"no result for plan {sub.plan_id}"
    return sub, result


async def test_close_with_both_permits_executes_one_reduce_only_order(sim, rds, chain: Chain) -> None:
    set_position(sim, "BTCUSDT", "0.010")
    await chain.start()
    sub, result = await propose(rds, "BTCUSDT")

    assert result.executed and result.error == ""
    assert result.filled_qty == Decimal("0.010") and result.side == "LONG"
    assert result.client_order_id == sub.client_order_id
    assert sim_position(sim, "BTCUSDT") == 0
    orders = sim_orders(sim, "BTCUSDT")
    assert len(orders) == 1
    assert orders[0]["side"] == "SELL" and orders[0]["reduceOnly"] is True
    # both permits consumed (single use), the executed marker set, the audit trail complete
    assert await rds.get(keys.governor_permit(sub.plan_id)) is None
    assert await rds.get(keys.p33_permit(sub.plan_id)) is None
    assert json.loads(await rds.get(keys.executed_marker(sub.plan_id)))["client_order_id"] == sub.client_order_id
    trail = [(e.issuer, e.decision) for e in await ops.plan_audit(rds, sub.plan_id)]
    assert ("governor", "allow") in trail and ("p33", "allow") in trail
    assert trail.count(("apply", "consumed")) == 2

    # P3.3's ledger follows the fill (its own consumer of the result stream, so a moment after the result)
    async def ledger_followed() -> bool:
        ledger = await rds.hgetall(keys.ledger("BTCUSDT"))
        return Decimal(ledger["last_known_amt"]) == 0 and ledger["last_plan_id"] == sub.plan_id

    await until(ledger_followed, timeout=5)


async def test_short_partial_close_is_rounded_down_to_the_step(sim, rds, chain: Chain) -> None:
    set_position(sim, "SOLUSDT", "-40")
    await chain.start()
    _, result = await propose(rds, "SOLUSDT", "PARTIAL_CLOSE", close_pct=Decimal(33))
    assert result.executed and result.filled_qty == 13  # 13.2 rounded down to SOLUSDT's step of 1
    assert sim_position(sim, "SOLUSDT") == -27
    assert sim_orders(sim, "SOLUSDT")[0]["side"] == "BUY"


async def test_oversized_partial_close_is_clamped_to_the_position(sim, rds, chain: Chain) -> None:
    set_position(sim, "BNBUSDT", "3.00")
    await chain.start()
    _, result = await propose(rds, "BNBUSDT", "PARTIAL_CLOSE", qty=Decimal(99))
    assert result.executed and result.filled_qty == 3
    assert sim_position(sim, "BNBUSDT") == 0


async def test_governor_in_manual_mode_times_out_naming_the_governor(sim, rds, chain: Chain, capsys) -> None:
    set_position(sim, "ETHUSDT", "-0.5")
    await ops.set_governor_mode(rds, "manual", "test")
    await chain.start()
    started = time.monotonic()
    sub, result = await propose(rds, "ETHUSDT")
    waited = time.monotonic() - started

    assert result.error == reasons.PERMIT_TIMEOUT and result.missing == "Governor" and not result.executed
    assert waited >= chain.settings.apply.permit_wait_ms / 1000
    assert sim_orders(sim) == []
    captured = capsys.readouterr()
    assert "ETHUSDT: Permit timeout after" in captured.out + captured.err
    assert "(missing: Governor)" in captured.out + captured.err
    # P3.3 did answer; the plan holds its permit, unconsumed
    assert await rds.get(keys.p33_permit(sub.plan_id)) is not None


async def test_timeout_names_both_issuers_when_neither_runs(sim, rds, chain: Chain) -> None:
    set_position(sim, "ETHUSDT", "-0.5")
    await chain.start("apply")
    _, result = await propose(rds, "ETHUSDT")
    assert result.error == reasons.PERMIT_TIMEOUT and result.missing == "Governor, P3.3"


async def test_kill_switch_denies_at_once(sim, rds, chain: Chain) -> None:
    set_position(sim, "SOLUSDT", "40")
    await chain.start()
    await ops.set_kill_switch(rds, True, "test")
    _, result = await propose(rds, "SOLUSDT")
    assert result.error == reasons.PERMIT_DENIED and result.denied_by == "Governor"
    assert result.reason == reasons.KILL_SWITCH_ON
    assert result.latency_ms < chain.settings.apply.permit_wait_ms  # a deny does not wait out the window
    assert sim_orders(sim) == []
    await ops.set_kill_switch(rds, False, "test")
    _, result = await propose(rds, "SOLUSDT")
    assert result.executed


async def test_p33_denies_a_position_changed_outside_the_chain(sim, rds, chain: Chain) -> None:
    set_position(sim, "XRPUSDT", "1000")
    await chain.start()
    set_position(sim, "XRPUSDT", "600")  # a manual partial close the chain never saw
    brain = chain.services["brain"]
    await brain.refresh_snapshots()
    _, result = await propose(rds, "XRPUSDT")
    assert result.error == reasons.PERMIT_DENIED and result.denied_by == "P3.3"
    assert result.reason == reasons.QTY_MISMATCH
    assert sim_orders(sim) == []
    # an operator reconcile clears it: no manual HSET
    await ops.request_reconcile(rds, "test")
    await brain.refresh_snapshots()
    assert Decimal((await rds.hgetall(keys.ledger("XRPUSDT")))["last_known_amt"]) == 600
    _, result = await propose(rds, "XRPUSDT")
    assert result.executed and result.filled_qty == 600


async def test_position_opened_outside_is_adopted_not_denied(sim, rds, chain: Chain) -> None:
    await chain.start()
    set_position(sim, "BTCUSDT", "0.004")  # the trading bot opened a position: entries are not ours
    await chain.services["brain"].refresh_snapshots()
    assert Decimal((await rds.hgetall(keys.ledger("BTCUSDT")))["last_known_amt"]) == Decimal("0.004")
    _, result = await propose(rds, "BTCUSDT")
    assert result.executed


async def test_symbol_not_allowed_and_no_position_are_skipped(sim, rds, chain: Chain) -> None:
    await chain.start()
    sub, result = await propose(rds, "DOGEUSDT")
    assert result.error == reasons.SKIPPED and result.reason == reasons.SYMBOL_NOT_ALLOWED
    plan = await rds.hgetall(keys.plan_record(sub.plan_id))
    assert plan["decision"] == "SKIP"
    _, result = await propose(rds, "BTCUSDT")  # no position on the exchange
    assert result.error == reasons.SKIPPED and result.reason == reasons.NO_POSITION
    _, result = await propose(rds, "BTCUSDT", "PARTIAL_CLOSE", qty=Decimal(0))
    assert result.reason == reasons.CLOSE_QTY_ZERO


async def test_duplicate_proposal_while_one_is_in_flight_is_skipped(sim, rds, chain: Chain) -> None:
    set_position(sim, "ETHUSDT", "-0.5")
    await ops.set_governor_mode(rds, "manual", "test")
    await chain.start()
    first = await ops.propose(rds, "ETHUSDT", "FULL_CLOSE")
    await wait_key(rds, keys.plan_record(first.plan_id))
    second = await ops.propose(rds, "ETHUSDT", "FULL_CLOSE")
    r2 = await ops.wait_result(rds, second.plan_id, WAIT, second.result_cursor)
    assert r2 is not None and r2.error == reasons.SKIPPED and r2.reason == reasons.DUPLICATE_IN_FLIGHT
    await ops.decide_manually(rds, chain.settings, first.plan_id, grant=True, reason="test", operator="t")
    r1 = await ops.wait_result(rds, first.plan_id, WAIT, first.result_cursor)
    assert r1 is not None and r1.executed
    assert len(sim_orders(sim)) == 1


async def test_operator_deny_fails_the_plan_at_once(sim, rds, chain: Chain) -> None:
    set_position(sim, "ETHUSDT", "-0.5")
    await ops.set_governor_mode(rds, "manual", "test")
    await chain.start()
    sub = await ops.propose(rds, "ETHUSDT", "FULL_CLOSE")
    await wait_key(rds, keys.plan_record(sub.plan_id))
    await ops.decide_manually(rds, chain.settings, sub.plan_id, grant=False, reason="not today", operator="t")
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None and result.error == reasons.PERMIT_DENIED and result.reason == "not today"
    with pytest.raises(ops.OperatorError, match="already has its result"):
        await ops.decide_manually(rds, chain.settings, sub.plan_id, grant=True, reason="", operator="t")


async def test_raw_setex_permit_no_longer_authorises_an_order(sim, rds, chain: Chain) -> None:
    """The seed's manual injection (`SETEX quantum:permit:<id> 60 '{"granted":true}'`) is rejected and audited."""
    set_position(sim, "ETHUSDT", "-0.5")
    await ops.set_governor_mode(rds, "manual", "test")
    await chain.start()
    sub = await ops.propose(rds, "ETHUSDT", "FULL_CLOSE")
    await wait_key(rds, keys.plan_record(sub.plan_id))
    await rds.set(keys.governor_permit(sub.plan_id), '{"granted":true}', ex=60)
    await rds.xadd(keys.AUDIT_STREAM, {"plan_id": sub.plan_id, "issuer": "governor", "decision": "allow"})
    result = await ops.wait_result(rds, sub.plan_id, WAIT, sub.result_cursor)
    assert result is not None and result.error == reasons.PERMIT_TIMEOUT and result.missing == "Governor"
    rejected = [e for e in await ops.plan_audit(rds, sub.plan_id) if e.decision == "rejected"]
    assert [(e.reason, e.subject) for e in rejected] == [(reasons.MALFORMED_PERMIT, "governor")]
    assert sim_orders(sim) == []


async def test_malformed_proposal_is_dead_lettered_and_the_next_one_served(sim, rds, chain: Chain) -> None:
    set_position(sim, "BTCUSDT", "0.010")
    await chain.start()
    bad = [
        {"proposal_id": "p1", "symbol": "BTCUSDT", "action": "OPEN_LONG"},
        {"proposal_id": "p2", "symbol": "BTCUSDT", "action": "PARTIAL_CLOSE", "qty": "NaN"},
        {"proposal_id": "p3", "symbol": "btc usdt", "action": "FULL_CLOSE"},
        {"symbol": "BTCUSDT", "action": "FULL_CLOSE"},
    ]
    ids = [await rds.xadd(keys.PROPOSAL_STREAM, fields) for fields in bad]
    _, result = await propose(rds, "BTCUSDT")
    assert result.executed
    letters = {f["source_id"]: f["error"] for _, f in await rds.xrange(keys.PROPOSAL_DLQ)}
    assert set(letters) == set(ids)
    assert "action" in letters[ids[0]] and "qty" in letters[ids[1]]
    assert "symbol" in letters[ids[2]] and "proposal_id" in letters[ids[3]]
    assert await rds.xpending(keys.PROPOSAL_STREAM, keys.APPLY_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_malformed_and_tampered_plans_are_dead_lettered_by_both_issuers(sim, rds, chain: Chain) -> None:
    set_position(sim, "BTCUSDT", "0.010")
    await chain.start("brain", "governor")
    await rds.xadd(keys.PLAN_STREAM, {"plan_id": "not-hex", "symbol": "BTCUSDT"})
    # a well-formed plan whose qty was changed after hashing
    from quantum_trader.domain.models import Proposal, to_fields
    from quantum_trader.domain.planning import PlanningContext, make_plan

    plan = make_plan(
        Proposal(proposal_id="x", symbol="BTCUSDT", action="FULL_CLOSE"),
        PlanningContext(frozenset({"BTCUSDT"}), Decimal("0.010")),
        "0123456789abcdef",
        time.time(),
    )
    fields = to_fields(plan) | {"qty": "0.005"}
    await rds.xadd(keys.PLAN_STREAM, fields)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and await rds.xlen(keys.PLAN_DLQ) < 4:
        await asyncio.sleep(0.02)
    letters = [f for _, f in await rds.xrange(keys.PLAN_DLQ)]
    assert sorted(f["service"] for f in letters) == ["governor", "governor", "p33", "p33"]
    assert sum(reasons.PLAN_HASH_MISMATCH in f["error"] for f in letters) == 2
    assert await rds.get(keys.governor_permit(plan.plan_id)) is None
    assert await rds.get(keys.p33_permit(plan.plan_id)) is None


async def test_many_sequential_plans_each_get_exactly_one_order_and_result(
    sim, rds, tmp_path, store_url, capsys
) -> None:
    """Forty closes in a row on one symbol: one order and one result each, the ledger equal to the exchange.
    Reports the permit wait (plan published → both permits verified and consumed) it saw; asserts no timing."""
    from conftest import make_settings

    settings = make_settings(
        tmp_path, store_url, sim.url, governor={"max_per_symbol": 1000, "max_total": 1000, "cooldown_s": 0}
    )
    chain = Chain(settings)
    set_position(sim, "XRPUSDT", "100000")
    await chain.start()
    try:
        plan_ids, coids = [], []
        for _ in range(40):
            sub, result = await propose(rds, "XRPUSDT", "PARTIAL_CLOSE", qty=Decimal(10))
            assert result.executed and result.filled_qty == 10
            plan_ids.append(sub.plan_id)
            coids.append(sub.client_order_id)
        deadline = time.monotonic() + WAIT  # the ledger follows the result stream asynchronously
        while time.monotonic() < deadline:
            ledger = await rds.hgetall(keys.ledger("XRPUSDT"))
            if ledger.get("last_plan_id") == plan_ids[-1]:
                break
            await asyncio.sleep(0.01)
    finally:
        await chain.stop()
    orders = sim_orders(sim, "XRPUSDT")
    assert sorted(o["clientOrderId"] for o in orders) == sorted(coids)
    assert sim_position(sim, "XRPUSDT") == Decimal(100000 - 400)
    assert Decimal((await rds.hgetall(keys.ledger("XRPUSDT")))["last_known_amt"]) == Decimal(100000 - 400)
    waits = sorted(
        float(f["latency_ms"])
        for _, f in await rds.xrange(keys.AUDIT_STREAM)
        if f["decision"] == "consumed" and f["reason"] == "governor"
    )
    assert len(waits) == 40
    with capsys.disabled():
        print(f"\npermit wait over 40 sequential plans: p50 {waits[19]:.2f} ms, max {waits[-1]:.2f} ms")


async def test_fills_on_one_symbol_do_not_starve_the_full_snapshot_poll(sim, rds, tmp_path, store_url) -> None:
    """Results keep asking for their own symbol's snapshot; every other symbol's snapshot is still renewed each
    interval (0.5 s here), or its plans would be denied stale_snapshot under load. The poll's own property:
    with push off (QT_STREAM__PUSH=false), so that only the poll can renew a snapshot."""
    from conftest import make_settings

    chain = Chain(make_settings(tmp_path, store_url, sim.url, stream={"push": False}))
    await chain.start()
    try:
        brain = chain.services["brain"]
        assert brain.stream is None
        before = float((await rds.hgetall(keys.snapshot("ETHUSDT")))["ts"])
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            brain.ask_refresh(["SOLUSDT"])
            await asyncio.sleep(0.02)
        assert float((await rds.hgetall(keys.snapshot("ETHUSDT")))["ts"]) > before + 1.0
    finally:
        await chain.stop()
