"""P3.3 Position State Brain checks: one rule per module, each pure over the data it is given.

``decide`` runs the deny rules in order (the first deny wins), then computes the safe close quantity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

from quantum_trader.domain import reasons
from quantum_trader.domain.brain import close_qty, in_flight, ledger_match, managed, position, snapshot_age
from quantum_trader.domain.brain.state import BrainInputs, BrainPolicy
from quantum_trader.domain.models import Plan

Rule = Callable[[Plan, BrainInputs, BrainPolicy, float], str | None]

RULES: tuple[Rule, ...] = (
    managed.check,
    snapshot_age.check,
    position.check,
    ledger_match.check,
    in_flight.check,
)


@dataclass(frozen=True, slots=True)
class BrainVerdict:
    allow: bool
    reason: str
    safe_close_qty: Decimal = Decimal(0)
    exchange_position_amt: Decimal = Decimal(0)
    ledger_amt: Decimal | None = None


def decide(plan: Plan, inputs: BrainInputs, policy: BrainPolicy, now: float) -> BrainVerdict:
    exchange_amt = inputs.snapshot.position_amt if inputs.snapshot else Decimal(0)
    ledger_amt = inputs.ledger.last_known_amt if inputs.ledger else None

    def deny(reason: str) -> BrainVerdict:
        return BrainVerdict(False, reason, Decimal(0), exchange_amt, ledger_amt)

    for rule in RULES:
        reason = rule(plan, inputs, policy, now)
        if reason is not None:
            return deny(reason)
    qty_or_reason = close_qty.safe_close_qty(plan, exchange_amt, inputs.filters)
    if isinstance(qty_or_reason, str):
        return deny(qty_or_reason)
    return BrainVerdict(True, reasons.SANITY_CHECKS_PASSED, qty_or_reason, exchange_amt, ledger_amt)


def decide_in_order(
    plans: Sequence[Plan], inputs: Sequence[BrainInputs], policy: BrainPolicy, now: float
) -> list[BrainVerdict]:
    """Decide plans read together as if one after another: ``inputs[i]`` is what the store said for plan i
    before any of them was decided, and an allow marks its symbol in flight for the plans after it (as the
    permit script does in the store), so a second close of a symbol in the same read is denied as it would
    have been had the plans been read one at a time."""
    marked: dict[str, str] = {}
    verdicts = []
    for plan, given in zip(plans, inputs, strict=True):
        seen = replace(given, in_flight_plan=marked[plan.symbol]) if plan.symbol in marked else given
        verdict = decide(plan, seen, policy, now)
        if verdict.allow:
            marked[plan.symbol] = plan.plan_id
        verdicts.append(verdict)
    return verdicts


__all__ = ["RULES", "BrainInputs", "BrainPolicy", "BrainVerdict", "decide", "decide_in_order"]
