"""Drive the real chain and read its own measurements back from the streams.

Every latency here is a service's own measurement from the plan's creation (Apply's clock when it made the
plan), written in the audit and result streams: ``decided`` = both permits verified and consumed by Apply,
``result`` = result published with the order filled (executed plans only), ``governor`` / ``p33`` = that
issuer's permit written. Open-loop runs add ``end_to_end``: proposal created by the bench -> result published,
every outcome (includes queueing before planning, so a system falling behind cannot hide it).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis

from quantum_trader import ops
from quantum_trader.bench.bounds import Waiting
from quantum_trader.bench.measure import CpuWindow, Latency, entries_since, r3, send_at_rate, stream_end
from quantum_trader.bus import keys
from quantum_trader.bus.streams import STREAM_MAXLEN
from quantum_trader.domain.models import Proposal, to_fields
from quantum_trader.domain.planning import PlanningContext, make_plan, plan_id_for

# Sequential runs alternate three of the default markets; open-loop runs spread over the synthetic ones (one
# close per symbol is in flight at a time by design, so a rate needs symbols enough for its plans in flight).
SEQUENTIAL_SYMBOLS = {"XRPUSDT": ("1000000.0", "1.0"), "SOLUSDT": ("100000", "1"), "BNBUSDT": ("10000.00", "0.01")}
LOAD_POSITION = "10000000"  # per synthetic market: room for every close a run sends (1 each)
DRAIN_S = 30.0  # after sending: how long the chain gets to finish what it was given


@dataclass
class ChainTimes:
    """Per plan, milliseconds from the plan's creation."""

    decided: list[float] = field(default_factory=list)
    result: list[float] = field(default_factory=list)
    governor: list[float] = field(default_factory=list)
    p33: list[float] = field(default_factory=list)


@dataclass
class RateStep:
    """One open-loop step at a fixed offered rate."""

    target_per_s: float
    sent: int = 0
    offered_per_s: float | None = None  # what the sender achieved
    completed_per_s: float | None = None  # answers (results, or plans with both decisions) per second
    completed: int = 0
    executed: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    decided: Latency = field(default_factory=Latency)
    result: Latency = field(default_factory=Latency)
    end_to_end: Latency = field(default_factory=Latency)
    cpu_pct: dict[str, float] = field(default_factory=dict)
    outcome: str = ""  # "" when measured; "timed out" / "failed" for a step that did not finish (nothing above)


async def chain_times(
    audit: list[tuple[str, dict[str, Any]]], results: list[tuple[str, dict[str, Any]]], plan_ids: list[str]
) -> ChainTimes:
    """The services' own measurements of ``plan_ids``, from audit and result entries."""
    wanted = set(plan_ids)
    by_kind: dict[str, dict[str, float]] = {"decided": {}, "result": {}, "governor": {}, "p33": {}}
    for _, f in audit:
        plan_id = f.get("plan_id")
        if plan_id not in wanted:
            continue
        if f.get("decision") == "consumed" and f.get("subject") == "governor":
            by_kind["decided"][plan_id] = float(f["latency_ms"])
        elif f.get("decision") in ("allow", "deny") and f.get("issuer") in ("governor", "p33"):
            by_kind[f["issuer"]][plan_id] = float(f["latency_ms"])
    for _, f in results:  # orders filled only: a SKIP or a deny is answered sooner and would flatter the figure
        if f.get("plan_id") in wanted and f.get("executed") in ("1", "true"):
            by_kind["result"][f["plan_id"]] = float(f["latency_ms"])
    return ChainTimes(**{kind: [got[p] for p in plan_ids if p in got] for kind, got in by_kind.items()})


# --- sequential -------------------------------------------------------------------------------------------------


