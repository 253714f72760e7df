from __future__ import annotations

from quantum_trader.domain import reasons
from quantum_trader.domain.governor.state import GovernorPolicy, GovernorState
from quantum_trader.domain.models import Plan


def check(plan: Plan, state: GovernorState, policy: GovernorPolicy, now: float) -> str | None:
    """Kill switch on: deny everything, first, whatever else is true."""
    return reasons.KILL_SWITCH_ON if state.kill_switch else None
