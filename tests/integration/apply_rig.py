"""Apply as the runner builds it, on a real store, with a scripted exchange (tests/scripted.py) and a clock that
runs in real time but can be moved: the rig the tests of Apply's parts drive one proposal, one plan or one
intent through, and read back what each step wrote.

The audit reader runs (it wakes the waiting plans, as in production); the group loop and the intent sweep do
not: each test calls the step it is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from forgery import governor_permit, p33_permit
from prometheus_client import CollectorRegistry

from conftest import make_settings, wait_key
from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.bus.scripts import Scripts
from quantum_trader.bus.streams import STREAM_MAXLEN, ensure_topology
from quantum_trader.domain.models import AuditEntry, Plan, Proposal, Result, from_fields, to_fields
from quantum_trader.domain.planning import PlanningContext, client_order_id, make_plan, plan_id_for, request_of
from quantum_trader.exchange.base import OrderReport
from quantum_trader.services.apply import ApplyService
from quantum_trader.tasks import cancel_and_wait
from scripted import ScriptedExchange

SYMBOL = "BTCUSDT"
NO_EXCHANGE = "http://127.0.0.1:9"  # the settings name a simulator; the scripted exchange answers instead


class MovableClock:
    """Real time plus offsets a test moves (a proposal that waited, a window that passed)."""

    def __init__(self) -> None:
        self.wall_shift = 0.0
        self.mono_shift = 0.0

    def wall(self) -> float:
        return time.time() + self.wall_shift

    def mono(self) -> float:
        return time.monotonic() + self.mono_shift

    @property
    def mono_s(self) -> float:  # what ScriptedExchange moves (a lookup scripted to outlast the resolve bound)
        return self.mono()

    @mono_s.setter
    def mono_s(self, value: float) -> None:
        self.mono_shift += value - self.mono()


_PROPOSALS: dict[str, str] = {}  # plan id -> proposal id, of every plan the tests make through plan_of


def plan_of(proposal_id: str) -> str:
    """The plan id of ``proposal_id`` (remembered: ``coid`` finds the client order id of the plan again)."""
    plan_id = plan_id_for(proposal_id)
    _PROPOSALS[plan_id] = proposal_id
    return plan_id


def proposal_of(plan_id: str) -> str:
    return _PROPOSALS[plan_id]


def coid(plan_id: str) -> str:
    """The client order id of a plan made through ``plan_of``: "qt-" + its proposal id."""
    return client_order_id(_PROPOSALS[plan_id])


@dataclass
class Rig:
    rds: aioredis.Redis  # the test's own client (no store watch)
    apply: ApplyService
    exchange: ScriptedExchange
    clock: MovableClock
    registry: CollectorRegistry
    proposals: int = 0  # proposals made with a new id so far

    @property
    def handler(self) -> Any:
        return self.apply.handler

    @property
    def epoch(self) -> Any:
        return self.apply.watch.epoch

    async def propose(
        self,
        symbol: str = SYMBOL,
        action: str = "FULL_CLOSE",
        proposal_id: str = "",
        entry_id: str = "*",
        **extra: str,
    ) -> tuple[str, dict[str, str], str]:
        """A proposal on the stream, read by Apply's group (so pending until acknowledged): entry id, fields,
        plan id. An explicit ``entry_id`` older than the store's epoch makes a proposal the store cannot vouch
        for. Without ``proposal_id``, a new one (p1, p2, ... per rig): a new intent, a new plan."""
        self.proposals += 1
        proposal_id = proposal_id or f"p{self.proposals}"
        fields = {"proposal_id": proposal_id, "symbol": symbol, "action": action, **extra}
        entry = await self.rds.xadd(keys.PROPOSAL_STREAM, fields, id=entry_id)  # type: ignore[arg-type]
        await self.rds.xreadgroup(keys.APPLY_GROUP, "apply-rig", {keys.PROPOSAL_STREAM: ">"})
        return entry, fields, plan_of(proposal_id)

    async def plan(self, plan_id: str) -> Plan:
        await wait_key(self.rds, keys.plan_record(plan_id))
        return from_fields(Plan, await self.rds.hgetall(keys.plan_record(plan_id)))

    async def plan_of(self, entry_id: str) -> Plan:
        """The plan of the proposal entry ``entry_id`` (once it is published)."""
        ((_, fields),) = await self.rds.xrange(keys.PROPOSAL_STREAM, entry_id, entry_id)
        return await self.plan(plan_of(fields["proposal_id"]))

    async def publish_plan(self, entry_id: str, *, age_s: float = 0.0, qty: str = "0.010") -> Plan:
        """The plan another handler (or this one before a restart) published for the proposal ``age_s`` ago."""
        ((_, fields),) = await self.rds.xrange(keys.PROPOSAL_STREAM, entry_id, entry_id)
        proposal = from_fields(Proposal, fields)
        ctx = PlanningContext(frozenset(self.apply.settings.symbols), Decimal(qty), False, None)
        plan = make_plan(proposal, ctx, plan_of(proposal.proposal_id), self.clock.wall() - age_s)
        published = await Scripts(self.rds).publish_plan(
            plan_id=plan.plan_id,
            fields=to_fields(plan),
            proposal_entry_id=entry_id,
            request=request_of(proposal),
            maxlen=STREAM_MAXLEN,
        )
        assert published == "published"
        return plan

    async def consumed(self, plan: Plan, marker: str | None = None, at: float | None = None) -> None:
        """Another handler (or this one before a restart) consumed the plan's permits, and may have sent its
        order: its executed marker (``marker`` as given, or the one Apply writes, stamped ``at``)."""
        if marker is None:
            detail = {
                "client_order_id": client_order_id(plan.proposal_id),
                "qty": "0.010",
                "side": plan.side,
                "at": at or plan.created_at,
            }
            marker = json.dumps(detail)
        await self.rds.set(keys.executed_marker(plan.plan_id), marker)

    async def grant(self, plan: Plan, *, governor: bool = True, p33: bool = True, qty: float | None = None) -> None:
        """Both issuers' allows (or the named ones), signed with their keys, with their audit lines."""
        writes = []
        if governor:
            writes.append((keys.governor_permit(plan.plan_id), governor_permit(plan), "governor", "policy_passed"))
        if p33:
            raw = p33_permit(plan, safe_close_qty=float(plan.qty) if qty is None else qty)
            writes.append((keys.p33_permit(plan.plan_id), raw, "p33", "sanity_checks_passed"))
        for key, raw, issuer, reason in writes:
            await self.write_permit(plan, key, raw, issuer, "allow", reason)

    async def deny(self, plan: Plan, issuer: str, reason: str) -> None:
        if issuer == "governor":
            raw = governor_permit(plan, granted=False, reason=reason)
            await self.write_permit(plan, keys.governor_permit(plan.plan_id), raw, issuer, "deny", reason)
        else:
            raw = p33_permit(plan, allow=False, reason=reason, safe_close_qty=0.0)
            await self.write_permit(plan, keys.p33_permit(plan.plan_id), raw, issuer, "deny", reason)

    async def write_permit(self, plan: Plan, key: str, raw: str, issuer: str, decision: str, reason: str) -> None:
        await self.rds.set(key, raw, ex=60)
        audit = AuditEntry(
            plan_id=plan.plan_id, issuer=issuer, decision=decision, reason=reason, at=time.time(), symbol=plan.symbol
        )
        await self.rds.xadd(keys.AUDIT_STREAM, to_fields(audit))

    async def results(self) -> list[Result]:
        return [from_fields(Result, fields) for _, fields in await self.rds.xrange(keys.RESULT_STREAM)]

    async def pending(self) -> int:
        return int((await self.rds.xpending(keys.PROPOSAL_STREAM, keys.APPLY_GROUP))["pending"])

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def filled(plan_id: str, qty: str = "0.010", side: str = "SELL", status: str = "FILLED") -> OrderReport:
    """The exchange's report of the plan's order, filled (``qty`` "0": ended without a fill)."""
    amount = Decimal(qty)
    return OrderReport("7001", coid(plan_id), status, amount, Decimal(100) if amount else Decimal(0), side, 1234)