async def run_sequential(
    redis: aioredis.Redis,
    plans: int,
    warmup: int,
    sent: Callable[[], None] | None = None,
    waiting: Waiting | None = None,
) -> tuple[ChainTimes, Latency]:
    """One close at a time through the whole chain; the services' times and the client's (proposal sent ->
    result seen by the bench), warm-up excluded. ``sent`` is called once the last result was seen, before the
    streams are read back (so a CPU window can end there)."""
    waiting = waiting or Waiting()
    symbols = sorted(SEQUENTIAL_SYMBOLS)
    waiting.on("the ends of the audit and result streams")
    audit_from, result_from = await stream_end(redis, keys.AUDIT_STREAM), await stream_end(redis, keys.RESULT_STREAM)
    plan_ids, client_ms = [], []
    for n in range(plans + warmup):
        symbol = symbols[n % len(symbols)]
        qty = Decimal(SEQUENTIAL_SYMBOLS[symbol][1])
        started = time.perf_counter()
        waiting.on(f"Apply to take proposal {n + 1} of {plans + warmup} ({symbol})")
        sub = await ops.propose(redis, symbol, "PARTIAL_CLOSE", qty=qty, source="bench")
        waiting.on(f"the result of plan {sub.plan_id} ({n + 1} of {plans + warmup}, {symbol})")
        result = await ops.wait_result(redis, sub.plan_id, 30, sub.result_cursor)
        client_ms.append((time.perf_counter() - started) * 1000)
        if result is None or not result.executed:
            raise RuntimeError(f"bench plan {sub.plan_id} did not execute: {result}")
        plan_ids.append(sub.plan_id)
    if sent is not None:
        sent()
    waiting.on("reading the audit and result streams back")
    audit = await entries_since(redis, keys.AUDIT_STREAM, audit_from)
    results = await entries_since(redis, keys.RESULT_STREAM, result_from)
    return await chain_times(audit, results, plan_ids[warmup:]), Latency.of(client_ms[warmup:])


# --- open loop through the whole chain ------------------------------------------------------------------------


async def _wait_for(redis: aioredis.Redis, stream: str, after: str, done: Any, deadline: float) -> None:
    """Follow ``stream`` from ``after`` until ``done(fields)`` says enough or the deadline passes."""
    cursor = after
    while time.monotonic() < deadline:
        reply = await redis.xread({stream: cursor}, count=5000, block=200)
        for _, entries in reply or ():
            for entry_id, fields in entries:
                cursor = entry_id
                if done(fields):
                    return


async def run_open_loop(
    redis: aioredis.Redis,
    rate: float,
    seconds: float,
    symbols: list[str],
    cpu: CpuWindow,
    waiting: Waiting | None = None,
) -> RateStep:
    """Proposals at ``rate`` for ``seconds`` over ``symbols``, without waiting for answers; then every result."""
    waiting = waiting or Waiting()
    total = max(1, round(rate * seconds))
    warmup = total // 10
    audit_from, result_from = await stream_end(redis, keys.AUDIT_STREAM), await stream_end(redis, keys.RESULT_STREAM)
    plan_ids: list[str] = []
    created: dict[str, float] = {}
    tag = os.urandom(4).hex()

    async def send(batch: range) -> None:
        ids, sent_at = [f"bench-{tag}-{n}" for n in batch], time.time()
        async with redis.pipeline(transaction=False) as pipe:
            for n, proposal_id in zip(batch, ids, strict=True):
                pipe.xadd(
                    keys.PROPOSAL_STREAM,
                    {
                        "proposal_id": proposal_id,
                        "symbol": symbols[n % len(symbols)],
                        "action": "PARTIAL_CLOSE",
                        "qty": "1",
                        "source": "bench",
                        "created_at": repr(sent_at),
                    },
                    maxlen=STREAM_MAXLEN,
                    approximate=True,
                )
            await pipe.execute()
        for proposal_id in ids:
            plan_id = plan_id_for(proposal_id)
            plan_ids.append(plan_id)
            created[plan_id] = sent_at

    cpu.start()
    waiting.on(lambda: f"sending proposals ({len(plan_ids):,} of {total:,} sent)")
    took = await send_at_rate(total, rate, send)
    pending = set(plan_ids)
    waiting.on(lambda: f"results from Apply: {total - len(pending):,} of {total:,} plans answered")

    def answered(fields: dict[str, Any]) -> bool:
        pending.discard(fields.get("plan_id", ""))
        return not pending

    await _wait_for(redis, keys.RESULT_STREAM, result_from, answered, time.monotonic() + DRAIN_S)
    step = RateStep(target_per_s=rate, sent=total, offered_per_s=r3(total / took))
    step.cpu_pct, _ = cpu.stop()
    waiting.on(f"reading the result and audit streams back ({total - len(pending):,} of {total:,} answered)")
    results = await entries_since(redis, keys.RESULT_STREAM, result_from)
    audit = await entries_since(redis, keys.AUDIT_STREAM, audit_from)
    mine = [(i, f) for i, f in results if f.get("plan_id") in created]
    outcomes = Counter(_outcome(f) for _, f in mine)
    step.completed, step.executed, step.outcomes = len(mine), outcomes["executed"], dict(outcomes)
    if mine:
        first = min(created.values())
        last = max(float(f["at"]) for _, f in mine)
        step.completed_per_s = r3(len(mine) / max(last - first, 1e-3))
    counted = plan_ids[warmup:]
    times = await chain_times(audit, results, counted)
    step.decided, step.result = Latency.of(times.decided), Latency.of(times.result)
    wanted = set(counted)
    step.end_to_end = Latency.of(
        (float(f["at"]) - created[f["plan_id"]]) * 1000 for _, f in mine if f["plan_id"] in wanted
    )
    return step


