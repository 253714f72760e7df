"""Where Apply learns a symbol's position to plan a close: P3.3's snapshot when it is fresh, else the exchange.

Planning needs the position only to choose the side and cap the proposed quantity; the quantity that is sent is
P3.3's permit's (``safe_close_qty``, checked against its ledger and its own snapshot). So Apply reads the snapshot
P3.3 keeps (``quantum:position:snapshot:<SYMBOL>``: pushed by the user-data stream within milliseconds of a
change, and known true at its ``ts``) instead of spending request weight on every proposal. A snapshot older
than ``apply.snapshot_max_age_s`` (or missing, or unreadable) is not used: the exchange is read, one request
for all the proposals that ask meanwhile (services/shared_reads.py). ``snapshot_max_age_s = 0`` always reads
the exchange (the design before the push path).

A plan made from a snapshot that lags the exchange can only be a plan P3.3 then denies (its own checks see the
same or a newer state) or a SKIP ``no_position`` for a position opened within the last moments; the chain never
sends more than P3.3's permit allows either way.
"""

from __future__ import annotations

import functools
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from quantum_trader.bus import keys
from quantum_trader.clock import Clock
from quantum_trader.domain.models import MalformedEntry, Snapshot, from_fields
from quantum_trader.exchange.base import Exchange, ExchangeUnavailable, PositionInfo
from quantum_trader.services.metrics import ApplyMetrics
from quantum_trader.services.shared_reads import SharedReads


class PositionReads:
    def __init__(
        self,
        exchange: Exchange,
        redis: aioredis.Redis | None = None,
        *,
        max_age_s: float = 0.0,
        clock: Clock | None = None,
        metrics: ApplyMetrics | None = None,
        log: Any = None,
    ) -> None:
        # from the budget's smallest share (exchange/throttle.py): a plan's read never takes an order's room
        read = functools.partial(exchange.positions, purpose="plan")
        self._reads: SharedReads[str, PositionInfo] = SharedReads(read, "apply-position-reads")
        self._redis = redis
        self._max_age_s = max_age_s if redis is not None and clock is not None else 0.0
        self._clock = clock
        self._metrics = metrics
        self._log = log

    async def amount(self, symbol: str) -> Decimal:
        """The signed position of ``symbol``: the snapshot's if fresh, else read from the exchange after this
        call; raises what the exchange read raised (and the store's errors)."""
        if self._max_age_s > 0:
            pushed = await self._fresh_snapshot(symbol)
            if pushed is not None:
                self._count("snapshot")
                return pushed
        self._count("exchange")
        got = await self._reads.get([symbol])
        if symbol not in got:
            raise ExchangeUnavailable(f"positionRisk reply without {symbol}")
        return got[symbol].amt

    async def _fresh_snapshot(self, symbol: str) -> Decimal | None:
        assert self._redis is not None and self._clock is not None
        try:
            fields = await self._redis.hgetall(keys.snapshot(symbol))
        except NoPermissionError:
            # a store whose ACL predates this read (run `qt acl --apply`): plan from the exchange, as before
            if self._log is not None:
                self._log.error(
                    "Apply's store user may not read P3.3's snapshots (run `qt acl --apply`); reading the exchange"
                )
            self._max_age_s = 0.0
            return None
        if not fields:
            return None
        try:
            snapshot = from_fields(Snapshot, fields)
        except MalformedEntry:
            return None  # P3.3 audits its own writes; here it is simply not used
        if self._clock.wall() - snapshot.ts > self._max_age_s:
            return None
        return snapshot.position_amt

    def _count(self, source: str) -> None:
        if self._metrics is not None:
            self._metrics.position_reads.labels(source).inc()

    async def aclose(self) -> None:
        await self._reads.aclose()
