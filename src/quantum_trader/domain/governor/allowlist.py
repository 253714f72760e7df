from __future__ import annotations

from quantum_trader.domain import reasons
from quantum_trader.domain.governor.state import GovernorPolicy, GovernorState
from quantum_trader.domain.models import Plan


def check(plan: Plan, state: GovernorState, policy: GovernorPolicy, now: float) -> str | None:
    """Only symbols on the Governor's allowlist (Apply checks its own list too: defence in depth)."""
    return None if plan.symbol in policy.allowlist else reasons.SYMBOL_NOT_ALLOWED
