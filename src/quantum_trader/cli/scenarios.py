"""The seed's test cases and more, run against a live chain: ``qt demo`` (private system, table) and
``qt proof`` (running or private system, exit code, JSON).

Every case arranges what it needs through the simulator's admin API and the operator actions (positions,
Governor mode, kill switch), proposes through the real proposal stream, and judges the published result,
the audit trail and the simulator's order book. Nothing is stubbed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import connect, resolve_redis_url
from quantum_trader.domain import oracle, reasons
from quantum_trader.domain.models import Result
from quantum_trader.settings import Settings

# Positions `qt up` and the demo open on a fresh simulator (signed: negative is short).
DEMO_POSITIONS: dict[str, str] = {
    "BTCUSDT": "0.010",
    "ETHUSDT": "-0.500",
    "SOLUSDT": "40",
    "BNBUSDT": "3.00",
    "XRPUSDT": "1000.0",
}

# The private demo system polls snapshots every second (default 5 s) so the cases that change a position
# behind the chain's back do not wait; everything else runs with the defaults (1200 ms permit window).
DEMO_ENV = {"QT_BRAIN__SNAPSHOT_INTERVAL_S": "1"}
SETTLE_TIMEOUT_S = 20.0


@dataclass
class CaseRow:
    name: str
    title: str
    symbol: str
    expected: str
    plan_id: str = ""
    decision: str = "—"
    governor: str = "—"
    p33: str = "—"
    outcome: str = "—"
    decided_ms: float | None = None
    result_ms: float | None = None
    ok: bool = False
    detail: str = ""


@dataclass
class Ctx:
    redis: aioredis.Redis
    settings: Settings
    admin: Any  # system.SimAdmin
    wait_s: float
    rows: list[CaseRow] = field(default_factory=list)


Case = Callable[[Ctx], Awaitable[None]]


# --- helpers ----------------------------------------------------------------------------------------------


async def settle_position(ctx: Ctx, symbol: str, amt: str) -> None:
    """Put ``amt`` on the exchange and have P3.3 reconcile to it, so the case starts from agreement."""
    ctx.admin.set_position(symbol, amt)
    asked = time.time()
    await ops.request_reconcile(ctx.redis, "proof")
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        ledger = await ctx.redis.hgetall(keys.ledger(symbol))
        snap = await ctx.redis.hgetall(keys.snapshot(symbol))
        if (
            ledger
            and snap
            and not await ctx.redis.exists(keys.RECONCILE_REQUEST)
            and Decimal(ledger["last_known_amt"]) == Decimal(amt)
            and Decimal(snap["position_amt"]) == Decimal(amt)
            and float(snap["ts"]) >= asked
        ):
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{symbol}: P3.3 did not reconcile to {amt} within {SETTLE_TIMEOUT_S:.0f} s")


async def wait_cooldowns(ctx: Ctx, symbol: str) -> None:
    """A running system may have just traded this symbol: wait out both issuers' cooldowns (bounded)."""
    gov = ctx.settings.governor.cooldown_s
    brain = ctx.settings.brain.cooldown_s
    last = await ctx.redis.zrevrange(keys.governor_symbol_grants(symbol), 0, 0, withscores=True)
    ledger = await ctx.redis.hgetall(keys.ledger(symbol))
    until = max(
        (float(last[0][1]) + gov) if last else 0.0,
        (float(ledger.get("last_exec_at") or 0) + brain) if ledger else 0.0,
    )
    pause = min(until - time.time(), 40.0)
    if pause > 0:
        await asyncio.sleep(pause + 0.1)


async def propose_and_wait(ctx: Ctx, row: CaseRow, action: str, **kwargs: Any) -> Result | None:
    sub = await ops.propose(ctx.redis, row.symbol, action, source="proof", **kwargs)
    row.plan_id = sub.plan_id
    result = await ops.wait_result(ctx.redis, sub.plan_id, ctx.wait_s, sub.result_cursor)
    await describe(ctx, row, result)
    return result


