"""``qt chaos``: run a private chain (separate processes, AOF store, ACL users) while killing its parts.

Plans flow at a steady rate; meanwhile a random service is killed with SIGKILL and restarted every few seconds,
and once the store itself is killed and restarted on its append-only file. Afterwards the exchange's and the
store's own records are checked against the three promises and a table is printed. Exit status 1 when any
promise was broken or the chain took more than 2 s to recover from the store restart.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.settings import Settings

RECOVERY_LIMIT_S = 2.0
SYMBOLS = {
    "BTCUSDT": ("100.000", "0.001"),
    "ETHUSDT": ("1000.000", "0.010"),
    "SOLUSDT": ("100000", "1"),
    "BNBUSDT": ("10000.00", "0.01"),
    "XRPUSDT": ("1000000.0", "1.0"),
}
# 1,000 plans at 20/s are 1,200 orders a minute, Binance's default ORDERS limit, and ~11 request weight each:
# the simulator states a (VIP-like) raised account limit in exchangeInfo and the services adopt it from there,
# so the run measures recovery from faults, not queueing behind the default limits.
CHAOS_SIM_ARGS = ["--weight-limit", "100000", "--orders-10s-limit", "5000", "--orders-1m-limit", "20000"]
CHAOS_ENV = {
    # closes come faster than the default cooldowns and rate limits allow: the point is volume under faults
    "QT_GOVERNOR__COOLDOWN_S": "0",
    "QT_GOVERNOR__MAX_PER_SYMBOL": "1000000",
    "QT_GOVERNOR__MAX_TOTAL": "1000000",
    "QT_BRAIN__COOLDOWN_S": "0",
    "QT_BRAIN__SNAPSHOT_INTERVAL_S": "1",
    "QT_CLAIM_IDLE_S": "5",
    "QT_EXCHANGE__LATE_EXECUTION_HORIZON_MS": "3000",
}


@dataclass
class ChaosReport:
    plans: int = 0
    results: int = 0
    executions: int = 0
    duplicate_orders: int = 0
    lost_plans: int = 0
    duplicate_results: int = 0
    executions_without_two_permits: int = 0
    service_kills: int = 0
    store_restarts: int = 0
    max_recovery_s: float = 0.0
    seconds: float = 0.0
    # why the plans that did not execute did not: "error: reason" -> count (permit timeouts during kills, ...)
    not_executed: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        broken = (self.duplicate_orders, self.lost_plans, self.duplicate_results, self.executions_without_two_permits)
        return not any(broken) and self.max_recovery_s <= RECOVERY_LIMIT_S


def _patient_client(url: str) -> aioredis.Redis:
    """The observer's own connection: it rides out the store restart (retries for ~20 s) instead of failing."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=40),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, OSError],
    )


