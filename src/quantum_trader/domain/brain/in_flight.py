from __future__ import annotations

from quantum_trader.domain import reasons
from quantum_trader.domain.brain.state import BrainInputs, BrainPolicy
from quantum_trader.domain.models import Plan


def check(plan: Plan, inputs: BrainInputs, policy: BrainPolicy, now: float) -> str | None:
    """One close per symbol at a time, and a pause after each: the snapshot must catch up with the fill
    before the next close is sized against it."""
    if inputs.in_flight_plan is not None and inputs.in_flight_plan != plan.plan_id:
        return reasons.ORDER_IN_FLIGHT
    ledger = inputs.ledger
    if ledger is not None and ledger.last_exec_at and now - ledger.last_exec_at < policy.cooldown_s:
        return reasons.COOLDOWN_ACTIVE
    return None
