"""services/apply/results.py's pure part: the result a plan's order report, or the reason no order was sent,
makes (exact fields), and the stand-in plan for an order whose plan record the store lost."""

from __future__ import annotations

from decimal import Decimal

from quantum_trader.domain import reasons
from quantum_trader.domain.models import Plan, Result
from quantum_trader.domain.planning import plan_id_for
from quantum_trader.exchange.base import OrderReport
from quantum_trader.services.apply.orders import OutcomeKind
from quantum_trader.services.apply.results import NOT_EXECUTED, from_report, not_executed, plan_stub, replace_result

PLAN = plan_stub(plan_id_for("p-1"), "p-1", "BTCUSDT", "LONG", 1700000000.0)


def test_a_filled_report_is_an_executed_result_with_the_orders_figures() -> None:
    report = OrderReport(
        "42", "qt-" + PLAN.plan_id, "FILLED", Decimal("0.010"), Decimal("65000.5"), "SELL", 1700000000123
    )
    assert from_report(PLAN, report) == Result(
        plan_id=PLAN.plan_id,
        proposal_id="p-1",
        symbol="BTCUSDT",
        side="LONG",
        executed=True,
        error="",
        reason="FILLED",
        order_id="42",
        client_order_id="qt-" + PLAN.plan_id,
        filled_qty=Decimal("0.010"),
        avg_price=Decimal("65000.5"),
        order_time_ms=1700000000123,
    )


def test_a_report_with_nothing_filled_is_not_executed_and_says_so() -> None:
    report = OrderReport("43", "qt-x", "EXPIRED", Decimal(0), Decimal(0))
    result = from_report(PLAN, report)
    assert (result.executed, result.error, result.reason, result.order_id) == (
        False,
        reasons.ORDER_NOT_FILLED,
        "EXPIRED",
        "43",
    )


def test_a_result_without_an_order_carries_the_error_and_the_given_fields() -> None:
    result = not_executed(PLAN, reasons.PERMIT_DENIED, reason="kill_switch", denied_by="Governor")
    assert result == Result(
        plan_id=PLAN.plan_id,
        proposal_id="p-1",
        symbol="BTCUSDT",
        side="LONG",
        executed=False,
        error=reasons.PERMIT_DENIED,
        reason="kill_switch",
        denied_by="Governor",
    )
    assert replace_result(result, at=5.0).at == 5.0 and result.at == 0.0  # a copy, the original unchanged


def test_each_outcome_that_sent_nothing_or_was_refused_has_its_own_reason() -> None:
    assert NOT_EXECUTED == {
        OutcomeKind.REJECTED: reasons.EXCHANGE_REJECTED,
        OutcomeKind.NOT_PLACED: reasons.ORDER_NOT_PLACED,
        OutcomeKind.NOT_SENT: reasons.ORDER_NOT_SENT,
        OutcomeKind.BANNED: reasons.EXCHANGE_BANNED,
        OutcomeKind.THROTTLED: reasons.RATE_LIMITED,
    }
    assert OutcomeKind.UNKNOWN not in NOT_EXECUTED  # an unknown outcome has no result until it is known


def test_the_stand_in_plan_is_a_skip_that_can_never_be_executed() -> None:
    assert (
        Plan(
            plan_id=plan_id_for("p-1"),
            proposal_id="p-1",
            symbol="BTCUSDT",
            side="LONG",
            action="FULL_CLOSE",
            qty=Decimal(0),
            decision="SKIP",
            reason="",
            steps="[]",
            plan_hash="0" * 64,
            created_at=1700000000.0,
        )
        == PLAN
    )
