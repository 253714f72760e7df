"""The exchange has the last word on "was this plan sent": when the store cannot vouch for a plan (its proposal
is older than the store instance: domain/trust.py), or changed instance while the plan was handled, Apply asks
the exchange for the plan's order (by client id) before it sends, or publishes a result that says none was."""

from __future__ import annotations

from typing import Any

from quantum_trader.bus.identity import StoreWatch
from quantum_trader.clock import Clock
from quantum_trader.domain.execution import SendRecord
from quantum_trader.domain.models import Plan
from quantum_trader.domain.planning import client_order_id
from quantum_trader.domain.trust import Epoch, prior_sends_signed_before, trusted
from quantum_trader.exchange.base import Exchange
from quantum_trader.services.apply.orders import OrderExecutor, OrderOutcome, OutcomeKind
from quantum_trader.services.apply.plan_run import PlanRun
from quantum_trader.services.consumer import Backoff
from quantum_trader.services.metrics import ApplyMetrics

TRUTH_RETRY_MAX_S = 5.0  # while the exchange cannot say whether a plan's order exists, ask again this often


class ExchangeTruth:
    def __init__(
        self,
        watch: StoreWatch,
        exchange: Exchange,
        executor: OrderExecutor,
        metrics: ApplyMetrics,
        clock: Clock,
        wait_s: float,
    ) -> None:
        self.watch = watch
        self.exchange = exchange
        self.executor = executor
        self.metrics = metrics
        self._clock = clock
        self._wait_s = wait_s

    def vouching(self, entry_id: str) -> Epoch | None:
        """The current epoch if the store can vouch for the plan of this proposal entry, else None."""
        epoch = self.watch.epoch
        return epoch if trusted(epoch, entry_id, self._clock.wall()) else None

    def still_vouched(self, run: PlanRun) -> bool:
        return run.vouched is not None and run.vouched.same_as(self.watch.epoch)

    def skew_ms(self) -> float:
        return self._clock.wall() * 1000 - self.exchange.now_ms()

    def unseen_sends(self, plan_created_at: float | None) -> SendRecord:
        """The sends of a plan this process did not see, as far as they can be bounded (domain/trust.py)."""
        now = self._clock.wall()
        signed_before = prior_sends_signed_before(self.watch.epoch, plan_created_at, self._wait_s, now)
        return SendRecord.unseen(
            signed_before * 1000 - self.skew_ms(),
            self.exchange.order_recv_window_ms,
            self.executor.late_horizon_ms,
        )

    async def ask(self, plan_id: str, symbol: str, plan: Plan | None, log: Any, why: str) -> OrderOutcome | None:
        """The order the exchange has with the plan's client id (final), or None once it is proven that none
        exists and none can still execute. While the exchange cannot answer, ask again: nothing is planned,
        sent or published for the plan meanwhile (fail closed)."""
        self.metrics.lookups.labels(why).inc()
        coid = client_order_id(plan_id)
        backoff = Backoff(start_s=0.5, max_s=TRUTH_RETRY_MAX_S)
        while True:
            outcome = await self.executor.follow(symbol, coid, self.unseen_sends(plan.created_at if plan else None))
            if outcome.kind is OutcomeKind.NOT_PLACED:
                return None
            if outcome.exists:
                return outcome
            log.warning(
                f"{symbol}: cannot tell whether plan {plan_id} has an order; asking again", error=outcome.message
            )
            await backoff.wait()
