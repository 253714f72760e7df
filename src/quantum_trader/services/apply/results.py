"""A plan's one result: built from the order's report or from why no order was sent, then published with the
proposal's acknowledgement in one script (bus/scripts.py PUBLISH_RESULT), retrying only that step."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from quantum_trader.bus.scripts import Scripts
from quantum_trader.bus.streams import STREAM_MAXLEN
from quantum_trader.clock import Clock
from quantum_trader.domain import reasons
from quantum_trader.domain.models import Plan, Result, to_fields
from quantum_trader.exchange.base import OrderReport
from quantum_trader.services.apply.orders import OutcomeKind
from quantum_trader.services.apply.plan_run import PlanRun
from quantum_trader.services.consumer import STORE_ERRORS, Backoff
from quantum_trader.services.metrics import ApplyMetrics

NOT_EXECUTED = {
    OutcomeKind.REJECTED: reasons.EXCHANGE_REJECTED,
    OutcomeKind.NOT_PLACED: reasons.ORDER_NOT_PLACED,
    OutcomeKind.NOT_SENT: reasons.ORDER_NOT_SENT,
    OutcomeKind.BANNED: reasons.EXCHANGE_BANNED,
    OutcomeKind.THROTTLED: reasons.RATE_LIMITED,
}

Published = Literal["published", "exists", "executed", "store_changed"]


def from_report(plan: Plan, report: OrderReport) -> Result:
    return Result(
        plan_id=plan.plan_id,
        proposal_id=plan.proposal_id,
        symbol=plan.symbol,
        side=plan.side,
        executed=report.filled,
        error="" if report.filled else reasons.ORDER_NOT_FILLED,
        reason=report.status,
        order_id=report.order_id,
        client_order_id=report.client_order_id,
        filled_qty=report.executed_qty,
        avg_price=report.avg_price,
        order_time_ms=report.update_time_ms,
    )


def not_executed(plan: Plan, error: str, **fields: Any) -> Result:
    return Result(
        plan_id=plan.plan_id,
        proposal_id=plan.proposal_id,
        symbol=plan.symbol,
        side=plan.side,
        executed=False,
        error=error,
        **fields,
    )


def replace_result(result: Result, **changes: Any) -> Result:
    return msgspec.structs.replace(result, **changes)


def plan_stub(plan_id: str, proposal_id: str, symbol: str, side: Any, now: float) -> Plan:
    """A stand-in for a plan whose record the store lost, to publish the result of the order found for it
    (under the proposal id the order's client id carries)."""
    return Plan(
        plan_id=plan_id,
        proposal_id=proposal_id,
        symbol=symbol,
        side=side,
        action="FULL_CLOSE",
        qty=0,  # type: ignore[arg-type]
        decision="SKIP",
        reason="",
        steps="[]",
        plan_hash="0" * 64,
        created_at=now,
    )


class ResultPublisher:
    def __init__(self, scripts: Scripts, metrics: ApplyMetrics, clock: Clock) -> None:
        self._scripts = scripts
        self.metrics = metrics
        self._clock = clock

    async def publish(self, run: PlanRun, result: Result, *, no_order: bool, expected_epoch: str = "") -> Published:
        """Publish the plan's one result and acknowledge its proposal. A store error here retries only this
        step: the outcome is established, nothing before it is done again. "executed": refused, the result says
        no order was sent (``no_order``) and the plan's permits were consumed; "store_changed": refused, the
        store is no longer the instance ``expected_epoch`` names (see PUBLISH_RESULT)."""
        plan, log = run.plan, run.log
        backoff = Backoff()
        while True:
            now = self._clock.wall()
            stamped = replace_result(result, at=now, latency_ms=round((now - plan.created_at) * 1000, 3))
            try:
                status = await self._scripts.publish_result(
                    plan_id=plan.plan_id,
                    symbol=plan.symbol,
                    fields=to_fields(stamped),
                    proposal_entry_id=run.entry_id,
                    result_maxlen=STREAM_MAXLEN,
                    no_order=no_order,
                    expected_epoch=expected_epoch,
                )
                break
            except STORE_ERRORS as exc:
                log.warning("store unavailable while publishing a result; retrying it", error=str(exc))
                await backoff.wait()
        if status == "published":
            self.metrics.results.labels("executed" if result.executed else result.error).inc()
            log.info(
                f"{plan.symbol}: Result published (executed={result.executed}, error={result.error or 'none'})",
                filled_qty=str(result.filled_qty),
                order_id=result.order_id,
                latency_ms=stamped.latency_ms,
                adopted=result.adopted,
            )
        return status
