"""One plan being handled, and what the store says about a plan (its markers), read in one round trip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.domain.models import MalformedEntry, Plan, from_fields
from quantum_trader.domain.trust import Epoch


@dataclass
class PlanRun:
    """One plan being handled. ``vouched`` is the store epoch in which the store's records of the plan were
    known complete (its proposal is newer than the epoch, or the exchange was asked); None: not (yet)."""

    plan: Plan
    entry_id: str
    log: Any
    vouched: Epoch | None


@dataclass(frozen=True, slots=True)
class PlanMarkers:
    """What the store holds of a plan: whether it has a result, its published record, its executed marker
    (set when its permits were consumed, with the order's client id, quantity and time) and the proposal
    entry it came from (from the record; "" without one)."""

    has_result: bool
    plan: Plan | None
    executed: str | None
    proposal_entry_id: str


async def read_markers(redis: aioredis.Redis, plan_id: str) -> PlanMarkers:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.exists(keys.result_marker(plan_id))
        pipe.hgetall(keys.plan_record(plan_id))
        pipe.get(keys.executed_marker(plan_id))
        has_result, record, executed = await pipe.execute()
    plan = None
    if record:
        try:
            plan = from_fields(Plan, record)
        except MalformedEntry as exc:
            # only Apply writes plan records: an unreadable one is a store fault, never a reason to act
            raise RuntimeError(f"plan record {plan_id} is unreadable ({exc}); leaving the proposal pending") from None
    return PlanMarkers(bool(has_result), plan, executed, str(record.get("proposal_entry_id", "")) if record else "")
