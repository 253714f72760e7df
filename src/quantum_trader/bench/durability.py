"""What the store's durability setting costs: the sequential chain under ``appendfsync everysec`` and ``always``.

The store runs with the append-only file on (as in production). The step sets ``appendfsync`` on the running
store (CONFIG SET, as the admin user), reads it back (CONFIG GET) before and after each part, and runs the same
measurement as the sequential step for each: everysec, always, everysec again, so that drift of the machine
shows as a difference between the two everysec parts. Per part: the services' own latencies, CPU per plan of
each process over the part, and the store's ``INFO persistence`` AOF counters over the part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bench.bounds import Waiting, within
from quantum_trader.bench.chain import run_sequential
from quantum_trader.bench.measure import CpuWindow, Latency

SETTINGS = ("everysec", "always", "everysec")  # interleaved


@dataclass
class DurabilityPart:
    """One part of the step: the sequential chain under one ``appendfsync`` setting."""

    appendfsync: str  # as CONFIG GET read it back, before and after the part (the step fails if they differ)
    plans: int = 0  # measured (after warm-up)
    warmup: int = 0
    decided: Latency = field(default_factory=Latency)
    result: Latency = field(default_factory=Latency)
    window_s: float = 0.0  # the CPU window: first plan sent -> last result seen (warm-up included)
    cpu_ms_per_plan: dict[str, float] = field(default_factory=dict)  # per process: CPU in the window / plans sent
    # INFO persistence over the part: fsyncs the store postponed because the previous one was still running
    # (everysec only), bytes appended to the file (None when a rewrite ran in the part), rewrites started
    aof_delayed_fsync: int = 0
    aof_written_bytes: int | None = None
    aof_rewrites: int = 0
    aof_last_write_status: str = ""


async def appendfsync(redis: aioredis.Redis) -> str:
    return str((await redis.config_get("appendfsync")).get("appendfsync", ""))


async def _set(redis: aioredis.Redis, setting: str) -> None:
    await redis.config_set("appendfsync", setting)
    if (got := await appendfsync(redis)) != setting:
        raise RuntimeError(f"CONFIG SET appendfsync {setting}: the store reads back {got!r}")


async def run_durability(
    redis: aioredis.Redis,
    plans: int,
    warmup: int,
    cpu: CpuWindow,
    settings: tuple[str, ...] = SETTINGS,
    waiting: Waiting | None = None,
) -> list[DurabilityPart]:
    """``plans`` sequential plans after ``warmup`` under each of ``settings`` in turn; ``redis`` may run
    CONFIG. The store's setting from before the step is restored afterwards (also when the step is cut short)."""
    waiting = waiting or Waiting()
    waiting.on("the store's INFO persistence and CONFIG GET appendfsync")
    info = await redis.info("persistence")
    if int(info.get("aof_enabled", 0)) != 1:
        raise RuntimeError("the store runs without the append-only file: appendfsync would change nothing")
    original = await appendfsync(redis)
    parts: list[DurabilityPart] = []
    used: list[tuple[dict[str, float], float]] = []  # per part: the CPU window, ended when the last result is seen
    try:
        for n, setting in enumerate(settings):
            part_waiting = waiting.sub(f"part {n + 1} of {len(settings)}, appendfsync {setting}")
            part_waiting.on("CONFIG SET appendfsync and its read-back")
            await _set(redis, setting)
            before = await redis.info("persistence")
            cpu.start()
            times, _ = await run_sequential(
                redis, plans, warmup, sent=lambda: used.append(cpu.stop_seconds()), waiting=part_waiting
            )
            after = await redis.info("persistence")
            if (got := await appendfsync(redis)) != setting:
                raise RuntimeError(f"appendfsync changed to {got!r} during the {setting} part")
            parts.append(part(setting, plans, warmup, times.decided, times.result, *used[-1], before, after))
    finally:
        await within(redis.config_set("appendfsync", original), 10.0, f"restoring appendfsync {original}")
    return parts


def part(
    setting: str,
    plans: int,
    warmup: int,
    decided: list[float],
    result: list[float],
    cpu_s: dict[str, float],
    wall_s: float,
    before: dict[str, Any],
    after: dict[str, Any],
) -> DurabilityPart:
    """One part's figures from its raw measurements (pure: the report test feeds it)."""
    sent = plans + warmup

    def delta(name: str) -> int:
        return int(after.get(name, 0)) - int(before.get(name, 0))

    rewrites = delta("aof_rewrites") + int(after.get("aof_rewrite_in_progress", 0))
    return DurabilityPart(
        appendfsync=setting,
        plans=plans,
        warmup=warmup,
        decided=Latency.of(decided),
        result=Latency.of(result),
        window_s=round(wall_s, 3),
        cpu_ms_per_plan={name: round(1000 * s / sent, 3) for name, s in cpu_s.items()},
        aof_delayed_fsync=delta("aof_delayed_fsync"),
        aof_written_bytes=None if rewrites else delta("aof_current_size"),
        aof_rewrites=rewrites,
        aof_last_write_status=str(after.get("aof_last_write_status", "")),
    )
