"""Governor (P3.2) policy: one rule per module, each a pure function returning a deny reason or None.

``decide`` runs them in order; the first deny wins, so the reason names the most fundamental problem
(a kill switch beats a rate limit).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

from quantum_trader.domain import reasons
from quantum_trader.domain.governor import allowlist, cooldown, kill_switch, max_notional, rate_limit
from quantum_trader.domain.governor.state import GovernorPolicy, GovernorState
from quantum_trader.domain.models import Plan
from quantum_trader.domain.verdict import Verdict

Rule = Callable[[Plan, GovernorState, GovernorPolicy, float], str | None]

RULES: tuple[Rule, ...] = (
    kill_switch.check,
    allowlist.check,
    cooldown.check,
    rate_limit.check,
    max_notional.check,
)


def decide(plan: Plan, state: GovernorState, policy: GovernorPolicy, now: float) -> Verdict:
    for rule in RULES:
        reason = rule(plan, state, policy, now)
        if reason is not None:
            return Verdict.deny(reason)
    return Verdict(True, reasons.POLICY_PASSED)


def decide_in_order(
    plans: Sequence[Plan], states: Sequence[GovernorState], policy: GovernorPolicy, now: float
) -> list[Verdict]:
    """Decide plans read together as if one after another: ``states[i]`` is what the store said for plan i
    before any of them was decided, and each allow counts against the rate limits and cooldown of the plans
    after it, exactly as it would have had they been read one at a time."""
    allowed_total = 0
    allowed_symbol: Counter[str] = Counter()
    last_allow: dict[str, float] = {}
    verdicts = []
    for plan, read in zip(plans, states, strict=True):
        state = replace(
            read,
            grants_total=read.grants_total + allowed_total,
            grants_symbol=read.grants_symbol + allowed_symbol[plan.symbol],
            last_grant_symbol_at=last_allow.get(plan.symbol, read.last_grant_symbol_at),
        )
        verdict = decide(plan, state, policy, now)
        if verdict.allow:
            allowed_total += 1
            allowed_symbol[plan.symbol] += 1
            last_allow[plan.symbol] = now
        verdicts.append(verdict)
    return verdicts


__all__ = ["RULES", "GovernorPolicy", "GovernorState", "decide", "decide_in_order"]
