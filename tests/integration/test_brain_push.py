"""P3.3 with the user-data stream (issue 22, item 3), on the running chain against the simulator's real
WebSocket: snapshots from pushed positions and mark prices, the poll as the safety net that takes over when
the stream is not healthy, drift lines for changes the chain did not make, and the switch that turns push off.

The polls here are made slow on purpose (``snapshot_interval_s`` 300 s, or the safety net's) so that a
snapshot that moves can only have been moved by the stream: each test proves which path wrote it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from conftest import SIM_ADMIN, SIM_KEY, SIM_SECRET, Chain, make_settings, set_position
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.exchange.sim import SimConfig, SimServer
from quantum_trader.services.brain.push import DRIFT_GRACE_S

pytestmark = pytest.mark.integration

SYMBOL = "ETHUSDT"


async def until(found: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await found():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


def admin(sim: SimServer, method: str, path: str, body: Any = None) -> Any:
    reply = httpx.request(method, f"{sim.url}{path}", json=body, headers={"X-Sim-Admin-Token": SIM_ADMIN})
    assert reply.status_code == 200, reply.text
    return reply.json()


async def snapshot_amt(rds: aioredis.Redis, symbol: str = SYMBOL) -> Decimal | None:
    amt = await rds.hget(keys.snapshot(symbol), "position_amt")
    return Decimal(amt) if amt is not None else None


def chain_with(tmp_path: Path, store_url: str, sim: SimServer, **sections: Any) -> Chain:
    brain = {"snapshot_interval_s": 300.0, "safety_poll_s": 300.0, **sections.pop("brain", {})}
    stream = {"silence_s": 2.0, "backoff_min_s": 0.05, "backoff_max_s": 0.2, **sections.pop("stream", {})}
    return Chain(make_settings(tmp_path, store_url, sim.url, brain=brain, stream=stream, **sections))


async def test_an_outside_change_reaches_the_snapshot_from_the_stream(sim, rds, tmp_path, store_url) -> None:
    """With both polls 300 s apart, a position set outside the order flow (ADJUSTMENT) and a liquidation
    reach the snapshot within the bound; the mark price follows the exchange's price too."""
    set_position(sim, SYMBOL, "2.000")
    chain = chain_with(tmp_path, store_url, sim)
    await chain.start("brain")
    try:
        brain = chain.services["brain"]
        await until(lambda: _healthy(brain), "the stream resynced")
        assert await snapshot_amt(rds) == Decimal("2.000")
        sessions = brain.stream.health.sessions  # no reconnect below: no resync poll could have written it
        changed = time.monotonic()
        set_position(sim, SYMBOL, "3.000")
        await until(lambda: _amt_is(rds, "3.000"), "the ADJUSTMENT in the snapshot", 2.0)
        pushed_in = time.monotonic() - changed
        admin(sim, "POST", "/_sim/force-close", {"symbol": SYMBOL, "qty": "1.000"})
        await until(lambda: _amt_is(rds, "2.000"), "the liquidation in the snapshot", 2.0)
        admin(sim, "POST", "/_sim/price", {"symbol": SYMBOL, "price": "3100"})
        await until(lambda: _mark_is(rds, "3100.00"), "the new mark in the snapshot", 6.0)  # ticks 1 s, writes 2 s
        assert brain.metrics.pushed_positions._value.get() >= 2
        assert brain.stream.health.sessions == sessions and brain.stream.health.healthy
        print(f"outside change -> snapshot: {pushed_in * 1000:.1f} ms (push; the poll would take up to 300 s)")
    finally:
        await chain.stop()


@pytest.mark.parametrize("account_update_first", [False, True])
async def test_changes_the_chain_did_not_make_are_drift_and_its_own_close_is_not(
    rds, tmp_path, store_url, account_update_first: bool
) -> None:
    """A liquidation-style ADL and a position set outside the order flow are drift; the chain's own close is
    not, whichever of a fill's two events the exchange sends first (Binance does not document it)."""
    config = SimConfig(api_key=SIM_KEY, api_secret=SIM_SECRET, admin_token=SIM_ADMIN, price_sigma=0.0,
                       account_update_first=account_update_first)  # fmt: skip
    with SimServer(config) as sim:
        await _drift_run(sim, rds, tmp_path, store_url)


