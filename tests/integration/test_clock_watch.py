"""Apply's clocks on a real store (services/apply/clocks.py, issue 20, point 5): each Apply publishes its reading of
the exchange clock, reads the other live Apply hosts', and fails closed while they are out of bounds: a proposal
is answered ``clock_out_of_bounds`` (SKIP, nothing read or sent), the metrics and ``qt status`` show why, and it
plans again once the clocks are back within bounds.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path

import pytest
import structlog
from apply_rig import SYMBOL, Rig, apply_rig, filled

from quantum_trader.bus import keys
from quantum_trader.domain import reasons
from quantum_trader.domain.clocks import ClockReading, encode
from quantum_trader.views.status import collect
from scripted import At, ScriptedExchange

pytestmark = pytest.mark.integration
D = Decimal


def scripted() -> ScriptedExchange:
    return ScriptedExchange(None, [], [], held={SYMBOL: D("0.010")})  # type: ignore[arg-type]


async def a_peer(rig: Rig, consumer: str, offset_ms: float, error_ms: float = 2.0) -> None:
    """Another Apply host's published reading (its wall clock ``offset_ms`` off the exchange's)."""
    now = time.time()
    await rig.rds.set(keys.apply_clock(consumer), encode(ClockReading(offset_ms, error_ms, now), now), ex=10)
    await rig.rds.sadd(keys.APPLY_CLOCK_HOSTS, consumer)


async def test_a_round_publishes_this_hosts_reading_and_reads_the_peers(store_url: str, tmp_path: Path) -> None:
    async with apply_rig(store_url, tmp_path, scripted()) as rig:
        watch = rig.apply.clocks
        await a_peer(rig, "apply-b", offset_ms=120.0)
        state = await watch.round()
        assert state.ok and state.host_gap_ms == pytest.approx(120.0 + 2.0, abs=0.1)
        own = await rig.rds.get(keys.apply_clock(watch.consumer))
        assert own is not None and await rig.rds.ttl(keys.apply_clock(watch.consumer)) > 0
        assert await rig.rds.smembers(keys.APPLY_CLOCK_HOSTS) == {watch.consumer, "apply-b"}
        assert rig.metric("qt_apply_clocks_within_bounds") == 1
        assert rig.metric("qt_apply_host_clock_gap_ms") == pytest.approx(122.0, abs=0.1)


async def test_a_peer_whose_clock_is_too_far_off_makes_apply_fail_closed_until_it_is_fixed(
    store_url: str, tmp_path: Path
) -> None:
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        await a_peer(rig, "apply-b", offset_ms=900.0)  # 900 ms off this host: over the 500 ms bound
        with structlog.testing.capture_logs() as logged:
            state = await rig.apply.clocks.round()
        assert not state.ok and "differs from this one's by up to 902 ms" in state.problem
        assert [e["event"] for e in logged if e["log_level"] == "error"] == [
            "clocks out of bounds: planning nothing, calling no order absent"
        ]
        assert rig.metric("qt_apply_clocks_within_bounds") == 0

        entry_id, fields, plan_id = await rig.propose()
        await asyncio.wait_for(rig.handler.handle_proposal(entry_id, fields), 5)
        (result,) = await rig.results()
        assert (result.plan_id, result.executed, result.reason) == (plan_id, False, reasons.CLOCK_OUT_OF_BOUNDS)
        assert exchange.position_reads == [] and exchange.kinds() == []  # nothing read, nothing sent

        status = await collect(rig.rds, [SYMBOL], "auto")
        assert "apply-b" in {c["consumer"] for c in status.clocks}
        assert "differs" in status.clocks_problem

        await a_peer(rig, "apply-b", offset_ms=30.0)  # its time sync fixed
        assert (await rig.apply.clocks.round()).ok
        again, again_fields, again_plan = await rig.propose()
        exchange.places.append(At(filled(again_plan)))
        task = asyncio.create_task(rig.handler.handle_proposal(again, again_fields))
        await rig.grant(await rig.plan(again_plan))
        await asyncio.wait_for(task, 10)
        assert exchange.kinds() == ["place"]


async def test_a_peer_that_stopped_publishing_is_no_longer_compared(store_url: str, tmp_path: Path) -> None:
    """Its reading expired in the store (the store's clock decides, not the hosts'): it leaves the set."""
    async with apply_rig(store_url, tmp_path, scripted()) as rig:
        await a_peer(rig, "apply-gone", offset_ms=5_000.0)
        await rig.rds.delete(keys.apply_clock("apply-gone"))  # what its expiry does
        assert (await rig.apply.clocks.round()).ok
        assert "apply-gone" not in await rig.rds.smembers(keys.APPLY_CLOCK_HOSTS)


async def test_an_unreadable_reading_is_ignored_and_said_so(store_url: str, tmp_path: Path) -> None:
    async with apply_rig(store_url, tmp_path, scripted()) as rig:
        await rig.rds.set(keys.apply_clock("apply-x"), "not|a|reading", ex=10)
        await rig.rds.sadd(keys.APPLY_CLOCK_HOSTS, "apply-x")
        with structlog.testing.capture_logs() as logged:
            assert (await rig.apply.clocks.round()).ok
        assert [e["host"] for e in logged if "unreadable clock reading" in e["event"]] == ["apply-x"]
        status = await collect(rig.rds, [SYMBOL], "auto")
        assert {"consumer": "apply-x", "unreadable": True} in status.clocks


async def test_an_uncertain_offset_is_measured_again_before_it_fails_anything(store_url: str, tmp_path: Path) -> None:
    """A reading aged past half the bound (drift since its measurement) is measured again in the next round."""
    exchange = scripted()
    async with apply_rig(store_url, tmp_path, exchange) as rig:
        exchange.clock_error_ms = 130.0  # over half the 250 ms bound
        await rig.apply.clocks.round()
        assert len(exchange.syncs) == 1
