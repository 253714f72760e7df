"""Apply's position reads for planning, shared by the proposals planned at the same moment.

Each proposal needs the exchange's position of its symbol. While one read is on its way, the proposals that
ask meanwhile are collected and served by the next read, one request for all of them (with several symbols,
the all-positions form of the same endpoint). Every request is sent after each of its proposals asked, so a
shared answer is exactly as fresh as a read of its own would have been; one at a time nothing changes.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

from quantum_trader.exchange.base import Exchange, ExchangeUnavailable


class PositionReads:
    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._waiting: dict[str, list[asyncio.Future[Decimal]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def amount(self, symbol: str) -> Decimal:
        """The signed position of ``symbol``, read after this call; raises what the exchange read raised."""
        answer: asyncio.Future[Decimal] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(symbol, []).append(answer)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_while_asked(), name="apply-position-reads")
        return await answer

    async def _read_while_asked(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, {}
            try:
                positions = await self._exchange.positions(list(batch))
            except Exception as exc:  # each asker gets the failure, as from a read of its own
                for answers in batch.values():
                    for answer in answers:
                        if not answer.done():
                            answer.set_exception(exc)
                continue
            for symbol, answers in batch.items():
                position = positions.get(symbol)
                for answer in answers:
                    if answer.done():  # the asker was cancelled meanwhile
                        continue
                    if position is None:
                        answer.set_exception(ExchangeUnavailable(f"positionRisk reply without {symbol}"))
                    else:
                        answer.set_result(position.amt)
