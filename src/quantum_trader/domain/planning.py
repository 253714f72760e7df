"""Apply's pure core: a proposal and what is known about the symbol become a plan."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from decimal import Decimal

import msgspec

from quantum_trader.domain import reasons
from quantum_trader.domain.models import PROPOSAL_ID_PATTERN, Plan, Proposal, Side, to_fields

_UNHASHED = "0" * 64


@dataclass(frozen=True, slots=True)
class PlanningContext:
    """What Apply knows when it plans. ``position_amt`` is signed (negative = short); None = unknown.
    ``refusal``: a reason the proposal is refused before anything else (its id names a different proposal;
    the store cannot vouch for it)."""

    allowlist: frozenset[str]
    position_amt: Decimal | None
    symbol_busy: bool = False
    min_kill_score: float | None = None
    refusal: str | None = None


_PROPOSAL_ID = re.compile(PROPOSAL_ID_PATTERN)
CLIENT_ORDER_PREFIX = "qt-"  # with a proposal id (models.PROPOSAL_ID_PATTERN) at most Binance's 36 characters


def plan_id_for(proposal_id: str) -> str:
    """The plan of a proposal id. Every proposal with this id (a redelivery, the client's retry) is this one
    plan, so it can be executed at most once however often it is sent (docs/design-notes.md)."""
    return hashlib.sha256(f"plan|{proposal_id}".encode()).hexdigest()[:16]


def refusal_plan_id(proposal_entry_id: str, proposal_id: str) -> str:
    """The plan that refuses one proposal entry reusing the id of a different proposal: its own id (never the
    id's plan, which answers the first proposal), the same for a redelivery of that entry."""
    return hashlib.sha256(f"refused|{proposal_entry_id}|{proposal_id}".encode()).hexdigest()[:16]


def is_plan_id(text: str) -> bool:
    """Sixteen lowercase hex digits, as ``plan_id_for`` makes them."""
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


def client_order_id(proposal_id: str) -> str:
    """Binance newClientOrderId of the plan of ``proposal_id``: deterministic, so the order can always be found
    by it, and it names the proposal, so an order whose every record the store lost leads back to it."""
    return f"{CLIENT_ORDER_PREFIX}{proposal_id}"


def plan_client_order_id(plan: Plan) -> str:
    """The client order id of a plan's order. A plan made before proposal ids were idempotency keys (its id is
    not its proposal id's) had ``qt-<plan_id>``."""
    if plan.proposal_id and plan_id_for(plan.proposal_id) == plan.plan_id:
        return client_order_id(plan.proposal_id)
    return f"{CLIENT_ORDER_PREFIX}{plan.plan_id}"


def proposal_id_of_order(client_id: str) -> str | None:
    """The proposal id a client order id of ours carries; None for anyone else's order."""
    if not client_id.startswith(CLIENT_ORDER_PREFIX):
        return None
    proposal_id = client_id[len(CLIENT_ORDER_PREFIX) :]
    return proposal_id if _PROPOSAL_ID.match(proposal_id) else None


def request_of(proposal: Proposal) -> str:
    """What makes two proposals with one id the same request: symbol, action and size. Not ``created_at`` (a
    retry stamps a new one), ``source`` or ``kill_score``; sizes compare as numbers ("0.010" is "0.01"); a
    FULL_CLOSE has no size (its qty and close_pct are ignored)."""
    if proposal.action == "FULL_CLOSE":
        return f"{proposal.symbol}|FULL_CLOSE||"
    return f"{proposal.symbol}|{proposal.action}|{_number(proposal.qty)}|{_number(proposal.close_pct)}"


def _number(value: Decimal | None) -> str:
    return "" if value is None else format(value.normalize(), "f")


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
    if ctx.refusal:
        return ctx.refusal
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
