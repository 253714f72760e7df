from __future__ import annotations

from quantum_trader.domain import reasons
from quantum_trader.domain.governor.state import GovernorPolicy, GovernorState
from quantum_trader.domain.models import Plan


def check(plan: Plan, state: GovernorState, policy: GovernorPolicy, now: float) -> str | None:
    """|qty| x mark price must not exceed the limit. No recent price means the limit cannot be checked,
    and an unchecked limit is a deny."""
    if state.mark_price is None or state.price_ts is None or now - state.price_ts > policy.price_max_age_s:
        return reasons.PRICE_UNAVAILABLE
    if abs(plan.qty) * state.mark_price > policy.max_notional_usdt:
        return reasons.MAX_NOTIONAL_EXCEEDED
    return None
