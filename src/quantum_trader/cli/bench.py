"""``qt bench``: the chain's latency against a reproduction of the seed's polling design, in the same run.

A private system runs as in production (embedded store, simulator, brain, Governor and Apply each in its own
process). Measured, warm-up excluded:

- **chain, sequential**: one close at a time. ``decided`` = plan published -> both permits verified and consumed
  (Apply's own measurement, in its audit line); ``result`` = plan published -> result with the order filled on
  the simulator (Apply's measurement); ``client`` = proposal sent -> result seen by the bench (everything,
  including planning and the bench's own reads).
- **seed baseline**: the seed's design on the same store: two issuers on a 1000 ms blocking XREADGROUP that SET
  their permit key, and an "Apply" that publishes a plan and polls both keys with GET every 100 ms, up to 12
  times. ``decided`` = publish -> both keys seen. It runs in the bench process (asyncio tasks), under its own
  key prefix.
- **cost**: CPU per service process while idle and during the chain run (from /proc), and resident memory.

Percentiles are exact (nearest rank over all samples). Not yet measured here: open-loop rates, the sustained
throughput and the decisions-per-second ceiling (docs/performance.md says what is next).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from quantum_trader import __version__, ops
from quantum_trader.bus import keys
from quantum_trader.domain.story import percentile

SYMBOLS = {"XRPUSDT": ("1000000.0", "1.0"), "SOLUSDT": ("100000", "1"), "BNBUSDT": ("10000.00", "0.01")}
BENCH_ENV = {
    "QT_GOVERNOR__COOLDOWN_S": "0",
    "QT_GOVERNOR__MAX_PER_SYMBOL": "100000000",
    "QT_GOVERNOR__MAX_TOTAL": "100000000",
    "QT_BRAIN__COOLDOWN_S": "0",
    "QT_LOG_LEVEL": "warning",  # a log line per plan would be part of what is measured
}
BENCH_SIM_ARGS = ["--weight-limit", "10000000", "--orders-10s-limit", "1000000", "--orders-1m-limit", "10000000"]
SEED_PREFIX = "bench:seed"
SEED_POLL_S = 0.1
SEED_POLLS = 12
SEED_BLOCK_MS = 1000


@dataclass
class Latency:
    samples: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None

    @classmethod
    def of(cls, values_ms: list[float]) -> Latency:
        if not values_ms:
            return cls()
        return cls(len(values_ms), _r(percentile(values_ms, 50)), _r(percentile(values_ms, 99)), _r(max(values_ms)))


@dataclass
class BenchReport:
    version: str = __version__
    machine: dict[str, Any] = field(default_factory=dict)
    plans: int = 0
    warmup: int = 0
    chain_decided: Latency = field(default_factory=Latency)
    chain_result: Latency = field(default_factory=Latency)
    chain_client: Latency = field(default_factory=Latency)
    seed_decided: Latency = field(default_factory=Latency)
    p50_ratio_seed_over_chain: float | None = None
    cpu_idle_pct: dict[str, float] = field(default_factory=dict)
    cpu_load_pct: dict[str, float] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)
    idle_window_s: float = 0.0
    load_window_s: float = 0.0
    not_measured: list[str] = field(
        default_factory=lambda: ["open-loop 200/500/1000 plans/s", "sustained throughput", "decisions/s ceiling"]
    )


def _r(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


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
        wall = time.monotonic() - self._t0
        used = {name: cpu_seconds(pid) - self._cpu0[name] for name, pid in self.pids.items()}
        return {name: round(100 * cpu / wall, 2) for name, cpu in used.items()}, round(wall, 1)


# --- the chain --------------------------------------------------------------------------------------------------


async def run_chain(redis: aioredis.Redis, plans: int) -> tuple[list[str], list[float]]:
    """Sequential closes; the plan ids and the client-side latency of each (proposal sent -> result seen)."""
    symbols = sorted(SYMBOLS)
    plan_ids, client_ms = [], []
    for n in range(plans):
        symbol = symbols[n % len(symbols)]
        started = time.perf_counter()
        sub = await ops.propose(redis, symbol, "PARTIAL_CLOSE", qty=Decimal(SYMBOLS[symbol][1]), source="bench")
        result = await ops.wait_result(redis, sub.plan_id, 30, sub.result_cursor)
        client_ms.append((time.perf_counter() - started) * 1000)
        if result is None or not result.executed:
            raise RuntimeError(f"bench plan {sub.plan_id} did not execute: {result}")
        plan_ids.append(sub.plan_id)
    return plan_ids, client_ms


async def chain_latencies(redis: aioredis.Redis, plan_ids: list[str]) -> tuple[list[float], list[float]]:
    """Apply's own measurements of the given plans: permits consumed, and result, both from plan publication."""
    wanted = set(plan_ids)
    decided: dict[str, float] = {}
    result: dict[str, float] = {}
    for _, f in await redis.xrange(keys.AUDIT_STREAM):
        if f.get("plan_id") in wanted and f.get("decision") == "consumed" and f.get("subject") == "governor":
            decided[f["plan_id"]] = float(f["latency_ms"])
    for _, f in await redis.xrange(keys.RESULT_STREAM):
        if f.get("plan_id") in wanted:
            result[f["plan_id"]] = float(f["latency_ms"])
    return [decided[p] for p in plan_ids if p in decided], [result[p] for p in plan_ids if p in result]


