"""Apply's position reads for planning, shared by the proposals planned at the same moment.

Each proposal needs the exchange's position of its symbol. While one read is on its way, the proposals that
ask meanwhile are served by the next read, one request for all of them (with several symbols, the
all-positions form of the same endpoint): services/shared_reads.py.
"""

from __future__ import annotations

from decimal import Decimal

from quantum_trader.exchange.base import Exchange, ExchangeUnavailable, PositionInfo
from quantum_trader.services.shared_reads import SharedReads


class PositionReads:
    def __init__(self, exchange: Exchange) -> None:
        self._reads: SharedReads[str, PositionInfo] = SharedReads(exchange.positions, "apply-position-reads")

    async def amount(self, symbol: str) -> Decimal:
        """The signed position of ``symbol``, read after this call; raises what the exchange read raised."""
        got = await self._reads.get([symbol])
        if symbol not in got:
            raise ExchangeUnavailable(f"positionRisk reply without {symbol}")
        return got[symbol].amt

    async def aclose(self) -> None:
        await self._reads.aclose()