def _outcome(result: dict[str, Any]) -> str:
    if result.get("executed") in ("1", "true"):
        return "executed"
    why = result.get("reason") or result.get("missing")
    return f"{result.get('error', '?')}: {why}" if why else str(result.get("error", "?"))


# --- the decisions ceiling: plans straight onto the plan stream, both issuers deciding ----------------------------


async def run_decisions(
    redis: aioredis.Redis,
    rate: float,
    seconds: float,
    symbols: list[str],
    cpu: CpuWindow,
    waiting: Waiting | None = None,
) -> RateStep:
    """Plans published at ``rate`` (built beforehand, each stamped with the moment it is due) for both issuers
    to decide; no Apply, no orders. ``decided`` = plan created -> the later of the two permits written."""
    waiting = waiting or Waiting()
    total = max(1, round(rate * seconds))
    warmup = total // 10
    waiting.on(f"building {total:,} plans")
    lead_s = 0.5 + total / 20_000  # time to build the plans before the first is due
    start_wall = time.time() + lead_s
    ctx = PlanningContext(frozenset(symbols), Decimal(LOAD_POSITION))
    plans = []
    for n in range(total):
        proposal = Proposal(
            proposal_id=f"d{n}", symbol=symbols[n % len(symbols)], action="PARTIAL_CLOSE", qty=Decimal(1)
        )
        plans.append(to_fields(make_plan(proposal, ctx, os.urandom(8).hex(), start_wall + n / rate)))
    plan_ids = [p["plan_id"] for p in plans]
    audit_from = await stream_end(redis, keys.AUDIT_STREAM)
    await asyncio.sleep(max(0.0, start_wall - time.time()))

    async def send(batch: range) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for n in batch:
                pipe.xadd(keys.PLAN_STREAM, plans[n], maxlen=STREAM_MAXLEN, approximate=True)
            await pipe.execute()

    cpu.start()
    sent = 0

    async def send_counted(batch: range) -> None:
        nonlocal sent
        await send(batch)
        sent = batch.stop

    waiting.on(lambda: f"publishing plans ({sent:,} of {total:,} published)")
    took = await send_at_rate(total, rate, send_counted)
    wanted = set(plan_ids)
    decisions: dict[str, int] = Counter()

    def decided_by() -> str:
        both = sum(1 for n in decisions.values() if n >= 2)
        return f"the issuers' decisions: {both:,} of {total:,} plans decided by both, {len(decisions) - both:,} by one"

    waiting.on(decided_by)

    def all_decided(fields: dict[str, Any]) -> bool:
        if fields.get("plan_id") in wanted and fields.get("decision") in ("allow", "deny"):
            decisions[fields["plan_id"]] += 1
        return len(decisions) == total and min(decisions.values()) >= 2

    await _wait_for(redis, keys.AUDIT_STREAM, audit_from, all_decided, time.monotonic() + DRAIN_S)
    step = RateStep(target_per_s=rate, sent=total, offered_per_s=r3(total / took))
    step.cpu_pct, _ = cpu.stop()
    waiting.on(f"reading the audit stream back ({decided_by()})")
    audit = await entries_since(redis, keys.AUDIT_STREAM, audit_from)
    both: dict[str, list[float]] = {}
    last_at = 0.0
    outcomes: Counter[str] = Counter()
    for _, f in audit:
        if f.get("plan_id") in wanted and f.get("decision") in ("allow", "deny"):
            both.setdefault(f["plan_id"], []).append(float(f["latency_ms"]))
            last_at = max(last_at, float(f["at"]))
            outcomes[f"{f['issuer']} {f['decision']}: {f['reason']}"] += 1
    complete = {p: max(v) for p, v in both.items() if len(v) >= 2}
    step.completed, step.outcomes = len(complete), dict(outcomes)
    if complete:
        step.completed_per_s = r3(len(complete) / max(last_at - start_wall, 1e-3))
    step.decided = Latency.of(complete[p] for p in plan_ids[warmup:] if p in complete)
    return step
