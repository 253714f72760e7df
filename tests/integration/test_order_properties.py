"""Random sequences of exchange faults and Apply restarts over many plans (hypothesis): whatever happens,
every plan ends with exactly one result, at most one order exists per plan (exactly one when the result says
executed, with the filled quantity it reports), no outcome stays unknown, and P3.3's ledger equals the
exchange afterwards.

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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SIM_ADMIN, Chain, make_settings, set_position, sim_orders, sim_position, until, wait_key
from quantum_trader import ops
from quantum_trader.bus import keys

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
RESTARTS = st.sampled_from([None, "after_publish", "after_consume"])
STEP = st.tuples(st.sampled_from(sorted(SYMBOLS)), FAULTS, RESTARTS)


async def wait_any(rds, *names: str) -> None:
    async def exists() -> bool:
        return bool(await rds.exists(*names))

    await until(exists)


def add_faults(sim, rules: list[dict]) -> None:
    for rule in rules:
        body = {"count": 1, **rule}
        httpx.post(f"{sim.url}/_sim/faults", json=body, headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()


async def run_scenario(steps, sim, store_url: str, tmp: Path) -> None:
    settings_ = make_settings(
        tmp,
        store_url,
        sim.url,
        apply={"permit_wait_ms": 4000, "metrics_port": 0, "order_resolve_timeout_s": 20},
        exchange={"timeout_ms": 800, "order_recv_window_ms": 500},
        governor={"max_per_symbol": 1000, "max_total": 1000, "cooldown_s": 0, "metrics_port": 0},
    )
    chain = Chain(settings_)
    rds = redis.asyncio.Redis.from_url(store_url, decode_responses=True)
    try:
        for symbol, amt in SYMBOLS.items():
            set_position(sim, symbol, amt)
        await chain.start()
        plans: list[str] = []
        for symbol, faults, restart in steps:
            add_faults(sim, faults)
            sub = await ops.propose(rds, symbol, "PARTIAL_CLOSE", qty=CLOSE[symbol])
            plans.append(sub.plan_id)
            if restart == "after_publish":
                await wait_key(rds, keys.plan_record(sub.plan_id))
                await chain.restart("apply")
            elif restart == "after_consume":
                await wait_any(rds, keys.executed_marker(sub.plan_id), keys.result_marker(sub.plan_id))
                await chain.restart("apply")
            result = await ops.wait_result(rds, sub.plan_id, 45, sub.result_cursor)
            assert result is not None, f"plan {sub.plan_id} ({symbol}, {faults}, {restart}) got no result"
            httpx.delete(f"{sim.url}/_sim/faults", headers={"X-Sim-Admin-Token": SIM_ADMIN})
        # the promises, checked on the exchange's and the store's own records
        all_results = [f for _, f in await rds.xrange(keys.RESULT_STREAM)]
        orders = sim_orders(sim)
        for plan_id in plans:
            results = [r for r in all_results if r["plan_id"] == plan_id]
            placed = [o for o in orders if o["clientOrderId"] == f"qt-{plan_id}"]
            assert len(results) == 1, f"plan {plan_id}: {len(results)} results"
            assert len(placed) <= 1, f"plan {plan_id}: {len(placed)} orders"
            if results[0]["executed"] == "true":
                assert len(placed) == 1
                assert Decimal(placed[0]["executedQty"]) == Decimal(results[0]["filled_qty"])
            else:
                assert all(Decimal(o["executedQty"]) == 0 for o in placed)
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
        await chain.stop()
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