async def _drift_run(sim: SimServer, rds: aioredis.Redis, tmp_path: Path, store_url: str) -> None:
    set_position(sim, SYMBOL, "2.000")
    chain = chain_with(tmp_path, store_url, sim)
    await chain.start()
    try:
        await until(lambda: _healthy(chain.services["brain"]), "the stream resynced")
        start = (await rds.xrevrange(keys.LEDGER_AUDIT_STREAM, count=1) or [("0-0", {})])[0][0]
        _, result = await _propose(rds, SYMBOL, Decimal("0.500"))
        assert result.executed
        await until(lambda: _amt_is(rds, "1.500"), "the chain's own close in the snapshot")
        await until(lambda: _ledger_is(rds, "1.500"), "the chain's own close in the ledger")
        admin(sim, "POST", "/_sim/force-close", {"symbol": SYMBOL, "qty": "0.500", "adl": True})
        set_position(sim, SYMBOL, "1.200")

        async def drifts() -> list[dict[str, str]]:
            return [f for _, f in await rds.xrange(keys.LEDGER_AUDIT_STREAM, f"({start}") if f["source"] == "drift"]

        await until(lambda: _count(drifts, 2), "two drift lines")
        await asyncio.sleep(DRIFT_GRACE_S + 0.5)  # a drift line for the chain's own close would be out by now
        lines = await drifts()  # an ORDER update waits DRIFT_GRACE_S for its explaining fill: written later
        assert sorted(line["exchange_reason"] for line in lines) == ["ADJUSTMENT", "ORDER"], lines
        adl = next(line for line in lines if line["exchange_reason"] == "ORDER")
        adjustment = next(line for line in lines if line["exchange_reason"] == "ADJUSTMENT")
        assert (adl["exchange_reason"], adl["client_order_ids"]) == ("ORDER", "adl_autoclose")
        assert adl["exchange_amt"] == "1.000"
        assert (adjustment["exchange_reason"], adjustment["exchange_amt"]) == ("ADJUSTMENT", "1.200")
        assert adl["before"] == "1.500"  # the ledger after the chain's own close, which was no drift
        assert chain.services["brain"].metrics.drift_events.labels("ORDER")._value.get() == 1
    finally:
        await chain.stop()


async def test_the_poll_takes_over_while_the_stream_is_down_and_push_comes_back(sim, rds, tmp_path, store_url) -> None:
    """The listen key cannot be had (POST answers 503) and the stream is dropped: not healthy, so the poll
    runs at its own interval (0.5 s here, the safety net 300 s) and an outside change still reaches the
    snapshot; when the key can be had again the stream is back and the poll goes quiet."""
    set_position(sim, SYMBOL, "2.000")
    chain = chain_with(tmp_path, store_url, sim, brain={"snapshot_interval_s": 0.5})
    await chain.start("brain")
    try:
        brain = chain.services["brain"]
        await until(lambda: _healthy(brain), "the stream resynced")
        no_key = {"kind": "http_5xx", "path": "/fapi/v1/listenKey", "method": "POST", "count": None}
        admin(sim, "POST", "/_sim/faults", no_key)
        admin(sim, "POST", "/_sim/stream-faults", {"kind": "drop"})
        await until(lambda: _not_healthy(brain), "the stream down")
        set_position(sim, SYMBOL, "4.000")
        await until(lambda: _amt_is(rds, "4.000"), "the change, by the poll", 5.0)
        assert brain.snapshots.poll_interval() == 0.5
        admin(sim, "DELETE", "/_sim/faults")
        await until(lambda: _healthy(brain), "the stream back", 10.0)
        assert brain.snapshots.poll_interval() == 300.0
        assert brain.stream.health.sessions >= 2 and "-1001" in brain.stream.health.last_error
    finally:
        await chain.stop()


async def test_push_off_is_poll_only(sim, rds, tmp_path, store_url) -> None:
    """``QT_STREAM__PUSH=false``: no stream at all (no listen key asked for, no connection), the snapshots
    moved by the poll alone, at its own interval."""
    set_position(sim, SYMBOL, "2.000")
    accepted = sim.app.state.sim.streams.accepted
    chain = chain_with(tmp_path, store_url, sim, brain={"snapshot_interval_s": 0.5}, stream={"push": False})
    await chain.start("brain")
    try:
        brain = chain.services["brain"]
        assert brain.stream is None and brain.snapshots.poll_interval() == 0.5
        set_position(sim, SYMBOL, "5.000")
        await until(lambda: _amt_is(rds, "5.000"), "the change, by the poll", 5.0)
        assert sim.app.state.sim.streams.accepted == accepted
    finally:
        await chain.stop()


