"""Apply's pure core: a proposal and what is known about the symbol become a plan."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal

import msgspec

from quantum_trader.domain import reasons
from quantum_trader.domain.models import Plan, Proposal, Side, to_fields

_UNHASHED = "0" * 64


@dataclass(frozen=True, slots=True)
class PlanningContext:
    """What Apply knows when it plans. ``position_amt`` is signed (negative = short); None = unknown."""

    allowlist: frozenset[str]
    position_amt: Decimal | None
    symbol_busy: bool = False
    min_kill_score: float | None = None


def plan_id_for(proposal_entry_id: str, proposal_id: str) -> str:
    """Deterministic plan id: a redelivered proposal maps to the same plan, so it can never execute twice."""
    digest = hashlib.sha256(f"{proposal_entry_id}|{proposal_id}".encode()).hexdigest()
    return digest[:16]


def is_plan_id(text: str) -> bool:
    """Sixteen lowercase hex digits, as ``plan_id_for`` makes them."""
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


def client_order_id(plan_id: str) -> str:
    """Binance newClientOrderId for a plan: deterministic, so the order can always be found by it."""
    return f"qt-{plan_id}"


def static_skip_reason(proposal: Proposal, allowlist: frozenset[str], min_kill_score: float | None) -> str | None:
    """The SKIP reasons that need no exchange data (checked first, so a doomed proposal costs no request)."""
    return _skip_reason(proposal, PlanningContext(allowlist, Decimal(1), False, min_kill_score), static=True)


def close_side(position_amt: Decimal) -> Side:
    if position_amt > 0:
        return "LONG"
    if position_amt < 0:
        return "SHORT"
    return "NONE"


def order_side(side: Side) -> str:
    """Binance order side that reduces a position of this side."""
    return "SELL" if side == "LONG" else "BUY"


def requested_qty(proposal: Proposal, position_amt: Decimal) -> Decimal:
    size = abs(position_amt)
    if proposal.action == "FULL_CLOSE":
        return size
    if proposal.qty is not None:
        return proposal.qty
    assert proposal.close_pct is not None  # Proposal validation guarantees one of the two
    return size * proposal.close_pct / 100


def _skip_reason(proposal: Proposal, ctx: PlanningContext, static: bool = False) -> str | None:
    if proposal.symbol not in ctx.allowlist:
        return reasons.SYMBOL_NOT_ALLOWED
    if ctx.min_kill_score is not None and proposal.kill_score is not None and proposal.kill_score < ctx.min_kill_score:
        return reasons.BELOW_THRESHOLD
    if proposal.action == "PARTIAL_CLOSE" and (proposal.qty == 0 or proposal.close_pct == 0):
        return reasons.CLOSE_QTY_ZERO
    if static:
        return None
    if ctx.position_amt is None:
        return reasons.POSITION_UNAVAILABLE
    if ctx.position_amt == 0:
        return reasons.NO_POSITION
    if ctx.symbol_busy:
        return reasons.DUPLICATE_IN_FLIGHT
    return None


def make_plan(proposal: Proposal, ctx: PlanningContext, plan_id: str, now: float) -> Plan:
    skip = _skip_reason(proposal, ctx)
    position = ctx.position_amt or Decimal(0)
    side = close_side(position)
    qty = requested_qty(proposal, position) if position else Decimal(0)
    steps: list[dict[str, object]] = []
    if skip is None:
        steps = [{"type": "MARKET", "side": order_side(side), "qty": format(qty, "f"), "reduce_only": True}]
    draft = Plan(
        plan_id=plan_id,
        proposal_id=proposal.proposal_id,
        symbol=proposal.symbol,
        side=side,
        action=proposal.action,
        qty=qty,
        decision="SKIP" if skip else "EXECUTE",
        reason=skip or reasons.READY,
        steps=msgspec.json.encode(steps).decode(),
        plan_hash=_UNHASHED,
        created_at=now,
    )
    return msgspec.structs.replace(draft, plan_hash=plan_hash(draft))


def plan_hash(plan: Plan) -> str:
    """SHA-256 over the plan's wire fields except plan_hash, keys sorted. Every consumer recomputes it."""
    body = {k: v for k, v in to_fields(plan).items() if k != "plan_hash"}
    return hashlib.sha256(msgspec.json.encode(body, order="sorted")).hexdigest()


def plan_hash_ok(plan: Plan) -> bool:
    return plan_hash(plan) == plan.plan_hash
