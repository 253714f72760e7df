"""What every service instance holds: its settings, store client, consumer name, logger, scripts and clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import redis.asyncio as aioredis

from quantum_trader import logs
from quantum_trader.bus.scripts import Scripts
from quantum_trader.clock import SYSTEM_CLOCK, Clock
from quantum_trader.journal import open_journal
from quantum_trader.services.consumer import STORE_ERRORS, Backoff, Failover, consumer_name
from quantum_trader.settings import Settings


class Service:
    """The part every service shares: Apply, the Governor and P3.3 each consume a group with it."""

    name: ClassVar[str]
    metrics: Any  # the service's own metrics (services/metrics.py), set by each service

    def __init__(
        self, settings: Settings, redis: aioredis.Redis, *, consumer: str = "", clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.consumer = consumer or consumer_name(settings.consumer_name, self.name)
        self.log = logs.get(self.name)
        # the local copy of every audit and result line this instance writes (journal.py)
        self.journal = open_journal(settings, self.name, self.consumer)
        self._scripts = Scripts(redis, self.journal)
        self._clock = clock

    async def until_store(self, step: Callable[[], Awaitable[Any]]) -> Any:
        """Run a start-up step until the store takes it (it may be restarting, loading, or refusing writes until
        its replicas catch up: NOREPLICAS); meanwhile the service decides nothing."""
        backoff = Backoff()
        while True:
            try:
                return await step()
            except STORE_ERRORS as exc:
                self.log.warning("store unavailable at start, retrying", error=str(exc), retry_in_s=backoff.delay)
                await backoff.wait()

    def failover(self, dlq: str, min_idle_s: float = 0.0) -> Failover:
        idle_s = max(self.settings.claim_idle_s, min_idle_s)
        return Failover(claim_idle_ms=round(idle_s * 1000), max_deliveries=self.settings.max_deliveries, dlq=dlq)
