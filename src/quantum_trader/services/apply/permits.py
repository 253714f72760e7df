"""Apply's wait for a plan's two permits: woken by the shared audit reader (permit_waiter.py), bounded by the
plan's window; each permit verified here (domain/permits.py), both consumed in one script with the plan's
executed marker (bus/scripts.py CONSUME_PERMITS). A rejected permit is audited once per distinct bytes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from enum import Enum
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.bus.scripts import Scripts
from quantum_trader.clock import Clock
from quantum_trader.domain import reasons
from quantum_trader.domain.models import AuditEntry, P33Permit, Plan, Result, to_fields
from quantum_trader.domain.permits import SlotCheck, WaitOutcome, check_slot, combine
from quantum_trader.domain.planning import plan_client_order_id
from quantum_trader.domain.text import to_bytes
from quantum_trader.services.apply.permit_waiter import PermitWaiter
from quantum_trader.services.apply.results import not_executed
from quantum_trader.services.metrics import ApplyMetrics
from quantum_trader.settings import Settings


class WaitEnd(Enum):
    """How a plan's wait for its permits ended."""

    CONSUMED = "consumed"  # both valid, consumed: send the order
    ALREADY_EXECUTED = "already_executed"  # another handler consumed them: recover its outcome
    ALREADY_FINISHED = "already_finished"  # the plan has its result already
    DENIED = "denied"
    TIMEOUT = "timeout"
    READY_LATE = "ready_late"  # both valid, but only after the window had closed (Apply was down)
    STORE_CHANGED = "store_changed"  # both valid, not consumed: the store is no longer the instance that vouched
    UNREPLICATED = "unreplicated"  # consumed, but not acknowledged by enough replicas in time: not sent


Checks = tuple[SlotCheck, SlotCheck]


