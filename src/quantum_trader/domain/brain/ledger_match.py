from __future__ import annotations

from quantum_trader.domain import reasons
from quantum_trader.domain.brain.state import BrainInputs, BrainPolicy
from quantum_trader.domain.models import Plan
from quantum_trader.domain.numbers import relative_diff_pct


def check(plan: Plan, inputs: BrainInputs, policy: BrainPolicy, now: float) -> str | None:
    """The ledger (what this system did) must agree with the exchange (what is): same side, size within
    ``qty_tolerance_pct``. A disagreement means a fill nobody here saw; closing blind on top of it is how
    ghost positions are made."""
    assert inputs.snapshot is not None
    if inputs.ledger is None:
        return reasons.LEDGER_MISSING
    ledger_amt = inputs.ledger.last_known_amt
    exchange_amt = inputs.snapshot.position_amt
    if ledger_amt * exchange_amt < 0:
        return reasons.SIDE_MISMATCH
    if relative_diff_pct(ledger_amt, exchange_amt) > policy.qty_tolerance_pct:
        return reasons.QTY_MISMATCH
    return None