class Chaos:
    def __init__(self, system: Any, plans: int, rate: float, seed: int) -> None:
        self.system = system
        self.plans = plans
        self.rate = rate
        self.rng = random.Random(seed)
        self.submitted: list[str] = []
        self.report = ChaosReport()
        self.store_down = asyncio.Event()
        self.finished = asyncio.Event()

    async def run(self) -> ChaosReport:
        started = time.monotonic()
        rds = _patient_client(self.system.urls["operator"])
        try:
            chaos = asyncio.create_task(self._kill_things())
            await self._drive(rds)
            self.finished.set()
            await chaos
            await self._settle(rds)
            await self._judge(rds)
        finally:
            await rds.aclose()
        self.report.seconds = round(time.monotonic() - started, 1)
        return self.report

    async def _drive(self, rds: aioredis.Redis) -> None:
        """Propose at ``rate`` per second; a proposal the store did not take is retried (it was never sent)."""
        symbols = sorted(SYMBOLS)
        interval = 1 / self.rate
        for n in range(self.plans):
            symbol = symbols[n % len(symbols)]
            while True:
                try:
                    sub = await ops.propose(
                        rds, symbol, "PARTIAL_CLOSE", qty=Decimal(SYMBOLS[symbol][1]), source="chaos"
                    )
                    self.submitted.append(sub.plan_id)
                    break
                except (RedisError, OSError):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(interval)

    async def _kill_things(self) -> None:
        """A random service every 1-3 s; the store once, when half of the plans have been proposed."""
        restarted_store = False
        next_kill = time.monotonic() + self.rng.uniform(1.0, 3.0)
        while not (self.finished.is_set() and restarted_store):
            await asyncio.sleep(0.05)
            if not restarted_store and len(self.submitted) >= self.plans // 2:
                await self._restart_store()
                restarted_store = True
            elif not self.finished.is_set() and time.monotonic() >= next_kill:
                service = self.rng.choice(("apply", "governor", "brain"))
                await asyncio.to_thread(self.system.stop_service, service, kill=True)
                await asyncio.sleep(self.rng.uniform(0.1, 1.0))
                await asyncio.to_thread(self.system.start_service, service)
                self.report.service_kills += 1
                next_kill = time.monotonic() + self.rng.uniform(1.0, 3.0)

    async def _restart_store(self) -> None:
        port = int(self.system.redis_url.rsplit(":", 1)[1])
        self.system.store.kill()  # SIGKILL: no shutdown save, only what the append-only file holds
        await asyncio.sleep(self.rng.uniform(0.3, 1.0))
        await asyncio.to_thread(self.system.start_store, port)  # same data, same port, same users
        back = time.monotonic()
        self.report.store_restarts += 1
        # recovery: from the store's return until a brand-new proposal gets its result
        rds = _patient_client(self.system.urls["operator"])
        try:
            probe = await ops.propose(rds, "XRPUSDT", "PARTIAL_CLOSE", qty=Decimal("1.0"), source="chaos-probe")
            self.submitted.append(probe.plan_id)
            await ops.wait_result(rds, probe.plan_id, 60, probe.result_cursor)
        finally:
            await rds.aclose()
        self.report.max_recovery_s = max(self.report.max_recovery_s, round(time.monotonic() - back, 3))

    async def _settle(self, rds: aioredis.Redis, timeout: float = 120.0) -> None:
        """Wait (bounded) until every submitted plan has its result."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = {f["plan_id"] for _, f in await rds.xrange(keys.RESULT_STREAM)}
            if all(p in done for p in self.submitted):
                return
            await asyncio.sleep(0.5)

    async def _judge(self, rds: aioredis.Redis) -> None:
        r = self.report
        results = [f for _, f in await rds.xrange(keys.RESULT_STREAM)]
        per_plan = Counter(f["plan_id"] for f in results)
        r.plans = len(self.submitted)
        r.results = sum(1 for p in self.submitted if per_plan[p] >= 1)
        r.lost_plans = sum(1 for p in self.submitted if per_plan[p] == 0)
        r.duplicate_results = sum(1 for p in self.submitted if per_plan[p] > 1)
        executed = {f["plan_id"] for f in results if f.get("executed") == "true"}
        why = Counter(
            f"{f.get('error')}: {f.get('reason') or 'missing ' + f.get('missing', '?')}"
            for f in results
            if f.get("executed") != "true"
        )
        r.not_executed = dict(why.most_common())
        r.executions = len(executed)
        admin = self.system.admin()
        placed = admin.orders()
        admin.close()
        orders = Counter(o["clientOrderId"] for o in placed)
        r.duplicate_orders = sum(1 for coid, n in orders.items() if n > 1)
        audit = [f for _, f in await rds.xrange(keys.AUDIT_STREAM)]
        allowed: dict[str, set[str]] = {}
        consumed: Counter[str] = Counter()
        for f in audit:
            if f.get("decision") == "allow":
                allowed.setdefault(f["plan_id"], set()).add("governor" if f["issuer"] == "operator" else f["issuer"])
            elif f.get("decision") == "consumed":
                consumed[f["plan_id"]] += 1
        r.executions_without_two_permits = sum(
            1 for p in executed if allowed.get(p, set()) != {"governor", "p33"} or consumed[p] != 2
        )
        # a fill on the exchange that no executed result accounts for is an execution without its story
        filled = {o["clientOrderId"] for o in placed if Decimal(str(o.get("executedQty") or 0)) > 0}
        r.executions_without_two_permits += sum(1 for coid in filled if coid[3:] not in executed)


def run_chaos(settings: Settings, plans: int, rate: float, seed: int) -> tuple[ChaosReport, Path]:
    from quantum_trader.system import LocalSystem

    system = LocalSystem.private("qt-chaos-", env=CHAOS_ENV, persist_store=True, sim_args=CHAOS_SIM_ARGS)
    with system:
        system.start_infra()
        system.open_positions({symbol: amount for symbol, (amount, _) in SYMBOLS.items()})
        system.start_services()
        report = asyncio.run(Chaos(system, plans, rate, seed).run())
    return report, system.settings.state_dir


def print_report(report: ChaosReport, state_dir: Path, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps({**asdict(report), "ok": report.ok, "logs": str(state_dir / "logs")}, indent=2))
        return
    from rich.table import Table

    from quantum_trader.cli.render import console

    table = Table(title="qt chaos", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("must be", justify="right")
    rows = [
        ("plans", report.plans, ""),
        ("results", report.results, "= plans"),
        ("executions", report.executions, ""),
        ("duplicate orders", report.duplicate_orders, "0"),
        ("lost plans", report.lost_plans, "0"),
        ("duplicate results", report.duplicate_results, "0"),
        ("executions without two permits", report.executions_without_two_permits, "0"),
        ("service kills (SIGKILL)", report.service_kills, ""),
        ("store restarts", report.store_restarts, ""),
        ("max recovery after store restart (s)", report.max_recovery_s, f"<= {RECOVERY_LIMIT_S}"),
        ("run time (s)", report.seconds, ""),
    ]
    rows += [(f"  not executed: {why}", n, "") for why, n in report.not_executed.items()]
    for name, value, bound in rows:
        table.add_row(name, str(value), bound)
    console.print(table)
    verdict = "[green]all promises kept[/green]" if report.ok else "[red]PROMISE BROKEN[/red]"
    console.print(f"{verdict} (logs: {state_dir / 'logs'})")
