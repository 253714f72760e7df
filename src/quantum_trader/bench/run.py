"""Start a private system in production shape and run the scenarios in order."""

from __future__ import annotations

import asyncio
import os
import platform
from dataclasses import dataclass

import redis.asyncio as aioredis

from quantum_trader.bench import chain, durability, seed, truth
from quantum_trader.bench.measure import CpuWindow, Latency, rss_mb
from quantum_trader.bench.report import STEPS, BenchReport, SeedStep, highest_sustained
from quantum_trader.exchange.sim.engine import DEFAULT_SYMBOLS, bench_symbols
from quantum_trader.settings import Settings

BENCH_ENV = {
    "QT_GOVERNOR__COOLDOWN_S": "0",
    "QT_GOVERNOR__MAX_PER_SYMBOL": "100000000",
    "QT_GOVERNOR__MAX_TOTAL": "100000000",
    "QT_BRAIN__COOLDOWN_S": "0",
    "QT_LOG_LEVEL": "warning",  # a log line per plan would be part of what is measured
}
# Binance's default limits (2,400 weight and 1,200 orders a minute) would cap a load run at 20 orders/s: the
# simulator states raised ones in exchangeInfo, and the clients adopt them from there.
BENCH_SIM_ARGS = ["--weight-limit", "10000000", "--orders-10s-limit", "1000000", "--orders-1m-limit", "10000000"]


@dataclass(frozen=True)
class Scenario:
    """What one run does; ``qt bench`` and ``qt bench --quick`` differ only here."""

    plans: int = 400  # sequential, after a 10 % warm-up
    seed_plans: int = 40
    idle_s: float = 20.0
    rates: tuple[float, ...] = (200.0, 500.0, 1000.0)  # open loop through the chain (and the seed design)
    rate_s: float = 5.0
    decision_rates: tuple[float, ...] = (1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0, 8000.0)
    decision_s: float = 3.0
    load_symbols: int = 60
    event_loop: str = "asyncio"
    durability_plans: int | None = None  # per appendfsync part, after a 10 % warm-up; None: as ``plans``
    lookups: int = 200  # order lookups timed (what a plan the store cannot vouch for pays once)
    steps: tuple[str, ...] = STEPS  # which steps run (in STEPS order whatever the order here)


QUICK = Scenario(plans=60, seed_plans=10, idle_s=5.0, rates=(200.0,), rate_s=2.0, decision_rates=(1000.0,),
                 decision_s=1.0, load_symbols=20, durability_plans=20, lookups=20)  # fmt: skip


def run_bench(scenario: Scenario) -> BenchReport:
    from quantum_trader.system import SERVICES, LocalSystem

    load = [spec.symbol for spec in bench_symbols(scenario.load_symbols)]
    env = {
        **BENCH_ENV,
        "QT_EVENT_LOOP": scenario.event_loop,
        "QT_SYMBOLS": ",".join([spec.symbol for spec in DEFAULT_SYMBOLS] + load),
    }
    sim_args = [*BENCH_SIM_ARGS, "--bench-symbols", str(scenario.load_symbols)]
    # the append-only file on (appendfsync everysec), as in production; the durability step varies appendfsync
    system = LocalSystem.private("qt-bench-", env=env, sim_args=sim_args, persist_store=True)
    warmup = max(1, scenario.plans // 10)
    steps = [step for step in STEPS if step in scenario.steps]
    report = BenchReport(plans=scenario.plans, warmup=warmup, event_loop=scenario.event_loop, steps=steps)
    report.machine = {"cpus": os.cpu_count() or 0, "python": platform.python_version(), "system": platform.platform()}
    with system:
        system.start_infra()
        positions = {symbol: amount for symbol, (amount, _) in chain.SEQUENTIAL_SYMBOLS.items()}
        system.open_positions({**positions, **dict.fromkeys(load, chain.LOAD_POSITION)})
        system.start_services()
        pids = {name: system.processes[name].pid for name in (*SERVICES, "sim")}
        if system.store is not None and system.store.pid is not None:
            pids["store"] = system.store.pid  # the two machines' other tenants, for where the CPU goes
        metrics_url = f"http://127.0.0.1:{system.ports.apply}/metrics"
        asyncio.run(_measure(system.urls["admin"], scenario, load, pids, report, metrics_url, system.settings))
    if report.chain_decided.p50_ms and report.seed_decided.p50_ms:
        report.p50_ratio_seed_over_chain = round(report.seed_decided.p50_ms / report.chain_decided.p50_ms, 1)
    report.sustained_plans_per_s = highest_sustained(report.open_loop, "result")
    report.sustained_decisions_per_s = highest_sustained(report.decisions, "decided")
    return report


async def _measure(
    url: str,
    scenario: Scenario,
    load: list[str],
    pids: dict[str, int],
    report: BenchReport,
    metrics_url: str,
    settings: Settings,
) -> None:
    redis = aioredis.Redis.from_url(url, decode_responses=True)
    window = CpuWindow(pids)
    steps = report.steps
    try:
        if "idle" in steps:
            window.start()
            await asyncio.sleep(scenario.idle_s)
            report.cpu_idle_pct, report.idle_window_s = window.stop()

        if "sequential" in steps:
            lookups_before = truth.lookups_so_far(metrics_url)
            window.start()
            times, client = await chain.run_sequential(redis, scenario.plans, report.warmup)
            report.cpu_load_pct, report.load_window_s = window.stop()
            lookups = truth.lookups_so_far(metrics_url) - lookups_before
            report.truth_lookups_per_plan = round(lookups / (scenario.plans + report.warmup), 4)
            report.truth_lookup = await truth.lookup_latency(settings, "XRPUSDT", scenario.lookups)
            report.rss_mb = {name: rss_mb(pid) for name, pid in pids.items()}
            report.chain_decided, report.chain_result = Latency.of(times.decided), Latency.of(times.result)
            report.chain_governor, report.chain_p33 = Latency.of(times.governor), Latency.of(times.p33)
            report.chain_client = client
            report.seed_decided = Latency.of((await seed.run_seed_sequential(url, scenario.seed_plans + 1))[1:])

        if "durability" in steps:  # before the load steps: the file is still small, no rewrite forks mid-step
            plans = scenario.durability_plans or scenario.plans
            report.durability = await durability.run_durability(redis, plans, max(1, plans // 10), window)

        for rate in scenario.rates if "open-loop" in steps else ():
            report.open_loop.append(await chain.run_open_loop(redis, rate, scenario.rate_s, load, window))
            latencies, offered, unanswered = await seed.run_seed_open_loop(url, rate, min(scenario.rate_s, 3.0))
            report.seed_open_loop.append(SeedStep(rate, round(offered, 3), Latency.of(latencies), unanswered))
            await asyncio.sleep(1.0)  # P3.3's in-flight marks and Apply's holds from the step are gone

        for rate in scenario.decision_rates if "decisions" in steps else ():
            step = await chain.run_decisions(redis, rate, scenario.decision_s, load, window)
            report.decisions.append(step)
            if highest_sustained([step], "decided") is None:
                break  # the ceiling is found: higher rates only queue more
            await asyncio.sleep(1.5)  # P3.3's in-flight marks (1 s) from this step expire
    finally:
        await redis.aclose()
