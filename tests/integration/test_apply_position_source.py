"""Where Apply takes a plan's position from (services/apply/position_reads.py): P3.3's snapshot in the store
while it is fresh, the exchange otherwise; never an unusable snapshot, and a store user that may not read the
snapshots (an ACL older than this read) plans from the exchange instead of failing every proposal."""

from __future__ import annotations

import secrets
import time
from decimal import Decimal

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.clock import SYSTEM_CLOCK
from quantum_trader.exchange.base import PositionInfo
from quantum_trader.services.apply.position_reads import PositionReads
from quantum_trader.services.metrics import ApplyMetrics

pytestmark = pytest.mark.integration
D = Decimal
SYMBOL = "BTCUSDT"


class CountingExchange:
    def __init__(self, amount: str = "0.500") -> None:
        self.reads: list[list[str]] = []
        self.amount = D(amount)

    async def positions(self, symbols: list[str], purpose: str = "poll") -> dict[str, PositionInfo]:
        self.reads.append(list(symbols))
        return {s: PositionInfo(s, self.amount, D(0), D(0)) for s in symbols}


class Log:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, message: str, /, **fields: object) -> None:
        self.errors.append(message)


async def snapshot(rds: aioredis.Redis, amt: str, age_s: float) -> None:
    fields = {"position_amt": amt, "entry_price": "60000", "mark_price": "60010", "ts": repr(time.time() - age_s)}
    await rds.hset(keys.snapshot(SYMBOL), mapping=fields)


def reads(rds: aioredis.Redis, exchange: CountingExchange, max_age_s: float = 10.0) -> tuple[PositionReads, Log]:
    log = Log()
    metrics = ApplyMetrics(CollectorRegistry())
    return PositionReads(exchange, rds, max_age_s=max_age_s, clock=SYSTEM_CLOCK, metrics=metrics, log=log), log  # type: ignore[arg-type]


def counted(positions: PositionReads, source: str) -> float:
    metrics = positions._metrics
    assert metrics is not None
    return metrics.position_reads.labels(source)._value.get()


async def test_a_fresh_snapshot_is_the_plans_position_and_costs_no_request(rds: aioredis.Redis) -> None:
    exchange = CountingExchange()
    positions, _ = reads(rds, exchange)
    await snapshot(rds, "-0.250", age_s=2)
    assert await positions.amount(SYMBOL) == D("-0.250")
    assert exchange.reads == [] and counted(positions, "snapshot") == 1


@pytest.mark.parametrize("state", ["stale", "missing", "unreadable", "source_off"])
async def test_otherwise_the_exchange_is_read(rds: aioredis.Redis, state: str) -> None:
    exchange = CountingExchange("0.500")
    positions, _ = reads(rds, exchange, max_age_s=0 if state == "source_off" else 10.0)
    if state in ("stale", "source_off"):
        await snapshot(rds, "-0.250", age_s=11 if state == "stale" else 1)
    elif state == "unreadable":
        await rds.hset(keys.snapshot(SYMBOL), mapping={"position_amt": "lots", "ts": "now"})
    assert await positions.amount(SYMBOL) == D("0.500")
    assert exchange.reads == [[SYMBOL]] and counted(positions, "exchange") == 1


async def test_a_store_user_without_read_access_plans_from_the_exchange(rds: aioredis.Redis, store_url: str) -> None:
    """As a deployment upgraded without `qt acl --apply`: the snapshot read is refused (NOPERM)."""
    user, password = f"qt-test-{secrets.token_hex(4)}", secrets.token_hex(16)
    await rds.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~quantum:apply:*", "+@all")
    try:
        await snapshot(rds, "-0.250", age_s=1)
        limited = make_client(store_url.replace("redis://", f"redis://{user}:{password}@", 1))
        try:
            exchange = CountingExchange("0.500")
            positions, log = reads(limited, exchange)
            assert await positions.amount(SYMBOL) == D("0.500")
            assert await positions.amount(SYMBOL) == D("0.500")
            assert exchange.reads == [[SYMBOL], [SYMBOL]]
            assert len(log.errors) == 1 and "qt acl --apply" in log.errors[0]  # said once, then the exchange only
        finally:
            await limited.aclose()
    finally:
        await rds.execute_command("ACL", "DELUSER", user)
