"""What the Governor and P3.3 share as permit issuers: accept plans from the plan stream (malformed ones
dead-lettered), write the permits of plans decided together, and audit a decision another instance made first."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from quantum_trader.bus import keys
from quantum_trader.bus.scripts import PermitWrite
from quantum_trader.bus.streams import dead_letter
from quantum_trader.domain import reasons
from quantum_trader.domain.models import AuditEntry, MalformedEntry, Plan, from_fields, to_fields
from quantum_trader.domain.planning import plan_hash_ok
from quantum_trader.services.consumer import Entries
from quantum_trader.services.service import Service

SEED_NAMES = {"governor": "Governor", "p33": "P3.3"}  # issuer names as the seed's log lines spell them


class PermitIssuer(Service):
    """A service that decides plans and writes one permit per plan (the Governor, P3.3)."""

    async def issue_decisions(
        self,
        plans: list[tuple[str, Plan]],
        verdicts: Sequence[Any],
        writes: list[PermitWrite],
        started: float,
        details: Callable[[Any], dict[str, str]] = lambda verdict: {},
    ) -> None:
        """Write an issuer's permits for plans decided together (one pipeline), then count and log each; a
        plan another instance decided first is audited as a duplicate. ``verdicts`` have ``allow`` and ``reason``;
        ``self.metrics`` has ``permits``, ``duplicates`` and ``decision_seconds``."""
        issued = await self._scripts.issue_permits(writes)
        took = (time.perf_counter() - started) / len(plans)
        for (_, plan), verdict, (written, owner) in zip(plans, verdicts, issued, strict=True):
            if not written:
                self.metrics.duplicates.inc()
                await self.audit_duplicate(plan, owner)
                continue
            self.metrics.permits.labels("allow" if verdict.allow else "deny", verdict.reason).inc()
            self.metrics.decision_seconds.observe(took)
            self.log.info(
                f"{plan.symbol}: {SEED_NAMES[self.name]} {'ALLOW' if verdict.allow else 'DENY'} {plan.plan_id}",
                reason=verdict.reason,
                plan_id=plan.plan_id,
                symbol=plan.symbol,
                **details(verdict),
            )

    async def audit_duplicate(self, plan: Plan, owner: str) -> None:
        """A second decision for a plan this issuer already decided (another instance won): record, drop."""
        entry = AuditEntry(
            plan_id=plan.plan_id,
            issuer=self.name,
            decision="duplicate",
            reason=f"decided by {owner}",
            at=self._clock.wall(),
            symbol=plan.symbol,
            subject=self.consumer,
        )
        await self._scripts.append(keys.AUDIT_STREAM, to_fields(entry), self.settings.audit_maxlen)
        self.log.info("plan already decided by another instance; dropped", plan_id=plan.plan_id, owner=owner)

    async def accept_plans(self, entries: Entries, group: str) -> tuple[list[tuple[str, Plan]], int]:
        """The plans to decide among plan-stream entries, with their entry ids; malformed ones are
        dead-lettered (their number is returned), SKIP plans acknowledged."""
        plans, skipped, dead = [], [], 0
        for entry_id, fields in entries:
            plan = await self.accept_plan(entry_id, fields, group)
            if plan is None:
                dead += 1
            elif plan.decision != "EXECUTE":
                skipped.append(entry_id)
            else:
                plans.append((entry_id, plan))
        if skipped:
            await self.redis.xack(keys.PLAN_STREAM, group, *skipped)
        return plans, dead

    async def accept_plan(self, entry_id: str, fields: dict[str, str], group: str) -> Plan | None:
        """The plan in a plan-stream entry; None after dead-lettering it (malformed, or plan_hash mismatch)."""
        try:
            plan = from_fields(Plan, fields)
            if not plan_hash_ok(plan):
                raise MalformedEntry(f"{reasons.PLAN_HASH_MISMATCH}: plan_hash does not match the plan's fields")
        except MalformedEntry as exc:
            error = f"{reasons.MALFORMED_ENTRY}: {exc}"
            await dead_letter(self.redis, keys.PLAN_DLQ, keys.PLAN_STREAM, group, entry_id, fields, error, self.name)
            self.log.warning("malformed plan dead-lettered", entry_id=entry_id, error=str(exc))
            return None
        return plan
