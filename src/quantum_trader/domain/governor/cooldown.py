from __future__ import annotations

from quantum_trader.domain import reasons
from quantum_trader.domain.governor.state import GovernorPolicy, GovernorState
from quantum_trader.domain.models import Plan


def check(plan: Plan, state: GovernorState, policy: GovernorPolicy, now: float) -> str | None:
    """No second grant for a symbol within ``cooldown_s`` of the last one."""
    last = state.last_grant_symbol_at
    if last is not None and now - last < policy.cooldown_s:
        return reasons.GOVERNOR_COOLDOWN
    return None