# --- the seed's design, reproduced ------------------------------------------------------------------------------


async def _seed_issuer(redis: aioredis.Redis, name: str, stream: str, stop: asyncio.Event) -> None:
    group = f"{name}-group"
    await redis.xgroup_create(stream, group, id="0", mkstream=True)
    while not stop.is_set():
        reply = await redis.xreadgroup(group, name, {stream: ">"}, count=1, block=SEED_BLOCK_MS)
        for _, entries in reply or ():
            for entry_id, fields in entries:
                await redis.set(f"{SEED_PREFIX}:permit:{name}:{fields['plan_id']}", "1", ex=60)
                await redis.xack(stream, group, entry_id)


async def run_seed(redis: aioredis.Redis, plans: int) -> list[float]:
    """The seed's Apply against its two issuers: publish, then GET both keys every 100 ms (12 tries)."""
    stream = f"{SEED_PREFIX}:plan"
    await redis.delete(stream)
    stop = asyncio.Event()
    issuers = [asyncio.create_task(_seed_issuer(redis, n, stream, stop)) for n in ("governor", "p33")]
    await asyncio.sleep(0.2)  # both groups exist and their first blocking reads are waiting
    decided: list[float] = []
    try:
        for n in range(plans):
            plan_id = f"seed{n:06d}"
            started = time.perf_counter()
            await redis.xadd(stream, {"plan_id": plan_id})
            for _ in range(SEED_POLLS):
                await asyncio.sleep(SEED_POLL_S)
                both = await redis.mget(
                    f"{SEED_PREFIX}:permit:governor:{plan_id}", f"{SEED_PREFIX}:permit:p33:{plan_id}"
                )
                if all(both):
                    decided.append((time.perf_counter() - started) * 1000)
                    break
    finally:
        stop.set()
        await asyncio.gather(*issuers, return_exceptions=True)
        async for key in redis.scan_iter(match=f"{SEED_PREFIX}:*", count=1000):
            await redis.delete(key)
    return decided


# --- the run ---------------------------------------------------------------------------------------------------


