"""The exchange has the last word on "was this plan sent": when the store cannot vouch for a plan (its proposal
is older than the store instance: domain/trust.py), or changed instance while the plan was handled, Apply asks
the exchange for the plan's order (by client id) before it sends, or publishes a result that says none was."""

from __future__ import annotations

import asyncio
from typing import Any

from quantum_trader.bus.identity import StoreWatch
from quantum_trader.clock import Clock
from quantum_trader.domain.execution import SendRecord
from quantum_trader.domain.models import Plan
from quantum_trader.domain.trust import Epoch, prior_sends_signed_before, trusted
from quantum_trader.exchange.base import Exchange
from quantum_trader.services.apply.orders import OrderExecutor, OrderOutcome, OutcomeKind
from quantum_trader.services.apply.plan_run import PlanRun
from quantum_trader.services.consumer import Backoff
from quantum_trader.services.metrics import ApplyMetrics

TRUTH_RETRY_MAX_S = 5.0  # while the exchange cannot say whether a plan's order exists, ask again this often
# How long a new proposal waits for the search for orders a changed store forgot before it is refused
# (search_incomplete): the search completes within the permit window plus the late-execution horizon of a change
# when the exchange answers; a minute without it is a search that cannot finish, and a proposal deserves an answer.
SEARCH_WAIT_S = 60.0


class ExchangeTruth:
    def __init__(
        self,
        watch: StoreWatch,
        exchange: Exchange,
        executor: OrderExecutor,
        metrics: ApplyMetrics,
        clock: Clock,
        wait_s: float,
        fence_s: float = 0.0,
    ) -> None:
        self.watch = watch
        self.exchange = exchange
        self.executor = executor
        self.metrics = metrics
        self._clock = clock
        self._wait_s = wait_s
        self._fence_s = fence_s  # settings.apply.failover_fence_s (domain/trust.py prior_sends_signed_before)
        # Set once the exchange was searched for orders the current store instance forgot (services/apply/
        # sweep.py); until then a proposal the store would vouch for waits (wait_for_search), at most this long.
        self.searched = asyncio.Event()
        self.search_wait_s = SEARCH_WAIT_S

    async def wait_for_search(self, entry_id: str, log: Any) -> bool:
        """Hold a proposal newer than the store instance until the exchange was searched for the orders the
        instance forgot: one of them may be its plan's (a client's retry of a proposal whose records the store
        lost), and the search publishes its result, which the retry must find instead of planning again.
        Older proposals need not wait: the exchange is asked for their plan's order anyway. False: the search
        did not complete within ``search_wait_s`` (the proposal is refused: fail closed, with an answer)."""
        if self.searched.is_set() or self.vouching(entry_id) is None:
            return True
        log.info("waiting for the search for orders the store forgot before planning")
        try:
            await asyncio.wait_for(self.searched.wait(), self.search_wait_s)
        except TimeoutError:
            log.error("the search for orders the store forgot did not complete in time; refusing the proposal")
            return False
        return True

    def read_is_vouched(self, entry_id: str, before: Epoch | None) -> bool:
        """What was read from the store since the epoch was ``before`` may be taken at its word: the store is
        still that instance (a read can be the first to reach another one), and for a proposal it would vouch
        for, the instance's forgotten orders were searched."""
        now = self.watch.epoch
        if before is None or now is None:
            return before is now
        return before.same_as(now) and (self.searched.is_set() or self.vouching(entry_id) is None)

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
        signed_before = prior_sends_signed_before(self.watch.epoch, plan_created_at, self._wait_s, now, self._fence_s)
        clocks = self.executor.clocks()  # the times it rests on may be another host's: the hosts' gap counts
        return SendRecord.unseen(
            signed_before * 1000 - self.skew_ms(),
            self.exchange.order_recv_window_ms,
            self.executor.late_horizon_ms,
            clock_error_ms=clocks.own_error_ms + clocks.host_gap_ms,
        )

    async def ask(
        self, plan_id: str, coid: str, symbol: str, plan: Plan | None, log: Any, why: str
    ) -> OrderOutcome | None:
        """The order the exchange has with the plan's client id ``coid`` (final), or None once it is proven that
        none exists and none can still execute. While the exchange cannot answer, ask again: nothing is planned,
        sent or published for the plan meanwhile (fail closed)."""
        self.metrics.lookups.labels(why).inc()
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
