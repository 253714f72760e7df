from __future__ import annotations

from quantum_trader.domain import reasons
from quantum_trader.domain.brain.state import BrainInputs, BrainPolicy
from quantum_trader.domain.models import Plan


def check(plan: Plan, inputs: BrainInputs, policy: BrainPolicy, now: float) -> str | None:
    """A snapshot older than ``snapshot_max_age_s`` (or none at all) says nothing about the position now."""
    snap = inputs.snapshot
    if snap is None or now - snap.ts > policy.snapshot_max_age_s:
        return reasons.STALE_SNAPSHOT
    return None