async def describe(ctx: Ctx, row: CaseRow, result: Result | None) -> None:
    plan = await ctx.redis.hgetall(keys.plan_record(row.plan_id))
    if plan:
        row.decision = plan["decision"] if plan["decision"] == "EXECUTE" else f"SKIP {plan['reason']}"
    decided: list[float] = []
    for entry in await ops.plan_audit(ctx.redis, row.plan_id):
        if entry.decision not in ("allow", "deny"):
            continue
        text = f"{'✓' if entry.decision == 'allow' else '✗'} {entry.reason}"
        if entry.issuer == "p33":
            row.p33 = text
        else:
            row.governor = text if entry.issuer == "governor" else f"{text} (operator)"
        decided.append(entry.latency_ms)
    if len(decided) == 2:
        row.decided_ms = max(decided)
    if result is None:
        row.outcome = "no result"
        return
    row.result_ms = result.latency_ms
    if result.executed:
        row.outcome = f"executed {result.filled_qty}"
    elif result.error == reasons.PERMIT_TIMEOUT:
        row.outcome = f"permit_timeout (missing: {result.missing})"
    elif result.error == reasons.PERMIT_DENIED:
        row.outcome = f"permit_denied by {result.denied_by}"
    elif result.error == reasons.SKIPPED:
        row.outcome = f"skipped ({result.reason})"
    else:
        row.outcome = f"{result.error} {result.reason}".strip()


def orders_for(ctx: Ctx, symbol: str, plan_id: str) -> list[dict[str, Any]]:
    return [o for o in ctx.admin.orders(symbol) if oracle.plan_of_order(str(o.get("clientOrderId"))) == plan_id]


def judge(row: CaseRow, ok: bool, detail: str = "") -> None:
    row.ok = ok
    row.detail = detail


# --- the cases --------------------------------------------------------------------------------------------


async def close_with_both_permits(ctx: Ctx) -> None:
    row = CaseRow("close_both_permits", "close, both permits", "BTCUSDT", "executed, one order, position 0")
    ctx.rows.append(row)
    await wait_cooldowns(ctx, row.symbol)
    await settle_position(ctx, row.symbol, "0.010")
    result = await propose_and_wait(ctx, row, "FULL_CLOSE")
    position = ctx.admin.position(row.symbol)
    orders = orders_for(ctx, row.symbol, row.plan_id)
    judge(
        row,
        bool(result and result.executed and result.filled_qty == Decimal("0.010"))
        and position == 0
        and len(orders) == 1,
        f"position after: {position}, orders: {len(orders)}",
    )


async def kill_switch_deny(ctx: Ctx) -> None:
    row = CaseRow("kill_switch", "kill switch on", "SOLUSDT", "permit_denied by Governor (kill_switch_on)")
    ctx.rows.append(row)
    await settle_position(ctx, row.symbol, "40")
    await ops.set_kill_switch(ctx.redis, True, "proof")
    try:
        result = await propose_and_wait(ctx, row, "FULL_CLOSE")
    finally:
        await ops.set_kill_switch(ctx.redis, False, "proof")
    judge(
        row,
        bool(
            result
            and result.error == reasons.PERMIT_DENIED
            and "Governor" in result.denied_by
            and reasons.KILL_SWITCH_ON in result.reason
        )
        and not orders_for(ctx, row.symbol, row.plan_id),
    )


async def partial_rounded(ctx: Ctx) -> None:
    row = CaseRow("partial_rounded", "partial 33 % → step", "SOLUSDT", "executed 13 (13.2 rounded down to step 1)")
    ctx.rows.append(row)
    await wait_cooldowns(ctx, row.symbol)
    await settle_position(ctx, row.symbol, "40")
    result = await propose_and_wait(ctx, row, "PARTIAL_CLOSE", close_pct=Decimal(33))
    judge(row, bool(result and result.executed and result.filled_qty == 13))


async def partial_clamped(ctx: Ctx) -> None:
    row = CaseRow("partial_clamped", "partial 99 > position", "BNBUSDT", "executed 3 (clamped to the position)")
    ctx.rows.append(row)
    await wait_cooldowns(ctx, row.symbol)
    await settle_position(ctx, row.symbol, "3.00")
    result = await propose_and_wait(ctx, row, "PARTIAL_CLOSE", qty=Decimal(99))
    judge(row, bool(result and result.executed and result.filled_qty == 3))


