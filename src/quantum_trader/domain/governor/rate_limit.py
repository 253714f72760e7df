from __future__ import annotations

from quantum_trader.domain import reasons
from quantum_trader.domain.governor.state import GovernorPolicy, GovernorState
from quantum_trader.domain.models import Plan


def check(plan: Plan, state: GovernorState, policy: GovernorPolicy, now: float) -> str | None:
    """At most ``max_per_symbol`` grants per symbol and ``max_total`` overall per window. Deny, never queue:
    a queued close would execute against a market that has moved on."""
    if state.grants_symbol >= policy.max_per_symbol:
        return reasons.RATE_LIMIT_SYMBOL
    if state.grants_total >= policy.max_total:
        return reasons.RATE_LIMIT_GLOBAL
    return None
