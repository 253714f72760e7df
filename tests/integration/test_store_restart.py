"""The store itself killed (SIGKILL) in the middle of plans and started again on its append-only file: the
services fail closed while it is away, reconnect, and every proposal still ends with exactly one result and
at most one order."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from test_exchange_errors import fault

from conftest import Chain, SimServer, make_settings, set_position, sim_orders, sim_position
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import record_epoch
from quantum_trader.bus.embedded import EmbeddedStore
from quantum_trader.domain.oracle import plan_of_order
from quantum_trader.domain.planning import plan_id_for

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
    # appendfsync always: under everysec Redis may postpone the append-only write while a slow fsync runs and
    # reply meanwhile, so a killed store can lose acknowledged proposals (docs/reliability.md); a fresh clone's
    # make test saw exactly that once. What this test proves is the chain, not the store's durability setting.
    store = EmbeddedStore(data, persist=True, appendfsync="always")
    url = store.start()
    port = store.port
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
        store = EmbeddedStore(data, persist=True, port=port, appendfsync="always")
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


async def read_but_unplanned(rds: aioredis.Redis, sim: SimServer) -> set[str]:
    """Slow Apply's next position reads (1.5 s), then wait (at most 10 s) until it has read a proposal it has not
    planned yet (pending in its group, no plan record): the proposal ids of those, right now."""
    fault(sim, "latency", "/fapi/v2/positionRisk", method="GET", ms=1500, count=6)
    deadline = time.monotonic() + 10
    while True:
        pending = await rds.xpending_range(keys.PROPOSAL_STREAM, keys.APPLY_GROUP, "-", "+", 10_000)
        ids = [row["message_id"] for row in pending]
        unplanned = set()
        for entry_id in ids:
            for _, fields in await rds.xrange(keys.PROPOSAL_STREAM, entry_id, entry_id):
                if not await rds.exists(keys.plan_record(plan_id_for(fields["proposal_id"]))):
                    unplanned.add(fields["proposal_id"])
        if unplanned:
            return unplanned
        assert time.monotonic() < deadline, "Apply never held a proposal unplanned"
        await asyncio.sleep(0.005)


LOAD = {"XRPUSDT": "100000.0", "SOLUSDT": "10000", "BNBUSDT": "1000.00"}
LOAD_CLOSE = {"XRPUSDT": Decimal("1.0"), "SOLUSDT": Decimal(1), "BNBUSDT": Decimal("0.01")}


async def test_a_lossless_store_restart_under_load_answers_every_proposal_findably_by_its_id(
    sim, tmp_path: Path
) -> None:
    """300 proposals at ~30/s, two brains, one of them crashed, then the store killed (SIGKILL) and started
    again on its append-only file (``appendfsync always``: nothing acknowledged is lost). Judged as a client
    judges, by ``proposal_id`` on the streams alone: every proposal has exactly one plan on the plan stream and
    exactly one result that carries its id (issue 20, what was seen 3: 7 to 10 of 300 had no plan, and no
    result carried a proposal id). And the restart lost nothing, so it refuses nothing (``store_changed``):
    neither proposals Apply had read but not planned when the store died (there is one by construction: the
    position reads Apply plans with are slowed first, and the kill waits for one), nor one sent in the restarted
    instance's first second. Before the epoch was continued through such a restart, 2 of 300 were refused."""
    data = Path(tempfile.mkdtemp(prefix="qt-aof-load-"))
    store = EmbeddedStore(data, persist=True, appendfsync="always")
    url = store.start()
    port = store.port
    assert await record_epoch(url) == "always"  # as `qt store-stamp` does after the deployed store's start
    settings = make_settings(
        tmp_path,
        url,
        sim.url,
        governor={"max_per_symbol": 10**6, "max_total": 10**6, "cooldown_s": 0, "metrics_port": 0},
    )
    chain = Chain(settings)
    rds = aioredis.Redis.from_url(url, decode_responses=True)
    for symbol, amt in LOAD.items():
        set_position(sim, symbol, amt)
    sent: list[str] = []

    async def propose(n: int) -> None:
        symbol = sorted(LOAD)[n % len(LOAD)]
        while True:  # a client retries while the store is away (the same proposal id: a retry is safe)
            try:
                await ops.propose(rds, symbol, "PARTIAL_CLOSE", qty=LOAD_CLOSE[symbol], proposal_id=f"load-{n}")
                sent.append(f"load-{n}")
                return
            except (ConnectionError, OSError, aioredis.ConnectionError, aioredis.TimeoutError):
                await asyncio.sleep(0.05)

    try:
        await chain.start()
        await chain.start_named("brain", "brain-2")
        for n in range(300):
            await propose(n)
            if n == 100:
                await chain.crash("brain-2")
            if n == 150:
                unplanned = await read_but_unplanned(rds, sim)
                store.kill()
                await asyncio.sleep(0.5)
                store = EmbeddedStore(data, persist=True, port=port, appendfsync="always")
                store.start()
                await propose(1000)  # in the restarted instance's first second
                assert await record_epoch(url) == "always"
            await asyncio.sleep(1 / 30)

        async def all_answered() -> bool:
            try:
                answered = {f.get("proposal_id") for _, f in await rds.xrange(keys.RESULT_STREAM)}
            except (ConnectionError, OSError, aioredis.ConnectionError):
                return False
            return answered >= set(sent)

        deadline = time.monotonic() + 60
        while not await all_answered():
            assert time.monotonic() < deadline, "not every proposal has a result within 60 s"
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # a second plan or result would be there by now

        plans, results = Counter(), Counter()
        for _, fields in await rds.xrange(keys.PLAN_STREAM):
            plans[fields["proposal_id"]] += 1
        refused = 0
        for _, fields in await rds.xrange(keys.RESULT_STREAM):
            results[fields["proposal_id"]] += 1
            refused += fields.get("error") == "store_changed"
        assert len(sent) == 301
        assert {p: plans[p] for p in sent if plans[p] != 1} == {}, "proposals without exactly one plan"
        assert {p: results[p] for p in sent if results[p] != 1} == {}, "proposals without exactly one result"
        orders = sim_orders(sim)
        assert len(orders) == len({o["clientOrderId"] for o in orders})  # one order per proposal id at most
        print(f"lossless restart under load: {len(unplanned)} read but unplanned at the kill; {refused} refused")
        assert unplanned
        assert refused == 0, f"{refused} proposals refused after a restart that lost nothing"
    finally:
        await chain.stop()
        await rds.aclose()
        store.stop()