async def _healthy(brain: Any) -> bool:
    return bool(brain.stream is not None and brain.stream.health.healthy)


async def _not_healthy(brain: Any) -> bool:
    return not await _healthy(brain)


async def _amt_is(rds: aioredis.Redis, amt: str) -> bool:
    return await snapshot_amt(rds) == Decimal(amt)


async def _ledger_is(rds: aioredis.Redis, amt: str) -> bool:
    held = await rds.hget(keys.ledger(SYMBOL), "last_known_amt")
    return held is not None and Decimal(held) == Decimal(amt)


async def _mark_is(rds: aioredis.Redis, mark: str) -> bool:
    return await rds.hget(keys.snapshot(SYMBOL), "mark_price") == mark


async def _count(read: Callable[[], Awaitable[list[Any]]], n: int) -> bool:
    return len(await read()) >= n


async def _propose(rds: aioredis.Redis, symbol: str, qty: Decimal) -> tuple[Any, Any]:
    sub = await ops.propose(rds, symbol, "PARTIAL_CLOSE", qty=qty)
    return sub, await ops.wait_result(rds, sub.plan_id, 10, sub.result_cursor)


async def test_a_fill_the_stream_lost_without_a_disconnect_is_polled_and_the_stream_resynced(
    sim, rds, tmp_path, store_url
) -> None:
    """The stream goes quiet for 2 s (less than its silence bound: nobody notices) and the chain's close fills
    meanwhile: its events are lost. P3.3 applies the fill's result, sees within a second that its snapshot does
    not show the fill, polls the symbol and has the stream resync; with both polls 300 s apart, nothing else
    could have corrected the snapshot (found by `qt chaos --stream-faults`: snapshots wrong until the safety poll)."""
    set_position(sim, SYMBOL, "2.000")
    chain = chain_with(tmp_path, store_url, sim, stream={"silence_s": 5.0})
    await chain.start()
    try:
        brain = chain.services["brain"]
        await until(lambda: _healthy(brain), "the stream resynced")
        sessions = brain.stream.health.sessions
        admin(sim, "POST", "/_sim/stream-faults", {"kind": "silence", "ms": 2000})
        sub = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=Decimal("0.500"), source="test")
        result = await ops.wait_result(rds, sub.plan_id, 10, sub.result_cursor)
        assert result is not None and result.executed, result
        await until(lambda: _amt_is(rds, "1.500"), "the lost fill in the snapshot", 4.0)
        assert brain.metrics.stream_gaps._value.get() >= 1
        await until(lambda: _sessions_above(brain, sessions), "the stream resynced by its owner", 5.0)
    finally:
        await chain.stop()


async def test_a_change_the_stream_lost_found_by_the_safety_poll_resyncs_the_stream(
    sim, rds, tmp_path, store_url
) -> None:
    """A position changed outside the chain while the stream is quiet for 3 s (less than its silence bound: no
    reconnect): its ADJUSTMENT event is lost. The safety poll (every 2 s here) finds the change, writes it, and
    has the stream resync, since a stream that lost one event may have lost others: without that, the session
    would go on as if healthy (the sessions count shows which)."""
    set_position(sim, SYMBOL, "2.000")
    chain = chain_with(tmp_path, store_url, sim, brain={"safety_poll_s": 2.0}, stream={"silence_s": 5.0})
    await chain.start()
    try:
        brain = chain.services["brain"]
        await until(lambda: _healthy(brain), "the stream resynced")
        sessions, gaps = brain.stream.health.sessions, brain.metrics.stream_gaps._value.get()
        admin(sim, "POST", "/_sim/stream-faults", {"kind": "silence", "ms": 3000})
        set_position(sim, SYMBOL, "1.700")
        await until(lambda: _amt_is(rds, "1.700"), "the lost change in the snapshot, from the safety poll", 6.0)
        await until(lambda: _sessions_above(brain, sessions), "the stream resynced by its owner", 6.0)
        assert brain.metrics.stream_gaps._value.get() == gaps + 1
    finally:
        await chain.stop()


async def _sessions_above(brain: Any, sessions: int) -> bool:
    return bool(brain.stream.health.sessions > sessions and brain.stream.health.healthy)
