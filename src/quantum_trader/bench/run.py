"""Start a private system in production shape and run the scenarios in order.

Every step is bounded (``bench.bounds``): one that does not finish in its bound is cancelled, reported with what
it was waiting for, and the run goes on to the next step. Each step's figures are shown as the step ends, so a
run that is killed still shows what it measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis

from quantum_trader.bench import chain, durability, fencing, limits, push, seed, truth
from quantum_trader.bench.bounds import StepStatus, Waiting, bounded, run_loop, within
from quantum_trader.bench.chain import RateStep
from quantum_trader.bench.measure import CpuWindow, Latency, rss_mb
from quantum_trader.bench.render import show_step
from quantum_trader.bench.report import STEPS, BenchReport, SeedStep, highest_sustained
from quantum_trader.exchange.sim.engine import DEFAULT_SYMBOLS, bench_symbols
from quantum_trader.settings import Settings

T = TypeVar("T")

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
    push_changes: tuple[int, int] = (200, 20)  # outside changes timed with push, and with the poll (up to 5 s each)
    push_idle_s: float = 60.0  # the window the idle REST weight is counted over, per part
    # (proposals/s, seconds) at Binance's real limits: under the order limit, at the 20/s, and over it
    limits: tuple[tuple[float, float], ...] = ((15.0, 120.0), (20.0, 60.0), (30.0, 60.0))
    # the same on the design before the user-data stream (limits.POLL_ONLY_ENV), on a system of its own
    limits_poll: tuple[tuple[float, float], ...] = ((20.0, 60.0),)
    steps: tuple[str, ...] = STEPS  # which steps run (in STEPS order whatever the order here)


QUICK = Scenario(plans=60, seed_plans=10, idle_s=5.0, rates=(200.0,), rate_s=2.0, decision_rates=(1000.0,),
                 decision_s=1.0, load_symbols=20, durability_plans=20, lookups=20, push_changes=(20, 3),
                 push_idle_s=5.0, limits=((15.0, 10.0), (30.0, 10.0)), limits_poll=())  # fmt: skip


# The bounds: what each step should take, plus slack for reading the streams back on a loaded machine. Only a
# step that is stuck reaches its bound; a slow one still finishes (and says so in its figures).
SLACK_S = 30.0
PER_SEQUENTIAL_PLAN_S = 0.1  # ~5 ms each on a quiet machine
PER_LOOKUP_S = 0.1  # ~2 ms each; one is bounded by the exchange client's timeout (5 s)
HA_START_S = 60.0  # the fencing step's HA set and services (about 10 s on a quiet machine)
SERVICE_START_S = 30.0  # Apply's restart between its parts
STORE_TIMEOUT_S = 10.0  # any one store command of the bench's own client (its blocking reads block <= 1 s)

Show = Callable[[str, BenchReport], None]
"""Called as each part of the run ends, with the report so far: "idle", "sequential" (the chain, the lookups and
the seed design's sequential run), "durability", "fencing", "open-loop" (one rate: the last entries of ``open_loop`` and
``seed_open_loop``), "decisions" (one rate: the last entry of ``decisions``) and "status" (a step that did not
finish: the last entry of ``step_status``)."""


def sequential_bound(plans: int) -> float:
    return 2 * SLACK_S + PER_SEQUENTIAL_PLAN_S * plans


def seed_sequential_bound(plans: int) -> float:
    return SLACK_S + plans * (seed.POLLS * seed.POLL_S + 0.2)  # a plan gives up after its 12th poll


def open_loop_bound(seconds: float) -> float:
    return seconds + chain.DRAIN_S + 2 * SLACK_S


def seed_open_loop_bound(seconds: float) -> float:
    return seconds + seed.POLLS * seed.POLL_S + 2 * SLACK_S


def run_bench(scenario: Scenario, show: Show | None = None) -> BenchReport:
    """The whole run; ``show`` (default: ``qt bench``'s printer) gets each step's figures as the step ends."""
    from quantum_trader.system import SERVICES, LocalSystem

    if show is None:
        show = show_step
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
    with system:  # stops every process it started, also when a step fails or the run is interrupted
        system.start_infra()
        positions = {symbol: amount for symbol, (amount, _) in chain.SEQUENTIAL_SYMBOLS.items()}
        system.open_positions({**positions, **dict.fromkeys(load, chain.LOAD_POSITION)})
        system.start_services()
        pids = {name: system.processes[name].pid for name in (*SERVICES, "sim")}
        if system.store is not None and system.store.pid is not None:
            pids["store"] = system.store.pid  # the two machines' other tenants, for where the CPU goes
        metrics_url = f"http://127.0.0.1:{system.ports.apply}/metrics"
        settings = system.settings
        run = _Run(system.urls["admin"], scenario, load, pids, report, metrics_url, settings, show, env, sim_args)
        run.system = system
        run_loop(run.measure())
    report.sustained_plans_per_s = highest_sustained(report.open_loop, "result")
    report.sustained_decisions_per_s = highest_sustained(report.decisions, "decided")
    return report


@dataclass
class _Run:
    url: str
    scenario: Scenario
    load: list[str]
    pids: dict[str, int]
    report: BenchReport
    metrics_url: str
    settings: Settings
    show: Show
    env: dict[str, str]  # the services' settings and the simulator's options: the fencing step's HA system's too
    sim_args: list[str]
    redis: aioredis.Redis = field(init=False)  # the bench's own client, for the run
    system: Any = None  # the run's LocalSystem (the push step restarts P3.3 on it)
    window: CpuWindow = field(init=False)

    async def step(
        self, name: str, bound_s: float, work: Callable[[Waiting], Awaitable[T]]
    ) -> tuple[T | None, StepStatus]:
        """One bounded step; one that did not finish is recorded and shown at once, and the run goes on."""
        result, status = await bounded(name, bound_s, work)
        self.report.step_status.append(status)
        if not status.ok:
            self.show("status", self.report)
        return result, status

    async def measure(self) -> None:
        self.redis = aioredis.Redis.from_url(
            self.url, decode_responses=True, socket_timeout=STORE_TIMEOUT_S, socket_connect_timeout=STORE_TIMEOUT_S
        )
        self.window = CpuWindow(self.pids)
        steps = self.report.steps
        try:
            if "idle" in steps:
                await self.idle()
            if "sequential" in steps:
                await self.sequential()
            if "durability" in steps:  # before the load steps: the file is still small, no rewrite forks mid-step
                await self.durability()
            if "fencing" in steps:
                await self.fencing()
            if "push" in steps:
                await self.push()
            if "limits" in steps:
                await self.limits()
            for rate in self.scenario.rates if "open-loop" in steps else ():
                await self.open_loop(rate)
                await asyncio.sleep(1.0)  # P3.3's in-flight marks and Apply's holds from the step are gone
            for rate in self.scenario.decision_rates if "decisions" in steps else ():
                if not await self.decisions(rate):
                    break  # the ceiling is found (or the step did not finish): higher rates only queue more
                await asyncio.sleep(1.5)  # P3.3's in-flight marks (1 s) from this step expire
        finally:
            with contextlib.suppress(Exception):
                await within(self.redis.aclose(), STORE_TIMEOUT_S, "closing the bench's store client")

    async def idle(self) -> None:
        async def idle(waiting: Waiting) -> tuple[dict[str, float], float]:
            waiting.on(f"the end of the idle window ({self.scenario.idle_s:g} s)")
            self.window.start()
            await asyncio.sleep(self.scenario.idle_s)
            return self.window.stop()

        got, _ = await self.step("idle", self.scenario.idle_s + SLACK_S, idle)
        if got is not None:
            self.report.cpu_idle_pct, self.report.idle_window_s = got
        self.show("idle", self.report)

    async def sequential(self) -> None:
        r, plans = self.report, self.scenario.plans

        async def sequential(waiting: Waiting) -> tuple[chain.ChainTimes, Latency, float]:
            waiting.on("Apply's count of truth lookups (GET /metrics)")
            before = await truth.lookups_so_far(self.metrics_url)
            self.window.start()
            times, client = await chain.run_sequential(self.redis, plans, r.warmup, waiting=waiting)
            r.cpu_load_pct, r.load_window_s = self.window.stop()
            waiting.on("Apply's count of truth lookups (GET /metrics)")
            return times, client, await truth.lookups_so_far(self.metrics_url) - before

        got, _ = await self.step("sequential chain", sequential_bound(plans + r.warmup), sequential)
        if got is not None:
            times, r.chain_client, lookups = got
            r.truth_lookups_per_plan = round(lookups / (plans + r.warmup), 4)
            r.chain_decided, r.chain_result = Latency.of(times.decided), Latency.of(times.result)
            r.chain_governor, r.chain_p33 = Latency.of(times.governor), Latency.of(times.p33)
        r.rss_mb = {name: rss_mb(pid) for name, pid in self.pids.items()}

        lookups = self.scenario.lookups

        def lookup(waiting: Waiting) -> Awaitable[Latency]:
            return truth.lookup_latency(self.settings, "XRPUSDT", lookups, waiting)

        found, _ = await self.step("order lookups", SLACK_S + PER_LOOKUP_S * lookups, lookup)
        r.truth_lookup = found or Latency()

        count = self.scenario.seed_plans + 1  # the first one is a warm-up

        def seed_sequential(waiting: Waiting) -> Awaitable[list[float]]:
            return seed.run_seed_sequential(self.url, count, waiting)

        seen, _ = await self.step("seed sequential", seed_sequential_bound(count), seed_sequential)
        r.seed_decided = Latency.of(seen[1:]) if seen is not None else Latency()
        if r.chain_decided.p50_ms and r.seed_decided.p50_ms:
            r.p50_ratio_seed_over_chain = round(r.seed_decided.p50_ms / r.chain_decided.p50_ms, 1)
        self.show("sequential", r)

    async def durability(self) -> None:
        plans = self.scenario.durability_plans or self.scenario.plans
        warmup = max(1, plans // 10)

        def run(waiting: Waiting) -> Awaitable[list[durability.DurabilityPart]]:
            return durability.run_durability(self.redis, plans, warmup, self.window, waiting=waiting)

        bound = len(durability.SETTINGS) * sequential_bound(plans + warmup)
        parts, _ = await self.step("durability", bound, run)
        self.report.durability = parts or []
        self.show("durability", self.report)

    async def fencing(self) -> None:
        plans = self.scenario.durability_plans or self.scenario.plans
        warmup = max(1, plans // 10)

        def run(waiting: Waiting) -> Awaitable[list[fencing.FencingPart]]:
            return fencing.run_fencing(self.redis, self.window, self.env, self.sim_args, plans, warmup, waiting)

        bound = HA_START_S + (1 + len(fencing.HA_SETTINGS)) * (sequential_bound(plans + warmup) + SERVICE_START_S)
        parts, _ = await self.step("fencing", bound, run)
        self.report.fencing = parts or []
        self.show("fencing", self.report)

    async def push(self) -> None:
        scenario = self.scenario
        brain_metrics = f"http://127.0.0.1:{self.system.ports.brain}/metrics"

        def run(waiting: Waiting) -> Awaitable[list[push.PushPart]]:
            return push.run_push(
                self.redis,
                self.system,
                self.system.sim_url,
                self.system.sim_admin_token(),
                brain_metrics,
                scenario.push_changes,
                scenario.push_idle_s,
                waiting,
            )

        pushed, polled = scenario.push_changes
        per_change = push.CHANGE_BOUND_S / 10
        bound = len(push.PARTS) * (scenario.push_idle_s + 2 * SERVICE_START_S) + (2 * pushed + 10 * polled) * per_change
        bound += push.SETTLE_S + polled * push.POLL_PERIOD_S
        parts, _ = await self.step("push", bound + SLACK_S, run)
        self.report.push = parts or []
        self.pids["brain"] = self.system.processes["brain"].pid  # restarted: the cost table follows the new one
        self.window = CpuWindow(self.pids)
        self.show("push", self.report)

    async def limits(self) -> None:
        modes = ((limits.PUSH, self.scenario.limits), (limits.POLL, self.scenario.limits_poll))

        async def run(waiting: Waiting) -> list[limits.LimitsPart]:
            measured: list[limits.LimitsPart] = []
            for mode, parts in modes:
                if parts:
                    measured += await limits.run_limits(self.env, parts, waiting, mode)
            return measured

        bound = sum(
            HA_START_S + sum(open_loop_bound(seconds) + limits.ORDER_WINDOW_S for _, seconds in parts)
            for _, parts in modes
            if parts
        )
        measured, _ = await self.step("limits", bound + SLACK_S, run)
        self.report.limits = measured or []
        self.show("limits", self.report)

    async def open_loop(self, rate: float) -> None:
        seconds = self.scenario.rate_s

        def through_chain(waiting: Waiting) -> Awaitable[RateStep]:
            return chain.run_open_loop(self.redis, rate, seconds, self.load, self.window, waiting)

        step, status = await self.step(f"open loop {rate:g}/s", open_loop_bound(seconds), through_chain)
        self.report.open_loop.append(step or RateStep(target_per_s=rate, outcome=status.outcome))

        seed_s = min(seconds, 3.0)

        def seed_design(waiting: Waiting) -> Awaitable[seed.SeedRun]:
            return seed.run_seed_open_loop(self.url, rate, seed_s, waiting)

        got, status = await self.step(f"seed open loop {rate:g}/s", seed_open_loop_bound(seed_s), seed_design)
        if got is None:
            self.report.seed_open_loop.append(SeedStep(rate, outcome=status.outcome))
        else:
            decided = Latency.of(got.latencies)
            offered = round(got.offered_per_s, 3)
            self.report.seed_open_loop.append(
                SeedStep(rate, offered, decided, got.unanswered, got.errors, got.first_error)
            )
        self.show("open-loop", self.report)

    async def decisions(self, rate: float) -> bool:
        """One rate of the ramp; False when it was not sustained (or did not finish)."""
        seconds = self.scenario.decision_s

        def decide(waiting: Waiting) -> Awaitable[RateStep]:
            return chain.run_decisions(self.redis, rate, seconds, self.load, self.window, waiting)

        lead = 0.5 + rate * seconds / 20_000  # the plans are built before the first is due
        step, status = await self.step(f"decisions {rate:g}/s", lead + open_loop_bound(seconds), decide)
        self.report.decisions.append(step or RateStep(target_per_s=rate, outcome=status.outcome))
        self.show("decisions", self.report)
        return step is not None and highest_sustained([step], "decided") is not None
