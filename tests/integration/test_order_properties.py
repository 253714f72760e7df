"""Random sequences of exchange faults and Apply kills over many plans (hypothesis): whatever happens,
every plan ends with exactly one result, at most one order exists per plan (exactly one when the result says
executed, with the filled quantity it reports), no outcome stays unknown, and P3.3's ledger equals the
exchange afterwards.

The services run as their own processes (``LocalSystem``, as ``qt up`` runs them) against the test's store and
simulator; a drawn restart is a SIGKILL of Apply (no ``finally`` runs, nothing is flushed) at the drawn point
of a plan, and a new Apply process in its place. A kill counts as landed in the order path when the plan was
published (or its permits consumed) and it had no result yet: once Apply is dead nothing else can write one,
so "no result right after the kill" means none at the kill.

`make test` runs a few examples; QT_PROPERTY_EXAMPLES raises it (`make test-long`).
"""

from __future__ import annotations

import asyncio
import os
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import SIM_ADMIN, SIM_KEY, SIM_SECRET, set_position, sim_orders, sim_position, until
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.domain.oracle import plan_of_order
from quantum_trader.settings import Settings
from quantum_trader.system import LocalSystem, Ports

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("QT_PROPERTY_EXAMPLES", "3"))
ORDER = {"path": "/fapi/v1/order", "method": "POST"}
LOOKUP = {"path": "/fapi/v1/order", "method": "GET"}
SYMBOLS = {"XRPUSDT": "5000.0", "SOLUSDT": "500", "BNBUSDT": "50.00"}
CLOSE = {"XRPUSDT": Decimal("10.0"), "SOLUSDT": Decimal(1), "BNBUSDT": Decimal("0.50")}

# Faults whose outcome settles within the short recvWindow (the "execution status unknown" ones wait 10 s and
# are in the fault matrix instead).
FAULTS = st.sampled_from(
    [
        [],
        [{"kind": "latency", "ms": 150, **ORDER}],
        [{"kind": "timeout_after_fill", "ms": 3000, **ORDER}],
        [{"kind": "timeout_before_fill", "ms": 3000, **ORDER}],
        [{"kind": "http_5xx", "status": 503, **ORDER}],
        [{"kind": "http_5xx", "status": 502, **ORDER}],
        [{"kind": "error_code", "code": -1021, **ORDER}],
        [{"kind": "error_code", "code": -1007, "executed": True, **ORDER}],
        [{"kind": "bad_json", "executed": True, **ORDER}],
        [{"kind": "bad_json", "executed": False, **ORDER}],
        [{"kind": "missing_fields", "executed": True, **ORDER}],
        [{"kind": "partial_fill", "fraction": 0.5, **ORDER}],
        [
            {"kind": "timeout_after_fill", "ms": 3000, **ORDER},
            {"kind": "http_5xx", "status": 503, "count": 2, **LOOKUP},
        ],
    ]
)
HELD_ORDER = {"kind": "latency", "ms": 1500, **ORDER}  # the order reaches the book 1.5 s after it was sent
RESTARTS = st.sampled_from([None, "after_publish", "after_consume"])
STEP = st.tuples(st.sampled_from(sorted(SYMBOLS)), FAULTS, RESTARTS)
# The services' settings (QT_* of their processes): short waits, so faults and kills settle quickly.
SERVICE_ENV = {
    "QT_APPLY__PERMIT_WAIT_MS": "4000",
    "QT_APPLY__ORDER_RESOLVE_TIMEOUT_S": "20",
    "QT_EXCHANGE__TIMEOUT_MS": "800",
    "QT_EXCHANGE__ORDER_RECV_WINDOW_MS": "500",
    "QT_EXCHANGE__LATE_EXECUTION_HORIZON_MS": "2000",
    "QT_EXCHANGE__API_KEY": SIM_KEY,
    "QT_EXCHANGE__API_SECRET": SIM_SECRET,
    "QT_GOVERNOR__MAX_PER_SYMBOL": "1000",
    "QT_GOVERNOR__MAX_TOTAL": "1000",
    "QT_GOVERNOR__COOLDOWN_S": "0",
    "QT_BRAIN__SNAPSHOT_INTERVAL_S": "0.5",
    "QT_BRAIN__COOLDOWN_S": "0",
}


async def wait_any(rds, *names: str) -> None:
    async def exists() -> bool:
        return bool(await rds.exists(*names))

    await until(exists, interval=0.001)  # the kill should land before Apply is past the point


def services(store_url: str, sim_url: str, tmp: Path) -> LocalSystem:
    """Brain, Governor and Apply as processes on the test's store and simulator (metrics ports off)."""
    settings_ = Settings(state_dir=tmp, redis_url=store_url, _env_prefix="QT_IGNORED_")  # no QT_* of the caller
    system = LocalSystem(
        settings_, ports=Ports(0, 0, 0, 0), log_dir=tmp / "logs", env=SERVICE_ENV, inherit_config=False
    )
    system.use_infra(sim_url)
    return system


