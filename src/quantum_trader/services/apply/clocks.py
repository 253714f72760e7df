"""Apply's clocks (domain/clocks.py): every few seconds this host publishes its reading of the exchange clock in
the store, reads every other live Apply's, and judges what they allow: the error the order path adds to its
"absent for good" bounds, and whether Apply must fail closed (plan nothing new, call no order absent). Each
change of that verdict is logged; the metrics and ``qt status`` show the readings."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.clock import Clock
from quantum_trader.domain.clocks import ClockReading, ClockState, decode, encode, judge
from quantum_trader.exchange.base import Exchange, ExchangeError
from quantum_trader.services.consumer import STORE_ERRORS
from quantum_trader.services.metrics import ApplyMetrics
from quantum_trader.settings import Settings

CLOCK_PUBLISH_S = 2.0


class ClockWatch:
    def __init__(
        self,
        redis: aioredis.Redis,
        exchange: Exchange,
        settings: Settings,
        consumer: str,
        metrics: ApplyMetrics,
        clock: Clock,
        log: Any,
    ) -> None:
        self.redis = redis
        self.exchange = exchange
        self.consumer = consumer
        self.metrics = metrics
        self._clock = clock
        self.log = log
        self.max_error_ms = settings.apply.max_clock_error_ms
        self.max_host_gap_ms = settings.apply.max_host_clock_gap_ms
        self.peers: dict[str, ClockReading] = {}  # the other live Apply hosts' readings, by consumer
        self._problem = ""  # the last verdict logged

    def state(self) -> ClockState:
        """What the clocks allow now, from this host's latest reading and the peers' last published ones."""
        return judge(
            self.exchange.clock_reading(),
            list(self.peers.values()),
            self._clock.wall(),
            max_error_ms=self.max_error_ms,
            max_host_gap_ms=self.max_host_gap_ms,
        )

    async def run(self) -> None:
        while True:
            await self.round()
            await asyncio.sleep(CLOCK_PUBLISH_S)

    async def round(self) -> ClockState:
        """Measure again if the reading has aged to half the bound, publish it, read the peers', judge."""
        reading = self.exchange.clock_reading()
        if reading is None or reading.error_at(self._clock.wall()) > self.max_error_ms / 2:
            try:
                await self.exchange.sync_time()
            except ExchangeError as exc:
                self.log.warning("cannot measure the exchange clock", error=exc.message)
        try:
            await self._publish_and_read()
        except STORE_ERRORS as exc:
            self.log.warning("clocks: store unavailable; keeping the peers' last readings", error=str(exc))
        state = self.state()
        self._show(state)
        return state

    async def _publish_and_read(self) -> None:
        reading = self.exchange.clock_reading()
        async with self.redis.pipeline(transaction=False) as pipe:
            if reading is not None:
                pipe.set(
                    keys.apply_clock(self.consumer), encode(reading, self._clock.wall()), ex=keys.CLOCK_READING_TTL_S
                )
                pipe.sadd(keys.APPLY_CLOCK_HOSTS, self.consumer)
            pipe.smembers(keys.APPLY_CLOCK_HOSTS)
            *_, hosts = await pipe.execute()
        others = sorted(str(host) for host in hosts if host != self.consumer)
        texts = await self.redis.mget([keys.apply_clock(host) for host in others]) if others else []
        peers: dict[str, ClockReading] = {}
        for host, text in zip(others, texts, strict=True):
            if text is None:
                await self.redis.srem(keys.APPLY_CLOCK_HOSTS, host)  # stopped publishing: its key expired
                continue
            try:
                peers[host], _ = decode(str(text))
            except ValueError as exc:
                # not a reading any Apply writes (only Apply's store account can write there: a bug, or a
                # broken host): not compared, and logged every round until it is fixed or expires.
                self.log.warning("an unreadable clock reading in the store; ignored", host=host, error=str(exc))
        self.peers = peers

    def _show(self, state: ClockState) -> None:
        reading = self.exchange.clock_reading()
        if reading is not None:
            self.metrics.clock_offset.set(reading.offset_ms)
        self.metrics.clock_error.set(state.own_error_ms)
        self.metrics.host_clock_gap.set(state.host_gap_ms)
        self.metrics.clock_ok.set(1 if state.ok else 0)
        if state.problem != self._problem:
            if state.problem:
                self.log.error("clocks out of bounds: planning nothing, calling no order absent", why=state.problem)
            else:
                self.log.warning("clocks within bounds again", error_ms=round(state.own_error_ms, 1))
            self._problem = state.problem
