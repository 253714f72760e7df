"""P3.3's ledger follower: results read from the result stream (its own group) are recorded in the ledger;
malformed ones are dead-lettered. Executed fills then ask for a fresh snapshot of their symbol."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.bus.streams import dead_letter
from quantum_trader.clock import Clock
from quantum_trader.domain import reasons
from quantum_trader.domain.models import MalformedEntry, Result, from_fields
from quantum_trader.services.brain.ledger import LedgerChange, record_results
from quantum_trader.services.consumer import Entries
from quantum_trader.services.metrics import BrainMetrics


class LedgerFollower:
    def __init__(
        self,
        redis: aioredis.Redis,
        metrics: BrainMetrics,
        log: Any,
        clock: Clock,
        audit_maxlen: int,
        moved: Callable[[LedgerChange], None],
        ask_refresh: Callable[[list[str], dict[str, int]], None],
    ) -> None:
        self.redis = redis
        self.metrics = metrics
        self.log = log
        self._clock = clock
        self._audit_maxlen = audit_maxlen
        self._moved = moved
        self._ask_refresh = ask_refresh

    async def handle_result(self, entry_id: str, fields: dict[str, str]) -> None:
        await self.handle_results([(entry_id, fields)])

    async def handle_results(self, entries: Entries) -> None:
        """Results read together: malformed ones dead-lettered, the rest recorded in one transaction; then a
        snapshot is asked for each symbol a fill moved."""
        results = []
        for entry_id, fields in entries:
            try:
                results.append((entry_id, from_fields(Result, fields)))
            except MalformedEntry as exc:
                await dead_letter(
                    self.redis,
                    keys.RESULT_DLQ,
                    keys.RESULT_STREAM,
                    keys.LEDGER_GROUP,
                    entry_id,
                    fields,
                    f"{reasons.MALFORMED_ENTRY}: {exc}",
                    "p33",
                )
                self.metrics.dead_letters.labels("result").inc()
                self.log.warning("malformed result dead-lettered", entry_id=entry_id, error=str(exc))
        if not results:
            return
        for change in await record_results(self.redis, results, self._clock.wall, self._audit_maxlen):
            self._moved(change)
        moved = [result.symbol for _, result in results if result.executed]
        if moved:
            # each fill's exchange time: the stream must show it (a snapshot synced up to it) soon, or it missed it
            fills = {r.symbol: r.order_time_ms for _, r in results if r.executed and r.order_time_ms > 0}
            self._ask_refresh(moved, fills)
