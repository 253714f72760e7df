"""Apply's shared position reads: proposals asking while a read is on its way share the next one, and every
answer comes from a request sent after its proposal asked."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest

from quantum_trader.exchange.base import ExchangeUnavailable, PositionInfo
from quantum_trader.services.apply.position_reads import PositionReads


class RecordingExchange:
    """Answers position reads after a delay and records when each was sent and for which symbols."""

    def __init__(self, fail: bool = False) -> None:
        self.requests: list[tuple[float, list[str]]] = []
        self.purposes: list[str] = []
        self.amounts = {"BTCUSDT": Decimal("1"), "ETHUSDT": Decimal("-2"), "SOLUSDT": Decimal("3")}
        self.fail = fail

    async def positions(self, symbols: list[str], purpose: str = "poll") -> dict[str, PositionInfo]:
        self.requests.append((asyncio.get_running_loop().time(), list(symbols)))
        self.purposes.append(purpose)
        await asyncio.sleep(0.02)
        if self.fail:
            raise ExchangeUnavailable("positionRisk timed out")
        return {s: PositionInfo(s, self.amounts[s], Decimal(0), Decimal(0)) for s in symbols}


async def test_one_at_a_time_each_proposal_gets_its_own_read() -> None:
    exchange = RecordingExchange()
    reads = PositionReads(exchange)  # type: ignore[arg-type]
    assert await reads.amount("BTCUSDT") == 1
    assert await reads.amount("ETHUSDT") == -2
    assert [symbols for _, symbols in exchange.requests] == [["BTCUSDT"], ["ETHUSDT"]]
    assert exchange.purposes == ["plan", "plan"]  # the budget's smallest share (exchange/throttle.py)


async def test_proposals_asking_meanwhile_share_the_next_read_sent_after_they_asked() -> None:
    exchange = RecordingExchange()
    reads = PositionReads(exchange)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    asked: list[float] = []

    async def ask(symbol: str, after_s: float) -> Decimal:
        await asyncio.sleep(after_s)
        asked.append(loop.time())
        return await reads.amount(symbol)

    got = await asyncio.gather(ask("BTCUSDT", 0), ask("ETHUSDT", 0.005), ask("SOLUSDT", 0.01), ask("BTCUSDT", 0.01))
    assert got == [1, -2, 3, 1]
    assert [sorted(symbols) for _, symbols in exchange.requests] == [["BTCUSDT"], ["BTCUSDT", "ETHUSDT", "SOLUSDT"]]
    assert exchange.requests[1][0] >= max(asked)  # the shared read left after the last of its askers asked


async def test_a_failed_read_fails_every_proposal_that_shared_it() -> None:
    reads = PositionReads(RecordingExchange(fail=True))  # type: ignore[arg-type]
    results: list[Any] = await asyncio.gather(reads.amount("BTCUSDT"), reads.amount("ETHUSDT"), return_exceptions=True)
    assert all(isinstance(r, ExchangeUnavailable) for r in results)
    with pytest.raises(ExchangeUnavailable):
        await reads.amount("SOLUSDT")  # and the next read is tried afresh