class PermitGate:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        scripts: Scripts,
        waiter: PermitWaiter,
        permit_keys: dict[str, bytes],
        metrics: ApplyMetrics,
        clock: Clock,
        log: Any,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self._scripts = scripts
        self.waiter = waiter
        self._keys = permit_keys
        self.metrics = metrics
        self._clock = clock
        self.log = log

    async def wait(
        self, plan: Plan, deadline: float, log: Any, *, check_first: bool, consume: bool, expected_epoch: str = ""
    ) -> tuple[WaitEnd, WaitOutcome, Checks]:
        """Wait until both issuers decided, one denied, or the deadline passed (then look one last time). The
        consumption is refused if the store is no longer the instance ``expected_epoch`` names."""
        event = self.waiter.register(plan.plan_id)
        audited: set[bytes] = set()
        check_now, final = check_first, False
        while True:
            if check_now:
                event.clear()  # cleared before reading: a decision landing after the read sets it again
                checks = await self._read_slots(plan, audited)
                self.waiter.note_allowed(plan.plan_id, {c.slot for c in checks if c.state == "allow"})
                outcome = combine(*checks)
                if outcome.kind == "denied":
                    return WaitEnd.DENIED, outcome, checks
                if outcome.kind == "ready":
                    if not consume:
                        return WaitEnd.READY_LATE, outcome, checks
                    status = await self._consume(plan, checks, expected_epoch)
                    if status in ("ok", "already_executed", "already_finished", "store_changed", "unreplicated"):
                        end = {
                            "ok": WaitEnd.CONSUMED,
                            "already_executed": WaitEnd.ALREADY_EXECUTED,
                            "store_changed": WaitEnd.STORE_CHANGED,
                            "unreplicated": WaitEnd.UNREPLICATED,
                        }
                        return end.get(status, WaitEnd.ALREADY_FINISHED), outcome, checks
                    log.warning("permit changed between check and consume; re-reading", status=status)
                    continue
                if final:
                    return WaitEnd.TIMEOUT, outcome, checks
            left = deadline - self._clock.mono()
            if left <= 0:
                check_now, final = True, True
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), left)
            check_now = True

    def unexecuted_result(
        self, plan: Plan, end: WaitEnd, outcome: WaitOutcome, checks: Checks, waited_ms: float, log: Any
    ) -> Result:
        """The result of a wait that ended without consuming (denied, too late, timed out), counted and logged."""
        if end is WaitEnd.DENIED:
            for check in checks:  # the deny, and the other slot's decision if it came (consumed plans count theirs)
                if check.state in ("allow", "deny"):
                    self.metrics.permit_decisions.labels(check.name, check.state, check.reason).inc()
            who = ", ".join(outcome.denied_by)
            log.warning(f"{plan.symbol}: Permit denied by {who} ({outcome.deny_reason})")
            return not_executed(plan, reasons.PERMIT_DENIED, reason=outcome.deny_reason, denied_by=who)
        if end is WaitEnd.READY_LATE:
            log.warning(f"{plan.symbol}: permits found after the window closed; not executing")
            return not_executed(plan, reasons.WINDOW_EXPIRED)
        missing = ", ".join(outcome.missing)
        log.warning(f"{plan.symbol}: Permit timeout after {waited_ms:.0f}ms (missing: {missing})")
        for name in outcome.missing:
            self.metrics.timeouts.labels(name).inc()
        return not_executed(plan, reasons.PERMIT_TIMEOUT, missing=missing)

    async def _read_slots(self, plan: Plan, audited: set[bytes]) -> Checks:
        raw_gov, raw_p33 = await self.redis.mget(keys.governor_permit(plan.plan_id), keys.p33_permit(plan.plan_id))
        now = self._clock.wall()
        ttl = self.settings.permit_ttl_s
        checks = (
            check_slot("governor", _raw(raw_gov), plan, self._keys["governor"], now, ttl),
            check_slot("p33", _raw(raw_p33), plan, self._keys["p33"], now, ttl),
        )
        for check in checks:
            if check.state == "rejected" and check.raw is not None and check.raw not in audited:
                audited.add(check.raw)
                await self._audit_rejection(plan, check)
        return checks

    async def _audit_rejection(self, plan: Plan, check: SlotCheck) -> None:
        self.metrics.rejected_permits.labels(check.reason).inc()
        self.log.warning(f"{plan.symbol}: {check.name} permit rejected ({check.reason})", plan_id=plan.plan_id)
        entry = AuditEntry(
            plan_id=plan.plan_id,
            issuer="apply",
            decision="rejected",
            reason=check.reason,
            at=self._clock.wall(),
            symbol=plan.symbol,
            subject=check.slot,
        )
        await self._scripts.append(keys.AUDIT_STREAM, to_fields(entry), self.settings.audit_maxlen)

    async def _consume(self, plan: Plan, checks: Checks, expected_epoch: str) -> str:
        governor, p33 = checks
        assert governor.raw is not None and isinstance(p33.permit, P33Permit) and p33.raw is not None
        for check in checks:
            self.metrics.permit_decisions.labels(check.name, check.state, check.reason).inc()
        now = self._clock.wall()
        marker = json.dumps(
            {
                "client_order_id": plan_client_order_id(plan),
                "qty": format(p33.permit.safe_close_qty, "f"),
                "side": plan.side,
                "at": now,
            }
        )
        return await self._scripts.consume_permits(
            plan_id=plan.plan_id,
            symbol=plan.symbol,
            governor_raw=governor.raw,
            p33_raw=p33.raw,
            marker=marker,
            now=now,
            latency_ms=(now - plan.created_at) * 1000,
            audit_maxlen=self.settings.audit_maxlen,
            expected_epoch=expected_epoch,
            replicas=self.settings.apply.consume_replicas,
            replicas_wait_ms=self.settings.apply.consume_replicas_wait_ms,
        )


def _raw(value: str | None) -> bytes | None:
    return to_bytes(value) if value is not None else None