async def manual_timeout_and_duplicate(ctx: Ctx) -> None:
    timeout = CaseRow("manual_timeout", "Governor manual, no operator", "ETHUSDT", "permit_timeout (missing: Governor)")
    duplicate = CaseRow("duplicate", "same proposal again", "ETHUSDT", "SKIP duplicate_in_flight")
    ctx.rows += [timeout, duplicate]
    await wait_cooldowns(ctx, timeout.symbol)
    await settle_position(ctx, timeout.symbol, "-0.500")
    await ops.set_governor_mode(ctx.redis, "manual", "proof")
    try:
        first = await ops.propose(ctx.redis, timeout.symbol, "FULL_CLOSE", source="proof")
        await _wait_plan(ctx, first.plan_id)  # the first plan holds the symbol before the second arrives
        second = await ops.propose(ctx.redis, duplicate.symbol, "FULL_CLOSE", source="proof")
        timeout.plan_id, duplicate.plan_id = first.plan_id, second.plan_id
        results = await asyncio.gather(
            ops.wait_result(ctx.redis, first.plan_id, ctx.wait_s, first.result_cursor),
            ops.wait_result(ctx.redis, second.plan_id, ctx.wait_s, second.result_cursor),
        )
    finally:
        await ops.set_governor_mode(ctx.redis, ctx.settings.governor.mode, "proof")
    await describe(ctx, timeout, results[0])
    await describe(ctx, duplicate, results[1])
    r1, r2 = results
    wait_ms = ctx.settings.apply.permit_wait_ms
    judge(
        timeout,
        bool(r1 and r1.error == reasons.PERMIT_TIMEOUT and r1.missing == "Governor" and r1.latency_ms >= wait_ms),
        f"after {r1.latency_ms if r1 else '?'} ms",
    )
    judge(duplicate, bool(r2 and r2.error == reasons.SKIPPED and r2.reason == reasons.DUPLICATE_IN_FLIGHT))


async def operator_grant(ctx: Ctx) -> None:
    row = CaseRow("operator_grant", "manual + qt permit grant", "ETHUSDT", "executed 0.5 on the operator's grant")
    ctx.rows.append(row)
    await wait_cooldowns(ctx, row.symbol)
    await settle_position(ctx, row.symbol, "-0.500")
    await ops.set_governor_mode(ctx.redis, "manual", "proof")
    try:
        sub = await ops.propose(ctx.redis, row.symbol, "FULL_CLOSE", source="proof")
        row.plan_id = sub.plan_id
        await _wait_plan(ctx, sub.plan_id)
        await ops.decide_manually(ctx.redis, ctx.settings, sub.plan_id, grant=True, reason="", operator="proof")
        result = await ops.wait_result(ctx.redis, sub.plan_id, ctx.wait_s, sub.result_cursor)
    finally:
        await ops.set_governor_mode(ctx.redis, ctx.settings.governor.mode, "proof")
    await describe(ctx, row, result)
    judge(row, bool(result and result.executed and result.filled_qty == Decimal("0.5")))


async def p33_qty_mismatch(ctx: Ctx) -> None:
    row = CaseRow("p33_qty_mismatch", "position cut outside", "XRPUSDT", "permit_denied by P3.3 (qty_mismatch)")
    ctx.rows.append(row)
    await settle_position(ctx, row.symbol, "1000.0")
    changed = time.time()
    ctx.admin.set_position(row.symbol, "600.0")  # a manual trade on the exchange the chain never saw
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:  # P3.3 must see it in a snapshot first
        snap = await ctx.redis.hgetall(keys.snapshot(row.symbol))
        if snap and float(snap["ts"]) > changed and Decimal(snap["position_amt"]) == 600:
            break
        await asyncio.sleep(0.05)
    result = await propose_and_wait(ctx, row, "FULL_CLOSE")
    judge(
        row,
        bool(
            result
            and result.error == reasons.PERMIT_DENIED
            and result.denied_by == "P3.3"
            and result.reason == reasons.QTY_MISMATCH
        ),
    )
    await settle_position(ctx, row.symbol, "600.0")  # leave the system reconciled


async def not_allowed(ctx: Ctx) -> None:
    row = CaseRow("not_allowed", "symbol not allowed", "DOGEUSDT", "SKIP symbol_not_allowed")
    ctx.rows.append(row)
    result = await propose_and_wait(ctx, row, "FULL_CLOSE")
    judge(row, bool(result and result.error == reasons.SKIPPED and result.reason == reasons.SYMBOL_NOT_ALLOWED))


async def malformed(ctx: Ctx) -> None:
    row = CaseRow("malformed", "malformed proposal", "BTCUSDT", "dead-lettered with the reason; nothing else lost")
    ctx.rows.append(row)
    bad = {"proposal_id": "bad-1", "symbol": "BTCUSDT", "action": "OPEN_LONG", "created_at": repr(time.time())}
    entry_id = await ctx.redis.xadd(keys.PROPOSAL_STREAM, bad)
    deadline = time.monotonic() + ctx.wait_s
    while time.monotonic() < deadline:
        for _, letter in await ctx.redis.xrevrange(keys.PROPOSAL_DLQ, count=50):
            if letter.get("source_id") == entry_id:
                row.outcome = "dead-lettered: " + letter["error"].split(": ", 1)[-1][:40]
                judge(row, "action" in letter["error"])
                return
        await asyncio.sleep(0.05)
    row.outcome = "not dead-lettered"


