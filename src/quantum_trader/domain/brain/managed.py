from __future__ import annotations

from quantum_trader.domain import reasons
from quantum_trader.domain.brain.state import BrainInputs, BrainPolicy
from quantum_trader.domain.models import Plan


def check(plan: Plan, inputs: BrainInputs, policy: BrainPolicy, now: float) -> str | None:
    """P3.3 only vouches for symbols it snapshots and keeps a ledger for."""
    return None if plan.symbol in policy.managed else reasons.SYMBOL_NOT_MANAGED
