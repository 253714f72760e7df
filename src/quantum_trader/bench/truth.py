"""What the exchange-has-the-last-word rule costs (docs/reliability.md): how many plans pay a lookup, and what
one lookup costs.

A plan whose proposal is newer than the store instance (every plan in a steady run) is trusted to the store's
word and pays no exchange round trip: the step reads Apply's own counter of lookups (``/metrics``) around the
sequential run. A plan the store cannot vouch for (older than a store restart or failover) pays one order
lookup (``GET /fapi/v1/order`` by client order id) before it is sent or answered: the step times that request
through the same adapter Apply uses, against the same simulator, for ids that do not exist (-2013, the answer
a plan that was never sent gets).
"""

from __future__ import annotations

import time

import httpx

from quantum_trader.bench.bounds import Waiting, within
from quantum_trader.bench.measure import Latency
from quantum_trader.exchange import open_exchange
from quantum_trader.settings import Settings

LOOKUP_METRIC = "qt_apply_truth_lookups_total"
HTTP_TIMEOUT_S = 5.0


async def lookups_so_far(metrics_url: str) -> float:
    """Apply's count of truth lookups, from its Prometheus endpoint (all reasons summed)."""
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        text = (await client.get(metrics_url)).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(LOOKUP_METRIC))


async def lookup_latency(settings: Settings, symbol: str, count: int, waiting: Waiting | None = None) -> Latency:
    """``count`` lookups of client order ids that do not exist, one after another, in ms (each request bounded
    by the exchange client's own timeout, ``exchange.timeout_ms``)."""
    waiting = waiting or Waiting()
    exchange = open_exchange(settings)
    samples: list[float] = []
    try:
        waiting.on("the exchange's time (sync_time)")
        await exchange.sync_time()
        for n in range(count + 1):
            waiting.on(f"order lookup {n + 1} of {count + 1} (qt-bench{n:011d})")
            started = time.perf_counter()
            found = await exchange.query_order(symbol, f"qt-bench{n:011d}")
            if found is not None:
                raise RuntimeError(f"qt-bench{n:011d} exists on the exchange")
            if n:  # the first one also opened the HTTP connection
                samples.append((time.perf_counter() - started) * 1000)
    finally:
        await within(exchange.close(), HTTP_TIMEOUT_S, "closing the exchange client")
    return Latency.of(samples)
