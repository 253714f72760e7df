"""What the benchmark measures with: exact percentiles, CPU and memory from /proc, an open-loop sender."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.domain.story import percentile

READ_CHUNK = 5000


def r3(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


@dataclass
class Latency:
    """Exact nearest-rank percentiles over every sample (no buckets: a few 10^5 samples sort in milliseconds)."""

    samples: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None

    @classmethod
    def of(cls, values_ms: Iterable[float]) -> Latency:
        values = sorted(values_ms)
        if not values:
            return cls()
        return cls(len(values), r3(percentile(values, 50)), r3(percentile(values, 99)), r3(values[-1]))


# --- process cost, from /proc ---------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class CpuWindow:
    """CPU percent of one core used by each process between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = 0.0
        self._cpu0: dict[str, float] = {}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> tuple[dict[str, float], float]:
        used, wall = self.stop_seconds()
        return {name: round(100 * cpu / wall, 2) for name, cpu in used.items()}, round(wall, 2)

    def stop_seconds(self) -> tuple[dict[str, float], float]:
        """CPU seconds each process used since ``start()`` (unrounded; the clock tick is 10 ms), and the wall
        seconds."""
        wall = time.monotonic() - self._t0
        return {name: cpu_seconds(pid) - self._cpu0[name] for name, pid in self.pids.items()}, wall


# --- open loop ------------------------------------------------------------------------------------------------


async def send_at_rate(total: int, rate: float, send: Callable[[range], Awaitable[None]]) -> float:
    """Call ``send`` with the indexes due so far, item ``i`` being due at ``i / rate`` s after the start, until
    ``total`` items were sent; returns the seconds it took. Open loop: nothing waits for an answer, and a
    sender that falls behind sends everything overdue at once (so queueing shows up in the latencies)."""
    started = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        if due > sent:
            await send(range(sent, due))
            sent = due
        else:
            await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
    return time.perf_counter() - started


async def entries_since(redis: aioredis.Redis, stream: str, after: str) -> list[tuple[str, dict[str, Any]]]:
    """Every entry of ``stream`` after id ``after``, read in chunks."""
    found: list[tuple[str, dict[str, Any]]] = []
    start = f"({after}"
    while True:
        chunk = await redis.xrange(stream, min=start, max="+", count=READ_CHUNK)
        found += chunk
        if len(chunk) < READ_CHUNK:
            return found
        start = f"({chunk[-1][0]}"


async def stream_end(redis: aioredis.Redis, stream: str) -> str:
    last = await redis.xrevrange(stream, count=1)
    return str(last[0][0]) if last else "0-0"
