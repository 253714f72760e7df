"""P3.3's snapshot poller on a real store, with an exchange scripted at its interface: how a plan's wait for a
fresh snapshot ends when a poll fails, outlives the exchange timeout, or hits a bug."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from conftest import make_settings
from quantum_trader import logs
from quantum_trader.exchange.base import ExchangeUnavailable, PositionInfo
from quantum_trader.services.brain.snapshots import SnapshotPoller
from quantum_trader.services.metrics import BrainMetrics
from quantum_trader.tasks import cancel_and_wait

pytestmark = pytest.mark.integration


class ScriptedPositions:
    """positionRisk answers, one scripted step per request: "ok", "fail" (unavailable), "slow" (longer than any
    wait here) or "bug" (an error no exchange layer raises)."""

    def __init__(self, *steps: str) -> None:
        self.steps = list(steps)
        self.requests: list[list[str]] = []

    async def positions(self, symbols: list[str], purpose: str = "poll") -> dict[str, PositionInfo]:
        self.requests.append(list(symbols))
        step = self.steps.pop(0) if self.steps else "ok"
        if step == "fail":
            raise ExchangeUnavailable("positionRisk: 503")
        if step == "slow":
            await asyncio.sleep(30)
        if step == "bug":
            raise RuntimeError("a bug in a poll")
        return {s: PositionInfo(s, Decimal("0.010"), Decimal(60000), Decimal(60000)) for s in symbols}

    async def filters(self) -> dict[str, Any]:
        return {}

    def now_ms(self) -> float:
        return time.time() * 1000


class FrozenMono:
    """Wall time as it is, monotonic time standing still: only the wait's own timeout can end it."""

    def wall(self) -> float:
        return time.time()

    def mono(self) -> float:
        return 1000.0


def poller(
    tmp_path: Path, store_url: str, rds: aioredis.Redis, exchange: Any, clock: Any = None, interval_s: float = 0.5
) -> SnapshotPoller:
    brain = {"snapshot_interval_s": interval_s}
    settings = make_settings(tmp_path, store_url, "http://127.0.0.1:9", exchange={"timeout_ms": 200}, brain=brain)
    metrics = BrainMetrics(CollectorRegistry())
    return SnapshotPoller(settings, rds, exchange, metrics, logs.get("p33"), clock or FrozenMono(), lambda _: None)


async def test_a_failed_poll_is_asked_for_once_more_and_the_second_answers(tmp_path, store_url, rds) -> None:
    exchange = ScriptedPositions("fail", "ok")
    snapshots = poller(tmp_path, store_url, rds, exchange)
    assert await snapshots.snapshots_since(["BTCUSDT"], time.time() - 1)
    assert exchange.requests == [["BTCUSDT"], ["BTCUSDT"]]
    assert snapshots.metrics.snapshot_errors._value.get() == 1  # counted once, by the poll that failed


async def test_a_poll_longer_than_the_exchange_timeout_ends_the_wait_without_another(tmp_path, store_url, rds) -> None:
    """The wait is bounded by the exchange timeout + 1 s; a poll still on its way then is not asked again (with
    a clock that does not move, only the timeout of the wait itself can end it)."""
    exchange = ScriptedPositions("slow")
    snapshots = poller(tmp_path, store_url, rds, exchange)
    assert not await snapshots.snapshots_since(["BTCUSDT"], time.time())
    assert exchange.requests == [["BTCUSDT"]]
    await snapshots._reads.aclose()


async def test_a_bug_in_a_poll_nobody_waits_for_is_logged(tmp_path, store_url, rds, capsys) -> None:
    exchange = ScriptedPositions("bug")
    # no full poll of every symbol comes while the test looks (on a loaded machine its first look can be late)
    snapshots = poller(tmp_path, store_url, rds, exchange, interval_s=60)
    run = asyncio.create_task(snapshots.run())
    await asyncio.sleep(0)
    snapshots.ask_refresh(["BTCUSDT"])
    for _ in range(200):
        if exchange.requests:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    await cancel_and_wait([run])
    captured = capsys.readouterr()
    assert exchange.requests == [["BTCUSDT"]]
    assert "snapshot poll failed unexpectedly" in captured.out + captured.err
    assert "a bug in a poll" in captured.out + captured.err
