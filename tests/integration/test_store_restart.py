"""The store itself killed (SIGKILL) in the middle of plans and started again on its append-only file: the
services fail closed while it is away, reconnect, and every proposal still ends with exactly one result and
at most one order."""

from __future__ import annotations

import asyncio
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from conftest import Chain, make_settings, set_position, sim_orders, sim_position
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.embedded import EmbeddedStore
from quantum_trader.domain.oracle import plan_of_order
from quantum_trader.system import free_port

pytestmark = pytest.mark.integration


async def results_of(rds: aioredis.Redis, plan_ids: list[str], timeout: float) -> dict[str, list[dict[str, str]]]:
    deadline = time.monotonic() + timeout
    while True:
        found = {p: [] for p in plan_ids}
        try:
            for _, fields in await rds.xrange(keys.RESULT_STREAM):
                if fields["plan_id"] in found:
                    found[fields["plan_id"]].append(fields)
        except (ConnectionError, OSError, aioredis.ConnectionError):
            found = {}
        if (found and all(found.values())) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("kill_after_s", [0.0, 0.003, 0.02])
async def test_store_killed_mid_flow_loses_no_plan_and_doubles_no_order(sim, tmp_path: Path, kill_after_s) -> None:
    data = Path(tempfile.mkdtemp(prefix="qt-aof-"))
    port = free_port()
    store = EmbeddedStore(data, persist=True, port=port)
    url = store.start()
    settings = make_settings(
        tmp_path,
        url,
        sim.url,
        apply={"permit_wait_ms": 3000, "metrics_port": 0},
        governor={"max_per_symbol": 1000, "max_total": 1000, "cooldown_s": 0, "metrics_port": 0},
    )
    chain = Chain(settings)
    rds = aioredis.Redis.from_url(url, decode_responses=True)
    set_position(sim, "XRPUSDT", "1000.0")
    try:
        await chain.start()
        first = await ops.propose(rds, "XRPUSDT", "PARTIAL_CLOSE", qty=Decimal(10))
        assert (await ops.wait_result(rds, first.plan_id, 10, first.result_cursor)).executed

        # several proposals in flight, then the store dies (no shutdown save: only its append-only file)
        subs = [await ops.propose(rds, "XRPUSDT", "PARTIAL_CLOSE", qty=Decimal(10)) for _ in range(3)]
        await asyncio.sleep(kill_after_s)
        store.kill()
        await asyncio.sleep(1.0)  # services see it gone and back off; nothing is decided meanwhile
        store = EmbeddedStore(data, persist=True, port=port)
        store.start()
        restarted = time.monotonic()

        plan_ids = [s.plan_id for s in subs]
        found = await results_of(rds, plan_ids, timeout=30)
        orders = sim_orders(sim, "XRPUSDT")
        for plan_id in plan_ids:
            assert len(found[plan_id]) == 1, f"plan {plan_id}: {len(found[plan_id])} results"
            placed = [o for o in orders if plan_of_order(o["clientOrderId"]) == plan_id]
            assert len(placed) <= 1
            assert (found[plan_id][0]["executed"] == "true") == (len(placed) == 1)

        # past the restarted instance's trust floor: a proposal within its first second (its start is known to
        # the second) counts as older than the instance and is answered store_changed, not executed
        await asyncio.sleep(max(0.0, restarted + 2.0 - time.monotonic()))
        after = await ops.propose(rds, "XRPUSDT", "PARTIAL_CLOSE", qty=Decimal(10))
        result = await ops.wait_result(rds, after.plan_id, 20, after.result_cursor)
        assert result is not None and result.executed, (result.error, result.reason)
        recovery = time.monotonic() - restarted
        assert recovery < 20
        # the ledger caught up with every fill
        deadline = time.monotonic() + 10
        while Decimal((await rds.hgetall(keys.ledger("XRPUSDT")))["last_known_amt"]) != sim_position(sim, "XRPUSDT"):
            assert time.monotonic() < deadline, "ledger never matched the exchange after the store restart"
            await asyncio.sleep(0.1)
    finally:
        await chain.stop()
        await rds.aclose()
        store.stop()
