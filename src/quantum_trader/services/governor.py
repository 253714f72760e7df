"""Governor (P3.2): permit one, from policy (auto mode) or from an operator (manual mode).

Per plan: read the policy state in one pipelined round trip, decide with the pure ``domain.governor.decide``,
write permit + audit entry + ack in one atomic script (first decision per plan wins), then count the grant.
"""

from __future__ import annotations

import time
from decimal import Decimal, InvalidOperation
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from quantum_trader.bus import keys
from quantum_trader.bus.scripts import Scripts
from quantum_trader.bus.streams import ensure_topology
from quantum_trader.domain.governor import GovernorPolicy, GovernorState, decide
from quantum_trader.domain.models import AuditEntry, GovernorPermit, Plan, to_fields
from quantum_trader.domain.permits import encode_permit, sign
from quantum_trader.domain.verdict import Verdict
from quantum_trader.secrets import permit_key
from quantum_trader.services.base import Service, consume_group
from quantum_trader.services.metrics import GovernorMetrics
from quantum_trader.settings import Settings


def policy_from(settings: Settings) -> GovernorPolicy:
    g = settings.governor
    return GovernorPolicy(
        allowlist=settings.governor_allowlist,
        cooldown_s=g.cooldown_s,
        rate_window_s=g.rate_window_s,
        max_per_symbol=g.max_per_symbol,
        max_total=g.max_total,
        max_notional_usdt=g.max_notional_usdt,
        price_max_age_s=g.price_max_age_s,
    )


def _decimal(value: str | None) -> Decimal | None:
    try:
        result = Decimal(value) if value else None
    except InvalidOperation:
        return None
    return result if result is not None and result.is_finite() else None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


async def issue_governor_permit(
    redis: aioredis.Redis,
    scripts: Scripts,
    settings: Settings,
    secret: bytes,
    plan: Plan,
    verdict: Verdict,
    *,
    issuer: str,
    claim_owner: str,
    now: float,
    entry_id: str = "",
) -> tuple[bool, str]:
    """Sign and write the Governor-slot permit for ``plan`` (shared by the service and ``qt permit``)."""
    permit = sign(
        GovernorPermit(
            granted=verdict.allow,
            plan_id=plan.plan_id,
            plan_hash=plan.plan_hash,
            issuer=issuer,  # type: ignore[arg-type]
            reason=verdict.reason,
            created_at=now,
        ),
        secret,
    )
    audit = AuditEntry(
        plan_id=plan.plan_id,
        issuer=issuer,
        decision="allow" if verdict.allow else "deny",
        reason=verdict.reason,
        at=now,
        latency_ms=round((now - plan.created_at) * 1000, 3),
        symbol=plan.symbol,
    )
    written, owner = await scripts.issue_permit(
        claim_key=keys.decision_claim("governor", plan.plan_id),
        claim_value=claim_owner,
        permit_key=keys.governor_permit(plan.plan_id),
        permit_json=encode_permit(permit).decode(),
        permit_ttl_s=settings.permit_ttl_s,
        audit_fields=to_fields(audit),
        audit_maxlen=settings.audit_maxlen,
        group=keys.GOVERNOR_GROUP if entry_id else "",
        entry_id=entry_id,
    )
    if written and verdict.allow:
        # Rate-limit bookkeeping: grants per symbol and overall, trimmed to the window.
        window_start = now - settings.governor.rate_window_s
        async with redis.pipeline(transaction=False) as pipe:
            for key in (keys.GOVERNOR_GRANTS, keys.governor_symbol_grants(plan.symbol)):
                pipe.zadd(key, {plan.plan_id: now})
                pipe.zremrangebyscore(key, "-inf", window_start)
                pipe.expire(key, int(settings.governor.rate_window_s) + 60)
            await pipe.execute()
    return written, owner


class GovernorService(Service):
    name = "governor"

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        *,
        consumer: str = "",
        registry: CollectorRegistry | None = None,
        clock: Any = time.time,
    ) -> None:
        super().__init__(settings, redis, consumer=consumer, clock=clock)
        self.metrics = GovernorMetrics(registry or CollectorRegistry())
        self.policy = policy_from(settings)
        self._secret = permit_key(settings, "governor")

    async def run(self) -> None:
        await ensure_topology(self.redis)
        self.log.info("Governor started", consumer=self.consumer, default_mode=self.settings.governor.mode)
        await consume_group(
            self.redis,
            stream=keys.PLAN_STREAM,
            group=keys.GOVERNOR_GROUP,
            consumer=self.consumer,
            handle=self.handle_plan,
            log=self.log,
            store_up=lambda up: self.metrics.store_up.set(1 if up else 0),
            failover=self.failover(keys.PLAN_DLQ),
            service=self.name,
        )

    async def handle_plan(self, entry_id: str, fields: dict[str, str]) -> None:
        started = time.perf_counter()
        plan = await self.accept_plan(entry_id, fields, keys.GOVERNOR_GROUP)
        if plan is None:
            self.metrics.dead_letters.inc()
            return
        if plan.decision != "EXECUTE":
            await self.redis.xack(keys.PLAN_STREAM, keys.GOVERNOR_GROUP, entry_id)
            return
        log = self.log.bind(plan_id=plan.plan_id, symbol=plan.symbol)
        now = self._clock()
        state, mode = await self._read_state(plan, now)
        if mode == "manual" and not state.kill_switch:
            await self.redis.xack(keys.PLAN_STREAM, keys.GOVERNOR_GROUP, entry_id)
            self.metrics.awaiting_operator.inc()
            log.info(f"{plan.symbol}: plan {plan.plan_id} awaits an operator (qt permit grant {plan.plan_id})")
            return
        verdict = decide(plan, state, self.policy, now)
        written, owner = await issue_governor_permit(
            self.redis,
            self._scripts,
            self.settings,
            self._secret,
            plan,
            verdict,
            issuer="governor",
            claim_owner=f"governor:{self.consumer}:{entry_id}",
            now=self._clock(),
            entry_id=entry_id,
        )
        if not written:
            self.metrics.duplicates.inc()
            await self.audit_duplicate(plan, owner)
            return
        self.metrics.permits.labels("allow" if verdict.allow else "deny", verdict.reason).inc()
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        log.info(
            f"{plan.symbol}: Governor {'ALLOW' if verdict.allow else 'DENY'} {plan.plan_id}", reason=verdict.reason
        )

    async def _read_state(self, plan: Plan, now: float) -> tuple[GovernorState, str]:
        window_start = now - self.policy.rate_window_s
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.KILL_SWITCH)
            pipe.get(keys.GOVERNOR_MODE)
            pipe.zcount(keys.governor_symbol_grants(plan.symbol), window_start, "+inf")
            pipe.zcount(keys.GOVERNOR_GRANTS, window_start, "+inf")
            pipe.zrevrange(keys.governor_symbol_grants(plan.symbol), 0, 0, withscores=True)
            pipe.hmget(keys.snapshot(plan.symbol), "mark_price", "ts")
            kill, mode, per_symbol, total, last, price = await pipe.execute()
        state = GovernorState(
            kill_switch=kill == "1",
            grants_symbol=int(per_symbol),
            grants_total=int(total),
            last_grant_symbol_at=float(last[0][1]) if last else None,
            mark_price=_decimal(price[0]),
            price_ts=_float(price[1]),
        )
        return state, (mode if mode in ("auto", "manual") else self.settings.governor.mode)
