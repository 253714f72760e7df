"""One plan being handled, and what the store says about a plan (its markers), read in one round trip."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
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


class PlanLocks:
    """One handler per plan at a time in this process: proposals that share an id (a client's retry) are one
    plan, and the second waits for the first to finish before it looks at the plan's markers."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, plan_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(plan_id, (asyncio.Lock(), 0))
        self._locks[plan_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[plan_id]
            if users == 1:
                del self._locks[plan_id]
            else:
                self._locks[plan_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


@dataclass(frozen=True, slots=True)
class PlanMarkers:
    """What the store holds of a plan: whether it has a result, its published record, its executed marker
    (set when its permits were consumed, with the order's client id, quantity and time), the proposal entry
    it came from and the request it answers (``planning.request_of``; both from the record, "" without one)."""

    has_result: bool
    plan: Plan | None
    executed: str | None
    proposal_entry_id: str
    request: str = ""

    def same_request(self, request: str) -> bool:
        """A proposal asking ``request`` is the one this plan answers (or no record says otherwise)."""
        return not self.request or self.request == request


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
    record = record or {}
    return PlanMarkers(
        bool(has_result), plan, executed, str(record.get("proposal_entry_id", "")), str(record.get("request", ""))
    )
