"""Governor (P3.2): permit one, from policy (auto mode) or from an operator (manual mode).

Per plan: read the policy state in one pipelined round trip, decide with the pure ``domain.governor.decide``,
write permit + audit entry + ack in one atomic script (first decision per plan wins), then count the grant.
"""

from __future__ import annotations

import time
from decimal import Decimal, InvalidOperation

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from quantum_trader.bus import keys
from quantum_trader.bus.permit_writes import governor_permit_write
from quantum_trader.bus.replies import in_groups
from quantum_trader.bus.streams import ensure_topology
from quantum_trader.clock import SYSTEM_CLOCK, Clock
from quantum_trader.domain.governor import GovernorPolicy, GovernorState, decide_in_order
from quantum_trader.domain.models import Plan
from quantum_trader.secrets import permit_key
from quantum_trader.services.consumer import Entries, consume_group
from quantum_trader.services.issuer import PermitIssuer
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


class GovernorService(PermitIssuer):
    name = "governor"

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        *,
        consumer: str = "",
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(settings, redis, consumer=consumer, clock=clock)
        self.metrics = GovernorMetrics(registry or CollectorRegistry())
        self.policy = policy_from(settings)
        self._secret = permit_key(settings, "governor")

    async def run(self) -> None:
        await self.until_store(lambda: ensure_topology(self.redis))
        self.log.info("Governor started", consumer=self.consumer, default_mode=self.settings.governor.mode)
        await consume_group(
            self.redis,
            stream=keys.PLAN_STREAM,
            group=keys.GOVERNOR_GROUP,
            consumer=self.consumer,
            handle=self.handle_plan,
            handle_batch=self.handle_plans,
            log=self.log,
            store_up=lambda up: self.metrics.store_up.set(1 if up else 0),
            failover=self.failover(keys.PLAN_DLQ),
            service=self.name,
        )

    async def handle_plan(self, entry_id: str, fields: dict[str, str]) -> None:
        await self.handle_plans([(entry_id, fields)])

    async def handle_plans(self, entries: Entries) -> None:
        """Decide the plans of one read: their policy state in one round trip, the decisions in order (each
        allow counts for the plans after it), the permits in one more."""
        started = time.perf_counter()
        plans, dead = await self.accept_plans(entries, keys.GOVERNOR_GROUP)
        if dead:
            self.metrics.dead_letters.inc(dead)
        if not plans:
            return
        now = self._clock.wall()
        states, mode = await self._read_states([plan for _, plan in plans], now)
        if mode == "manual" and not states[0].kill_switch:
            await self.redis.xack(keys.PLAN_STREAM, keys.GOVERNOR_GROUP, *(entry_id for entry_id, _ in plans))
            for _, plan in plans:
                self.metrics.awaiting_operator.inc()
                self.log.info(
                    f"{plan.symbol}: plan {plan.plan_id} awaits an operator (qt permit grant {plan.plan_id})",
                    plan_id=plan.plan_id,
                    symbol=plan.symbol,
                )
            return
        verdicts = decide_in_order([plan for _, plan in plans], states, self.policy, now)
        decided_at = self._clock.wall()
        writes = [
            governor_permit_write(
                self.settings,
                self._secret,
                plan,
                verdict,
                issuer="governor",
                claim_owner=f"governor:{self.consumer}:{entry_id}",
                now=decided_at,
                entry_id=entry_id,
            )
            for (entry_id, plan), verdict in zip(plans, verdicts, strict=True)
        ]
        await self.issue_decisions(plans, verdicts, writes, started)

    async def _read_states(self, plans: list[Plan], now: float) -> tuple[list[GovernorState], str]:
        """The policy state for each plan, read in one pipelined round trip (each symbol once)."""
        window_start = now - self.policy.rate_window_s
        symbols = list(dict.fromkeys(plan.symbol for plan in plans))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.KILL_SWITCH)
            pipe.get(keys.GOVERNOR_MODE)
            pipe.zcount(keys.GOVERNOR_GRANTS, window_start, "+inf")
            for symbol in symbols:
                pipe.zcount(keys.governor_symbol_grants(symbol), window_start, "+inf")
                pipe.zrevrange(keys.governor_symbol_grants(symbol), 0, 0, withscores=True)
                pipe.hmget(keys.snapshot(symbol), "mark_price", "ts")
            kill, mode, total, *per_symbol = await pipe.execute()
        by_symbol = {}
        for symbol, (count, last, price) in zip(symbols, in_groups(per_symbol, 3), strict=True):
            by_symbol[symbol] = GovernorState(
                kill_switch=kill == "1",
                grants_symbol=int(count),
                grants_total=int(total),
                last_grant_symbol_at=float(last[0][1]) if last else None,
                mark_price=_decimal(price[0]),
                price_ts=_float(price[1]),
            )
        return [by_symbol[plan.symbol] for plan in plans], (
            mode if mode in ("auto", "manual") else self.settings.governor.mode
        )
