from __future__ import annotations

from quantum_trader.domain import reasons
from quantum_trader.domain.brain.state import BrainInputs, BrainPolicy
from quantum_trader.domain.models import Plan
from quantum_trader.domain.planning import close_side


def check(plan: Plan, inputs: BrainInputs, policy: BrainPolicy, now: float) -> str | None:
    """The exchange must hold a position, on the side the plan means to close."""
    assert inputs.snapshot is not None  # snapshot_age runs first
    amt = inputs.snapshot.position_amt
    if amt == 0:
        return reasons.NO_POSITION
    if close_side(amt) != plan.side:
        return reasons.PLAN_SIDE_MISMATCH
    return None
