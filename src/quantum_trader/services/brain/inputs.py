"""What P3.3 reads to decide plans, in one pipelined round trip: per symbol its snapshot, ledger and
order-in-flight mark, and whether results wait to be recorded by the ledger follower."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.bus.replies import in_groups
from quantum_trader.domain.brain import BrainInputs
from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.domain.models import Ledger, Snapshot
from quantum_trader.services.brain.ledger import parse_or_none


@dataclass(frozen=True, slots=True)
class InputsRead:
    inputs: dict[str, BrainInputs]
    unrecorded: bool  # results are published that no P3.3 instance has recorded yet


async def read_inputs(
    redis: aioredis.Redis, symbols: list[str], filters: dict[str, SymbolFilters], *, follower: bool = False
) -> InputsRead:
    """Snapshot, ledger and in-flight mark of each symbol. With ``follower``, also whether results were
    published that no P3.3 instance has recorded yet (the ledger group's lag or pending entries; asked first,
    so the marks read after it include every result recorded by then)."""
    async with redis.pipeline(transaction=False) as pipe:
        if follower:
            pipe.xinfo_groups(keys.RESULT_STREAM)
        for symbol in symbols:
            pipe.hgetall(keys.snapshot(symbol))
            pipe.hgetall(keys.ledger(symbol))
            pipe.get(keys.p33_symbol_in_flight(symbol))
        read = await pipe.execute(raise_on_error=False)
    groups = read.pop(0) if follower else []
    for reply in read:
        if isinstance(reply, Exception):
            raise reply
    inputs = {
        symbol: BrainInputs(
            snapshot=parse_or_none(Snapshot, snapshot),
            ledger=parse_or_none(Ledger, ledger),
            in_flight_plan=mark,
            filters=filters.get(symbol),
        )
        for symbol, (snapshot, ledger, mark) in zip(symbols, in_groups(read, 3), strict=True)
    }
    return InputsRead(inputs, _unrecorded(groups))


def _unrecorded(groups: Any) -> bool:
    if isinstance(groups, Exception):
        if "no such key" not in str(groups).lower():
            raise groups
        groups = []  # no result stream (yet, or after a flush): no result waits to be recorded
    ledger_group = [g for g in groups if g["name"] == keys.LEDGER_GROUP]
    # lag None means unknown (after a trim or a deleted entry): assume results wait
    return bool(ledger_group) and (bool(ledger_group[0]["pending"]) or ledger_group[0].get("lag") != 0)