async def _wait_plan(ctx: Ctx, plan_id: str) -> None:
    deadline = time.monotonic() + ctx.wait_s
    while time.monotonic() < deadline:
        if await ctx.redis.exists(keys.plan_record(plan_id)):
            return
        await asyncio.sleep(0.01)
    raise RuntimeError(f"plan {plan_id} was not published within {ctx.wait_s:.0f} s (is Apply running?)")


CASES: tuple[Case, ...] = (
    close_with_both_permits,
    kill_switch_deny,
    partial_rounded,
    partial_clamped,
    manual_timeout_and_duplicate,
    operator_grant,
    p33_qty_mismatch,
    not_allowed,
    malformed,
)


async def run_cases(redis_url: str, settings: Settings, admin: Any) -> list[CaseRow]:
    redis = await connect(redis_url)
    ctx = Ctx(redis, settings, admin, wait_s=settings.apply.permit_wait_ms / 1000 + 10)
    try:
        for case in CASES:
            before = len(ctx.rows)
            try:
                await case(ctx)
            except Exception as exc:  # a broken case is a failed case, and the others still run
                if len(ctx.rows) == before:
                    ctx.rows.append(CaseRow(case.__name__, case.__name__, "", ""))
                ctx.rows[-1].ok = False
                ctx.rows[-1].detail = f"error: {exc}"
    finally:
        await ops.set_kill_switch(redis, False, "proof")
        await redis.aclose()
    return ctx.rows


# --- entry points -----------------------------------------------------------------------------------------


def _run_private(settings: Settings) -> tuple[list[CaseRow], float, Path]:
    from quantum_trader.cli.render import console
    from quantum_trader.system import LocalSystem

    started = time.monotonic()
    system = LocalSystem.private("qt-demo-", env=DEMO_ENV)  # the cases expect the defaults (plus DEMO_ENV)
    state_dir = system.settings.state_dir
    with system:
        console.print(f"starting a private system in {state_dir} (store, simulator, brain, governor, apply)…")
        system.start_infra()
        admin = system.admin()
        for symbol, amt in DEMO_POSITIONS.items():
            admin.set_position(symbol, amt)
        system.start_services()
        console.print(f"up in {time.monotonic() - started:.1f} s; running the cases…")
        rows = asyncio.run(run_cases(system.urls["operator"], system.settings, admin))
        admin.close()
    return rows, time.monotonic() - started, state_dir


def run_demo(settings: Settings) -> int:
    from quantum_trader.cli.render import console, print_cases

    rows, took, state_dir = _run_private(settings)
    print_cases("qt demo: the permit chain, case by case", rows)
    failed = [r for r in rows if not r.ok]
    for row in failed:
        console.print(f"[red]✗ {row.name}[/red]: expected {row.expected}; got {row.outcome} {row.detail}")
    console.print(
        f"{len(rows) - len(failed)}/{len(rows)} cases as expected in {took:.1f} s (logs: {state_dir / 'logs'})"
    )
    return 0 if not failed else 1


def run_proof(settings: Settings, *, json_out: bool, private: bool) -> int:
    from quantum_trader.runtime import read_runtime

    runtime = None if private else read_runtime(settings)
    if runtime is None:
        rows, _, _ = _run_private(settings) if not json_out else _quiet(lambda: _run_private(settings))
        target = "private"
    else:
        from quantum_trader.secrets import key_dir, read_secret_file
        from quantum_trader.system import SimAdmin

        admin = SimAdmin(runtime.sim_url, read_secret_file(key_dir(settings) / "sim-admin.token"))
        rows = asyncio.run(run_cases(resolve_redis_url(settings), settings, admin))
        admin.close()
        target = f"running (pid {runtime.pid})"
    failed = [r for r in rows if not r.ok]
    if json_out:
        print(
            json.dumps(
                {
                    "system": target,
                    "passed": len(rows) - len(failed),
                    "failed": len(failed),
                    "cases": [asdict(r) for r in rows],
                },
                indent=2,
            )
        )
    else:
        from quantum_trader.cli.render import print_cases

        print_cases(f"qt proof against the {target} system", rows)
    return 0 if not failed else 1


def _quiet(action: Callable[[], Any]) -> Any:
    from quantum_trader.cli.render import console

    console.quiet = True
    try:
        return action()
    finally:
        console.quiet = False