@contextlib.asynccontextmanager
async def apply_rig(
    store_url: str, tmp: Path, venue: ScriptedExchange | None = None, *, reader: bool = True, **overrides: Any
) -> AsyncIterator[Rig]:
    """Apply with its audit reader running (``reader``; a test of the whole service runs it with the service),
    and the test's own store client. ``overrides`` as for make_settings (e.g. ``apply={"permit_wait_ms": 300}``)."""
    clock = MovableClock()
    sections = {"apply": {"permit_wait_ms": 800, "metrics_port": 0, "order_resolve_timeout_s": 5}}
    for name, values in overrides.pop("apply", {}).items():
        sections["apply"][name] = values
    settings = make_settings(tmp, store_url, NO_EXCHANGE, **sections, **overrides)
    exchange = venue or ScriptedExchange(clock, [])
    exchange.clock = clock
    exchange.ms = None  # the exchange's clock is the rig's (no skew) until a test scripts a time
    rds = make_client(store_url)
    await ensure_topology(rds)
    watch = StoreWatch(record_epoch=True)
    client = make_client(store_url, watch)
    await client.ping()  # connects: the watch learns the store's epoch
    # The instance began an hour ago (in its record, which every new connection reads): requests from before it
    # have long settled, whenever the test store was started. Tests of a recent change set their own epoch.
    await rds.hset(keys.STORE_EPOCH, "since", repr(time.time() - 3600))
    await client.connection_pool.disconnect()
    await client.ping()
    registry = CollectorRegistry()
    apply = ApplyService(settings, client, exchange, watch=watch, registry=registry, clock=clock)
    # The sweeper does not run here: the store's forgotten orders count as searched (tests of the search and
    # of what waits for it clear this themselves).
    apply.handler.truth.searched.set()
    tasks = [asyncio.create_task(apply.waiter.run())] if reader else []
    if reader:
        await asyncio.wait_for(apply.waiter.ready.wait(), 10)
    try:
        yield Rig(rds, apply, exchange, clock, registry)
    finally:
        await cancel_and_wait(tasks)
        await apply.handler.positions.aclose()
        await client.aclose()
        await rds.aclose()
