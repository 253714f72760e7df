"""Governor (P3.2) policy: one rule per module, each a pure function returning a deny reason or None.

``decide`` runs them in order; the first deny wins, so the reason names the most fundamental problem
(a kill switch beats a rate limit).
"""

from __future__ import annotations

from collections.abc import Callable

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


__all__ = ["RULES", "GovernorPolicy", "GovernorState", "decide"]