async def kill_apply(system: LocalSystem, rds, plan_id: str) -> bool:
    """SIGKILL Apply and start a new one; whether the kill landed before the plan's result (see the top)."""
    system.stop_service("apply", kill=True)  # at once, from here: returns once the process is gone
    landed = not await rds.exists(keys.result_marker(plan_id))
    await asyncio.to_thread(system.start_service, "apply")
    return landed


def add_faults(sim, rules: list[dict]) -> None:
    for rule in rules:
        body = {"count": 1, **rule}
        httpx.post(f"{sim.url}/_sim/faults", json=body, headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()


async def run_scenario(steps, sim, store_url: str, tmp: Path) -> None:
    system = services(store_url, sim.url, tmp)
    rds = redis.asyncio.Redis.from_url(store_url, decode_responses=True)
    kills = landed = 0
    try:
        for symbol, amt in SYMBOLS.items():
            set_position(sim, symbol, amt)
        await asyncio.to_thread(system.start_services, together=True)  # nothing is sent before all are ready
        plans: list[str] = []
        # After the drawn steps, two that are not drawn: a kill that lands inside the order path by construction
        # (the exchange holds the order 1.5 s, Apply is killed once the permits are consumed), so no example
        # depends on the draw's timing for it; then a plan with no fault and no kill: the chain still executes.
        for symbol, faults, restart in [*steps, ("SOLUSDT", [HELD_ORDER], "after_consume"), ("XRPUSDT", [], None)]:
            add_faults(sim, faults)
            sub = await ops.propose(rds, symbol, "PARTIAL_CLOSE", qty=CLOSE[symbol])
            plans.append(sub.plan_id)
            if restart == "after_publish":
                await wait_any(rds, keys.plan_record(sub.plan_id))
            elif restart == "after_consume":
                await wait_any(rds, keys.executed_marker(sub.plan_id), keys.result_marker(sub.plan_id))
            if restart:
                kills += 1
                landed += await kill_apply(system, rds, sub.plan_id)
            result = await ops.wait_result(rds, sub.plan_id, 45, sub.result_cursor)
            assert result is not None, f"plan {sub.plan_id} ({symbol}, {faults}, {restart}) got no result"
            httpx.delete(f"{sim.url}/_sim/faults", headers={"X-Sim-Admin-Token": SIM_ADMIN})
        # the promises, checked on the exchange's and the store's own records
        all_results = [f for _, f in await rds.xrange(keys.RESULT_STREAM)]
        orders = sim_orders(sim)
        for plan_id in plans:
            results = [r for r in all_results if r["plan_id"] == plan_id]
            placed = [o for o in orders if plan_of_order(o["clientOrderId"]) == plan_id]
            assert len(results) == 1, f"plan {plan_id}: {len(results)} results"
            assert len(placed) <= 1, f"plan {plan_id}: {len(placed)} orders"
            if results[0]["executed"] == "true":
                assert len(placed) == 1
                assert Decimal(placed[0]["executedQty"]) == Decimal(results[0]["filled_qty"])
            else:
                assert all(Decimal(o["executedQty"]) == 0 for o in placed)
        # every example executes at least one plan: the last one, whatever the steps before it did
        executed = {r["plan_id"] for r in all_results if r["executed"] == "true"}
        assert plans[-1] in executed, "the last plan (no fault, no kill) was not executed"
        event(f"drawn plans executed: {len(executed & set(plans[:-1]))} of {len(steps)}")  # pytest's
        event(f"Apply kills that landed in the order path: {landed} of {kills}")  # --hypothesis-show-statistics
        assert landed > 0, f"none of the {kills} kills of Apply landed inside a plan's order path"
        assert await rds.zcard(keys.APPLY_INTENTS) == 0
        deadline = time.monotonic() + 10
        for symbol in SYMBOLS:
            while True:
                ledger = await rds.hgetall(keys.ledger(symbol))
                if Decimal(ledger["last_known_amt"]) == sim_position(sim, symbol):
                    break
                assert time.monotonic() < deadline, f"{symbol}: ledger {ledger} != exchange"
                await asyncio.sleep(0.05)
    finally:
        for service in ("apply", "governor", "brain"):  # SIGKILL: quicker than a clean stop, and the next
            system.stop_service(service, kill=True)  # example starts on a flushed store anyway
        system.stop()
        await rds.aclose()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(STEP, min_size=2, max_size=5))
def test_random_faults_and_restarts_keep_the_promises(steps, sim_server, embedded_store, tmp_path_factory) -> None:
    # Fresh exchange and store for every example (fixtures are not re-run between hypothesis examples).
    httpx.post(f"{sim_server.url}/_sim/reset", headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()
    client = redis.Redis.from_url(embedded_store)
    client.flushdb()
    client.close()
    asyncio.run(run_scenario(steps, sim_server, embedded_store, tmp_path_factory.mktemp("prop")))
