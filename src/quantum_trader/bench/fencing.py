"""What high availability and its fencing cost: the sequential chain on the single store of the run, then on a
high-availability store started for the step (a primary, two replicas, three Sentinels: bus/embedded_ha.py) with
Apply's ``consume_replicas`` at 0, 1 (the consume acknowledged by a replica before the order is sent: ``WAIT``),
0, 1, so that drift of the machine shows as a difference between parts of the same setting. Apply restarts
between parts with the new setting. Per part: the services' own latencies and the CPU per plan of each process
(``store``: the single store, or the HA set's primary).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from quantum_trader.bench.bounds import Waiting, within
from quantum_trader.bench.chain import SEQUENTIAL_SYMBOLS, run_sequential
from quantum_trader.bench.measure import CpuWindow, Latency
from quantum_trader.bus.connection import make_client

# Apply's consume_replicas on the HA store, interleaved (twice each: one pair of parts differs by more than the fence
# costs on a busy 2-core machine)
HA_SETTINGS = (0, 1, 0, 1)
SETTING = "QT_APPLY__CONSUME_REPLICAS"


@dataclass
class FencingPart:
    """One part: the sequential chain on one store with one ``consume_replicas``."""

    store: str  # "single" or "ha"
    consume_replicas: int
    plans: int = 0  # measured (after warm-up)
    warmup: int = 0
    decided: Latency = field(default_factory=Latency)
    result: Latency = field(default_factory=Latency)
    window_s: float = 0.0
    cpu_ms_per_plan: dict[str, float] = field(default_factory=dict)  # per process: CPU in the window / plans sent
    # WAITs the store ran over the part (INFO commandstats): one per plan sent when fenced, else none; proof that
    # the part measured what it says
    waits: int = 0


async def _part(
    redis: aioredis.Redis,
    store: str,
    replicas: int,
    plans: int,
    warmup: int,
    cpu: CpuWindow,
    waiting: Waiting,
) -> FencingPart:
    used: list[tuple[dict[str, float], float]] = []
    waits_before = await _waits(redis)
    cpu.start()
    times, _ = await run_sequential(redis, plans, warmup, sent=lambda: used.append(cpu.stop_seconds()), waiting=waiting)
    cpu_s, wall_s = used[-1]
    sent = plans + warmup
    waits = await _waits(redis) - waits_before
    if waits != (sent if replicas else 0):
        raise RuntimeError(f"consume_replicas {replicas}: the store ran {waits} WAITs for {sent} plans")
    return FencingPart(
        waits=waits,
        store=store,
        consume_replicas=replicas,
        plans=plans,
        warmup=warmup,
        decided=Latency.of(times.decided),
        result=Latency.of(times.result),
        window_s=round(wall_s, 3),
        cpu_ms_per_plan={name: round(1000 * s / sent, 3) for name, s in cpu_s.items()},
    )


async def _waits(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


async def run_fencing(
    single: aioredis.Redis,
    single_cpu: CpuWindow,
    env: Mapping[str, str],
    sim_args: Sequence[str],
    plans: int,
    warmup: int,
    waiting: Waiting | None = None,
) -> list[FencingPart]:
    """The single-store part on ``single`` (the run's system, ``single_cpu`` its processes), then the HA parts on
    a private HA system started here with ``env`` and ``sim_args`` (stopped before this returns)."""
    from quantum_trader.system import SERVICES, LocalSystem

    waiting = waiting or Waiting()
    parts = [await _part(single, "single", 0, plans, warmup, single_cpu, waiting.sub("the single store"))]
    system = LocalSystem.private(
        "qt-bench-ha-", env={**env, SETTING: str(HA_SETTINGS[0])}, sim_args=sim_args, persist_store=True, ha=True
    )
    redis: aioredis.Redis | None = None
    try:
        waiting.on("the high-availability system to start (three nodes, three Sentinels, the services)")
        await asyncio.to_thread(system.start_infra)
        await asyncio.to_thread(
            system.open_positions, {symbol: amount for symbol, (amount, _) in SEQUENTIAL_SYMBOLS.items()}
        )
        await asyncio.to_thread(system.start_services, together=True)
        redis = make_client(system.urls["admin"])
        for n, replicas in enumerate(HA_SETTINGS):
            part_waiting = waiting.sub(f"HA part {n + 1} of {len(HA_SETTINGS)}, consume_replicas {replicas}")
            if system.env[SETTING] != str(replicas):
                part_waiting.on(f"Apply to restart with consume_replicas {replicas}")
                system.env[SETTING] = str(replicas)
                await asyncio.to_thread(system.stop_service, "apply")
                await asyncio.to_thread(system.start_service, "apply")
            pids = {name: system.processes[name].pid for name in SERVICES}
            primary = system.ha_set.primary_port() if system.ha_set is not None else None
            node = system.ha_set.node(primary) if system.ha_set is not None and primary is not None else None
            if node is not None and node.pid is not None:
                pids["store"] = node.pid
            parts.append(await _part(redis, "ha", replicas, plans, warmup, CpuWindow(pids), part_waiting))
    finally:
        if redis is not None:
            await within(redis.aclose(), 10.0, "closing the bench's client of the HA store")
        await asyncio.to_thread(system.stop)
    return parts