def run_bench(plans: int, seed_plans: int, idle_s: float) -> BenchReport:
    from quantum_trader.system import SERVICES, LocalSystem

    system = LocalSystem.private("qt-bench-", env=BENCH_ENV, sim_args=BENCH_SIM_ARGS)
    warmup = max(1, plans // 10)
    report = BenchReport(plans=plans, warmup=warmup)
    report.machine = {"cpus": os.cpu_count() or 0, "python": platform.python_version(), "system": platform.platform()}
    with system:
        system.start_infra()
        system.open_positions({symbol: amount for symbol, (amount, _) in SYMBOLS.items()})
        system.start_services()
        pids = {name: system.processes[name].pid for name in SERVICES}

        async def measure() -> None:
            rds = aioredis.Redis.from_url(system.urls["admin"], decode_responses=True)
            try:
                window = CpuWindow(pids)
                window.start()
                await asyncio.sleep(idle_s)
                report.cpu_idle_pct, report.idle_window_s = window.stop()
                window.start()
                plan_ids, client_ms = await run_chain(rds, plans + warmup)
                report.cpu_load_pct, report.load_window_s = window.stop()
                report.rss_mb = {name: rss_mb(pid) for name, pid in pids.items()}
                decided, result = await chain_latencies(rds, plan_ids[warmup:])
                report.chain_decided = Latency.of(decided)
                report.chain_result = Latency.of(result)
                report.chain_client = Latency.of(client_ms[warmup:])
                report.seed_decided = Latency.of((await run_seed(rds, seed_plans + 1))[1:])
            finally:
                await rds.aclose()

        asyncio.run(measure())
    if report.chain_decided.p50_ms and report.seed_decided.p50_ms:
        report.p50_ratio_seed_over_chain = round(report.seed_decided.p50_ms / report.chain_decided.p50_ms, 1)
    return report


def rows(r: BenchReport) -> list[tuple[str, str, str, str, str]]:
    def lat(name: str, what: Latency) -> tuple[str, str, str, str, str]:
        return (name, str(what.samples), _ms(what.p50_ms), _ms(what.p99_ms), _ms(what.max_ms))

    return [
        lat("chain: plan -> both permits consumed (Apply)", r.chain_decided),
        lat("chain: plan -> result, order filled (Apply)", r.chain_result),
        lat("chain: proposal sent -> result seen (client)", r.chain_client),
        lat("seed design: plan -> both permits seen (GET poll)", r.seed_decided),
    ]


def _ms(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def markdown(r: BenchReport) -> str:
    lines = [
        f"qt bench {r.version} on {r.machine.get('cpus')} CPUs, Python {r.machine.get('python')}; "
        f"{r.plans} sequential plans after {r.warmup} warm-up",
        "",
        "| latency (ms) | samples | p50 | p99 | max |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in rows(r)]
    ratio = r.p50_ratio_seed_over_chain
    lines += ["", f"p50 ratio, seed design / chain (both permits known): **{ratio}x**", ""]
    lines += ["| process | CPU idle % | CPU under load % | RSS MB |", "|---|---|---|---|"]
    for name in r.rss_mb:
        lines.append(f"| {name} | {r.cpu_idle_pct.get(name)} | {r.cpu_load_pct.get(name)} | {r.rss_mb[name]} |")
    lines += ["", f"idle window {r.idle_window_s} s, load window {r.load_window_s} s (one core = 100 %)."]
    lines += [f"Not measured yet: {', '.join(r.not_measured)}."]
    return "\n".join(lines) + "\n"


def print_bench(r: BenchReport, out: Path | None) -> None:
    from rich.table import Table

    from quantum_trader.cli.render import console

    table = Table(title="qt bench: latency (ms)", title_justify="left")
    for name in ("measure", "samples", "p50", "p99", "max"):
        table.add_column(name, justify="left" if name == "measure" else "right")
    for row in rows(r):
        table.add_row(*row)
    console.print(table)
    console.print(f"p50 ratio, seed design / chain: [bold]{r.p50_ratio_seed_over_chain}x[/bold]")
    cost = Table(title="cost per process", title_justify="left")
    for name in ("process", "CPU idle %", "CPU load %", "RSS MB"):
        cost.add_column(name, justify="left" if name == "process" else "right")
    for name in r.rss_mb:
        cost.add_row(name, str(r.cpu_idle_pct.get(name)), str(r.cpu_load_pct.get(name)), str(r.rss_mb[name]))
    console.print(cost)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(asdict(r), indent=2) + "\n")
        (out / "bench.md").write_text(markdown(r))
        console.print(f"written: {out / 'bench.json'}, {out / 'bench.md'}")
