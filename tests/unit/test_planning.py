"""Apply's pure core: proposals become SKIP or EXECUTE plans, with a hash every consumer can recompute."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.domain import reasons
from quantum_trader.domain.models import PROPOSAL_ID_PATTERN, Plan, Proposal, from_fields, to_fields
from quantum_trader.domain.planning import (
    PlanningContext,
    client_order_id,
    close_side,
    make_plan,
    order_side,
    plan_client_order_id,
    plan_hash,
    plan_hash_ok,
    plan_id_for,
    proposal_id_of_order,
    refusal_plan_id,
    request_of,
    requested_qty,
    static_skip_reason,
)

D = Decimal
ALLOW = frozenset({"BTCUSDT", "ETHUSDT"})
PLAN_ID = "0123456789abcdef"
NOW = 1_700_000_000.5
HALF = D("0.5")
BINANCE_CLIENT_ID = re.compile(r"^[\.A-Z\:/a-z0-9_\-]{1,36}$")


def proposal(**changes: Any) -> Proposal:
    values: dict[str, Any] = {"proposal_id": "prop-1", "symbol": "BTCUSDT", "action": "FULL_CLOSE"}
    values.update(changes)
    return Proposal(**values)


def ctx(position: Decimal | None = HALF, **changes: Any) -> PlanningContext:
    values: dict[str, Any] = {"allowlist": ALLOW, "position_amt": position}
    values.update(changes)
    return PlanningContext(**values)


def plan_for(p: Proposal, c: PlanningContext) -> Plan:
    return make_plan(p, c, PLAN_ID, NOW)


# --- SKIP reasons -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prop", "context", "reason"),
    [
        (proposal(symbol="DOGEUSDT"), ctx(), reasons.SYMBOL_NOT_ALLOWED),
        (proposal(kill_score=0.4), ctx(min_kill_score=0.5), reasons.BELOW_THRESHOLD),
        (proposal(action="PARTIAL_CLOSE", qty=D(0)), ctx(), reasons.CLOSE_QTY_ZERO),
        (proposal(action="PARTIAL_CLOSE", close_pct=D("0.00")), ctx(), reasons.CLOSE_QTY_ZERO),
        (proposal(), ctx(None), reasons.POSITION_UNAVAILABLE),
        (proposal(), ctx(D(0)), reasons.NO_POSITION),
        (proposal(), ctx(symbol_busy=True), reasons.DUPLICATE_IN_FLIGHT),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_each_skip_reason(prop: Proposal, context: PlanningContext, reason: str) -> None:
    plan = plan_for(prop, context)
    assert plan.decision == "SKIP"
    assert plan.reason == reason
    assert json.loads(plan.steps) == []
    assert plan_hash_ok(plan)


def test_skip_reason_precedence() -> None:
    """Each reason wins over every reason after it: break all of them, then fix them one at a time."""
    bad = {
        "symbol": "DOGEUSDT",
        "kill_score": 0.1,
        "action": "PARTIAL_CLOSE",
        "qty": D(0),
    }
    context = {"position": None, "symbol_busy": True, "min_kill_score": 0.5}
    expected = [
        reasons.SYMBOL_NOT_ALLOWED,
        reasons.BELOW_THRESHOLD,
        reasons.CLOSE_QTY_ZERO,
        reasons.POSITION_UNAVAILABLE,
        reasons.NO_POSITION,
        reasons.DUPLICATE_IN_FLIGHT,
        reasons.READY,
    ]
    fixes = [
        lambda: bad.update(symbol="BTCUSDT"),
        lambda: bad.update(kill_score=0.9),
        lambda: bad.update(qty=D("0.1")),
        lambda: context.update(position=D(0)),
        lambda: context.update(position=D("-2")),
        lambda: context.update(symbol_busy=False),
    ]
    seen = []
    for i in range(len(expected)):
        p = proposal(**bad)
        c = ctx(context["position"], symbol_busy=context["symbol_busy"], min_kill_score=context["min_kill_score"])
        seen.append(plan_for(p, c).reason)
        if i < len(fixes):
            fixes[i]()
    assert seen == expected


def test_kill_score_threshold_edges() -> None:
    assert plan_for(proposal(kill_score=0.5), ctx(min_kill_score=0.5)).decision == "EXECUTE"  # equal passes
    assert plan_for(proposal(kill_score=None), ctx(min_kill_score=0.5)).decision == "EXECUTE"  # no score passes
    assert plan_for(proposal(kill_score=-100.0), ctx(min_kill_score=None)).decision == "EXECUTE"  # disabled


def test_skip_plans_describe_the_position() -> None:
    none = plan_for(proposal(), ctx(None))
    assert (none.side, none.qty) == ("NONE", 0)
    flat = plan_for(proposal(), ctx(D(0)))
    assert (flat.side, flat.qty) == ("NONE", 0)
    busy = plan_for(proposal(), ctx(D("-0.7"), symbol_busy=True))
    assert (busy.side, busy.qty) == ("SHORT", D("0.7"))


# --- static skip ------------------------------------------------------------------------------------------


def test_static_skip_reason() -> None:
    assert static_skip_reason(proposal(symbol="DOGEUSDT"), ALLOW, None) == reasons.SYMBOL_NOT_ALLOWED
    assert static_skip_reason(proposal(kill_score=0.1), ALLOW, 0.2) == reasons.BELOW_THRESHOLD
    assert static_skip_reason(proposal(action="PARTIAL_CLOSE", close_pct=D(0)), ALLOW, None) == reasons.CLOSE_QTY_ZERO
    assert static_skip_reason(proposal(symbol="DOGEUSDT", kill_score=0.1), ALLOW, 0.2) == reasons.SYMBOL_NOT_ALLOWED


def test_static_skip_reason_ignores_exchange_reasons() -> None:
    # A proposal that needs the exchange to be judged passes the static check.
    assert static_skip_reason(proposal(), ALLOW, None) is None
    assert static_skip_reason(proposal(action="PARTIAL_CLOSE", qty=D("0.1")), ALLOW, 0.0) is None
    assert static_skip_reason(proposal(), frozenset(), None) == reasons.SYMBOL_NOT_ALLOWED


# --- EXECUTE plans ----------------------------------------------------------------------------------------


def test_execute_plan_long() -> None:
    plan = plan_for(proposal(), ctx(D("0.5")))
    assert plan.decision == "EXECUTE"
    assert plan.reason == reasons.READY
    assert plan.side == "LONG"
    assert plan.qty == D("0.5")
    assert plan.plan_id == PLAN_ID
    assert plan.proposal_id == "prop-1"
    assert plan.symbol == "BTCUSDT"
    assert plan.created_at == NOW
    assert json.loads(plan.steps) == [{"type": "MARKET", "side": "SELL", "qty": "0.5", "reduce_only": True}]
    assert plan_hash_ok(plan)


def test_execute_plan_short() -> None:
    plan = plan_for(proposal(symbol="ETHUSDT"), ctx(D("-3.25")))
    assert plan.decision == "EXECUTE"
    assert plan.side == "SHORT"
    assert plan.qty == D("3.25")
    assert json.loads(plan.steps) == [{"type": "MARKET", "side": "BUY", "qty": "3.25", "reduce_only": True}]


def test_steps_quantity_is_plain_decimal_text() -> None:
    plan = plan_for(proposal(action="PARTIAL_CLOSE", qty=D("1E-7")), ctx(D("1E+3")))
    assert json.loads(plan.steps)[0]["qty"] == "0.0000001"


def test_execute_plan_survives_the_wire() -> None:
    plan = plan_for(proposal(action="PARTIAL_CLOSE", close_pct=D("12.5")), ctx(D("-0.8")))
    again = from_fields(Plan, to_fields(plan))
    assert again == plan
    assert plan_hash_ok(again)


@pytest.mark.parametrize(
    ("prop", "position", "qty"),
    [
        (proposal(), D("0.5"), D("0.5")),
        (proposal(), D("-0.5"), D("0.5")),
        (proposal(qty=D("0.1"), close_pct=D(10)), D("2"), D("2")),  # FULL_CLOSE ignores both
        (proposal(action="PARTIAL_CLOSE", qty=D("0.2")), D("2"), D("0.2")),
        (proposal(action="PARTIAL_CLOSE", qty=D("0.2")), D("-2"), D("0.2")),
        (proposal(action="PARTIAL_CLOSE", qty=D("5")), D("2"), D("5")),  # not clamped here: P3.3 clamps
        (proposal(action="PARTIAL_CLOSE", close_pct=D(25)), D("2"), D("0.5")),
        (proposal(action="PARTIAL_CLOSE", close_pct=D(25)), D("-2"), D("0.5")),
        (proposal(action="PARTIAL_CLOSE", close_pct=D(100)), D("0.003"), D("0.003")),
        (proposal(action="PARTIAL_CLOSE", close_pct=D("33.3")), D("0.003"), D("0.000999")),
    ],
)
def test_requested_qty(prop: Proposal, position: Decimal, qty: Decimal) -> None:
    assert requested_qty(prop, position) == qty
    assert plan_for(prop, ctx(position)).qty == qty


def test_close_and_order_side() -> None:
    assert close_side(D("0.001")) == "LONG"
    assert close_side(D("-0.001")) == "SHORT"
    assert close_side(D(0)) == "NONE"
    assert order_side("LONG") == "SELL"
    assert order_side("SHORT") == "BUY"


# --- ids --------------------------------------------------------------------------------------------------


def test_plan_id_for_is_deterministic_hex_and_depends_on_the_proposal_id_only() -> None:
    first = plan_id_for("prop-1")
    assert first == plan_id_for("prop-1")  # a redelivery, or the client's retry in a new entry: one plan
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert plan_id_for("prop-2") != first
    assert refusal_plan_id("1700000000000-0", "prop-1") not in (first, refusal_plan_id("1700000000000-1", "prop-1"))


@given(proposal_id=st.from_regex(PROPOSAL_ID_PATTERN, fullmatch=True))
def test_every_valid_proposal_id_leads_from_its_order_back_to_its_plan(proposal_id: str) -> None:
    cid = client_order_id(proposal_id)
    assert BINANCE_CLIENT_ID.match(cid) and len(cid) <= 36
    assert proposal_id_of_order(cid) == proposal_id
    plan = make_plan(
        Proposal(proposal_id=proposal_id, symbol="BTCUSDT", action="FULL_CLOSE"),
        PlanningContext(frozenset({"BTCUSDT"}), D("0.5")),
        plan_id_for(proposal_id),
        1.0,
    )
    assert plan_client_order_id(plan) == cid


def test_orders_not_of_ours_lead_to_no_proposal() -> None:
    for other in ("autoclose-123", "adl_autoclose", "web_abc", "qt-", "qt-" + "x" * 33, "qt-a b", "QT-abc"):
        assert proposal_id_of_order(other) is None, other


def test_a_plan_from_before_ids_were_keys_keeps_its_client_order_id() -> None:
    legacy = msgspec.structs.replace(plan_for(proposal(), ctx()), plan_id="ab" * 8)
    assert plan_client_order_id(legacy) == "qt-" + "ab" * 8


def test_one_request_whatever_the_retry_changes_and_another_when_the_ask_changes() -> None:
    base = Proposal(proposal_id="p", symbol="BTCUSDT", action="PARTIAL_CLOSE", qty=D("0.010"), created_at=1.0)
    same = [
        msgspec.structs.replace(base, created_at=2.0, source="retry", kill_score=0.3),
        msgspec.structs.replace(base, qty=D("0.01")),
        msgspec.structs.replace(base, qty=D("1E-2")),
    ]
    assert {request_of(p) for p in same} == {request_of(base)}
    other = [
        msgspec.structs.replace(base, symbol="ETHUSDT"),
        msgspec.structs.replace(base, qty=D("0.02")),
        Proposal(proposal_id="p", symbol="BTCUSDT", action="PARTIAL_CLOSE", close_pct=D("0.01")),
        Proposal(proposal_id="p", symbol="BTCUSDT", action="FULL_CLOSE"),
    ]
    assert len({request_of(p) for p in [base, *other]}) == 5
    full = Proposal(proposal_id="p", symbol="BTCUSDT", action="FULL_CLOSE", qty=D(3))
    assert request_of(full) == request_of(msgspec.structs.replace(full, qty=None))  # a FULL_CLOSE has no size


def test_a_refused_proposal_is_a_skip_whatever_else_holds() -> None:
    proposal = Proposal(proposal_id="p", symbol="BTCUSDT", action="FULL_CLOSE")
    ctx = PlanningContext(frozenset({"BTCUSDT"}), D("0.5"), refusal=reasons.PROPOSAL_ID_CONFLICT)
    plan = make_plan(proposal, ctx, refusal_plan_id("1-0", "p"), 1.0)
    assert (plan.decision, plan.reason, plan.steps) == ("SKIP", reasons.PROPOSAL_ID_CONFLICT, "[]")


# --- plan hash --------------------------------------------------------------------------------------------


def test_plan_hash_is_sha256_hex_and_stable() -> None:
    plan = plan_for(proposal(), ctx())
    assert re.fullmatch(r"[0-9a-f]{64}", plan.plan_hash)
    assert plan_hash(plan) == plan.plan_hash
    assert plan_for(proposal(), ctx()).plan_hash == plan.plan_hash  # same inputs, same hash
    assert make_plan(proposal(), ctx(), PLAN_ID, NOW + 1).plan_hash != plan.plan_hash


def test_plan_hash_ok_for_made_plans() -> None:
    for p, c in [
        (proposal(), ctx()),
        (proposal(), ctx(None)),
        (proposal(symbol="DOGEUSDT"), ctx()),
        (proposal(action="PARTIAL_CLOSE", close_pct=D("12.5")), ctx(D("-4"))),
    ]:
        assert plan_hash_ok(plan_for(p, c))


_HEX16 = st.from_regex(r"[0-9a-f]{16}", fullmatch=True)
_HEX64 = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)

# For each field, values that keep the plan valid (EXECUTE, LONG, qty > 0) and change its wire text.
_CHANGES: dict[str, st.SearchStrategy[Any]] = {
    "plan_id": _HEX16,
    "proposal_id": st.text(min_size=1, max_size=128),
    "symbol": st.from_regex(r"[A-Z0-9]{5,20}", fullmatch=True),
    "side": st.just("SHORT"),
    "action": st.just("PARTIAL_CLOSE"),
    "qty": st.decimals(min_value=D("0.00000001"), max_value=10**6, places=8, allow_nan=False, allow_infinity=False),
    "decision": st.just("SKIP"),
    "reason": st.text(min_size=1, max_size=256),
    "steps": st.text(min_size=1, max_size=200),
    "plan_hash": _HEX64,
    "created_at": st.floats(allow_nan=False, allow_infinity=False),
}


@given(data=st.data(), field=st.sampled_from(sorted(_CHANGES)))
def test_plan_hash_ok_false_after_any_single_change(data: st.DataObject, field: str) -> None:
    plan = plan_for(proposal(), ctx(D("0.5")))
    original_text = to_fields(plan)[field]
    value = data.draw(_CHANGES[field].filter(lambda v: to_fields_text(field, v) != original_text))
    changed = msgspec.structs.replace(plan, **{field: value})
    assert not plan_hash_ok(changed)
    assert not plan_hash_ok(from_fields(Plan, to_fields(changed)))


def to_fields_text(field: str, value: Any) -> str:
    plan = msgspec.structs.replace(plan_for(proposal(), ctx(D("0.5"))), **{field: value})
    return to_fields(plan)[field]


def test_plan_hash_covers_numerically_equal_rewrites() -> None:
    # "0.5" and "0.50" are the same quantity but not the same plan text: a rewrite is still a change.
    plan = plan_for(proposal(), ctx(D("0.5")))
    assert not plan_hash_ok(msgspec.structs.replace(plan, qty=D("0.50")))
