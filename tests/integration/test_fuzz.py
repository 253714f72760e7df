"""Hostile and broken input (hypothesis): random and adversarial proposals, plans, results and permits thrown at
the running services. No service dies, every bad entry is dead-lettered or audited with a reason, nothing
bad is executed, and a good entry sent afterwards is still served."""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    SIM_ADMIN,
    Chain,
    assert_nothing_pending,
    make_settings,
    plan_waiting_for_governor,
    set_position,
    sim_orders,
)
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.domain.oracle import plan_of_order

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("QT_FUZZ_EXAMPLES", "4"))

NASTY_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "1e309",
            "-1",
            "0",
            "1e-400",
            "null",
            "true",
            "[]",
            "{}",
            "0x10",
            "1_000",
            " 1 ",
            "１",
            "BTCUSDT\n",
            "ＢＴＣＵＳＤＴ",
            "\x00",
            "%s%n",
            "' OR 1=1 --",
        ]
    ),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(min_size=5000, max_size=6000),
)
PROPOSAL_FIELDS = ["proposal_id", "symbol", "action", "qty", "close_pct", "kill_score", "source", "created_at"]
PLAN_FIELDS = [
    "plan_id",
    "proposal_id",
    "symbol",
    "side",
    "action",
    "qty",
    "decision",
    "reason",
    "steps",
    "plan_hash",
    "created_at",
]
RESULT_FIELDS = ["plan_id", "symbol", "side", "executed", "error", "filled_qty", "avg_price", "latency_ms", "at"]


def entries(fields: list[str]) -> st.SearchStrategy[dict[str, str]]:
    known = st.dictionaries(st.sampled_from(fields), NASTY_TEXT, min_size=1, max_size=len(fields))
    valid_ish = st.fixed_dictionaries(
        {
            "proposal_id": st.text(min_size=1, max_size=10),
            "symbol": st.sampled_from(["BTCUSDT", "btcusdt", "XX"]),
            "action": st.sampled_from(["FULL_CLOSE", "PARTIAL_CLOSE", "OPEN", ""]),
        },
        optional={"qty": NASTY_TEXT, "close_pct": NASTY_TEXT},
    )
    return st.one_of(known, valid_ish, st.dictionaries(st.text(min_size=1, max_size=8), NASTY_TEXT, min_size=1))


async def run(batch_proposals, batch_plans, batch_results, permits, sim, store_url: str, tmp: Path) -> None:
    settings_ = make_settings(tmp, store_url, sim.url, apply={"permit_wait_ms": 1500, "metrics_port": 0})
    chain = Chain(settings_)
    rds = make_client(store_url)
    set_position(sim, "BTCUSDT", "0.010")  # some fuzzed proposals are valid closes of this one
    set_position(sim, "ETHUSDT", "-0.5")
    set_position(sim, "SOLUSDT", "40")
    try:
        await chain.start()
        # a plan waiting for its Governor permit, whose permit slot gets garbage
        victim = await plan_waiting_for_governor(rds, "ETHUSDT")
        for raw in permits:
            await rds.set(keys.governor_permit(victim.plan_id), raw, ex=60)
            await rds.xadd(keys.AUDIT_STREAM, {"plan_id": victim.plan_id, "issuer": "governor", "decision": "allow"})
            await asyncio.sleep(0.01)
        for fields in batch_proposals:
            await rds.xadd(keys.PROPOSAL_STREAM, fields)
        for fields in batch_plans:
            await rds.xadd(keys.PLAN_STREAM, fields)
        for fields in batch_results:
            await rds.xadd(keys.RESULT_STREAM, fields)
        victim_result = await ops.wait_result(rds, victim.plan_id, 10, victim.result_cursor)
        assert victim_result is not None and not victim_result.executed
        await ops.set_governor_mode(rds, "auto", "fuzz")
        # every service is still alive, and a good proposal is still served
        dead = {
            name: task.exception() if not task.cancelled() else "cancelled"
            for name, task in chain.tasks.items()
            if task.done()
        }
        assert not dead, f"a service died on bad input: {dead}"
        good = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
        result = await ops.wait_result(rds, good.plan_id, 15, good.result_cursor)
        assert result is not None and result.executed
        # every order on the exchange belongs to a plan whose result says it executed, once
        results = [f for _, f in await rds.xrange(keys.RESULT_STREAM)]
        executed = {f["plan_id"] for f in results if f.get("executed") == "true"}
        placed = [o["clientOrderId"] for o in sim_orders(sim)]
        assert good.client_order_id in placed and len(placed) == len(set(placed))
        assert {plan_of_order(coid) for coid in placed} <= executed
        # nothing left unhandled: every entry was acknowledged (served, skipped or dead-lettered)
        await assert_nothing_pending(rds)
        # and every fuzzed proposal is accounted for: dead-lettered with a reason, or (well-formed) given a result
        letters = await rds.xlen(keys.PROPOSAL_DLQ)
        results = [f for _, f in await rds.xrange(keys.RESULT_STREAM)]  # again: all proposals are acked now
        fuzz_results = [  # results Apply published for fuzzed proposals (not the fuzzed result entries)
            f
            for f in results
            if f.get("plan_id") not in (victim.plan_id, good.plan_id)
            and await rds.exists(keys.plan_record(f.get("plan_id", "")))
        ]
        assert letters + len(fuzz_results) == len(batch_proposals)
        for _, letter in await rds.xrange(keys.PROPOSAL_DLQ):
            assert letter["error"] and letter["source_stream"] == keys.PROPOSAL_STREAM
        # at least the last garbage stays in the slot until the window ends, when Apply reads it a last time
        rejected = [e for e in await ops.plan_audit(rds, victim.plan_id) if e.decision == "rejected"]
        assert permits and rejected, f"{len(permits)} permits written, none rejected"
        assert {e.subject for e in rejected} == {"governor"}
        assert Decimal((await rds.hgetall(keys.ledger("ETHUSDT")))["last_known_amt"]) == Decimal("-0.5")
    finally:
        await chain.stop()
        await rds.aclose()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    proposals=st.lists(entries(PROPOSAL_FIELDS), min_size=1, max_size=15),
    plans=st.lists(entries(PLAN_FIELDS), max_size=10),
    results=st.lists(entries(RESULT_FIELDS), max_size=10),
    permits=st.lists(
        st.one_of(
            NASTY_TEXT,
            st.builds(
                lambda d: __import__("json").dumps(d),
                st.dictionaries(
                    st.sampled_from(["granted", "plan_id", "plan_hash", "issuer", "reason", "created_at", "sig"]),
                    st.one_of(st.booleans(), st.integers(), st.text(max_size=20), st.none()),
                    max_size=7,
                ),
            ),
        ),
        min_size=1,  # the victim's slot always gets garbage: the rejection check below always bites
        max_size=4,
    ),
)
def test_hostile_input_never_crashes_or_executes(
    proposals, plans, results, permits, sim_server, embedded_store, tmp_path_factory
) -> None:
    httpx.post(f"{sim_server.url}/_sim/reset", headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()
    client = redis.Redis.from_url(embedded_store)
    client.flushdb()
    client.close()
    asyncio.run(run(proposals, plans, results, permits, sim_server, embedded_store, tmp_path_factory.mktemp("fz")))
