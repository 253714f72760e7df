"""Apply's intent sweep: every few seconds (and at start), orders whose outcome is still unestablished are
looked up by client id; and, while the store's instance has not had it, the exchange is searched for orders
the store forgot. Covers what a redelivered proposal does not: an unknown outcome that outlived its plan's
handler, intents of a consumer that no longer exists (renamed host), orders whose proposal is forgotten too.
Never resends. One intent that cannot be resolved (the exchange, the store, an unreadable record) does not hold
back the others."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from quantum_trader.bus import keys
from quantum_trader.clock import Clock
from quantum_trader.domain.execution import is_final
from quantum_trader.domain.planning import is_plan_id, plan_id_for, proposal_id_of_order
from quantum_trader.exchange.base import ExchangeError
from quantum_trader.services.apply.handler import PlanHandler
from quantum_trader.services.apply.orders import OrderOutcome
from quantum_trader.services.apply.plan_run import PlanRun, read_markers
from quantum_trader.services.apply.results import plan_stub
from quantum_trader.services.consumer import STORE_ERRORS

INTENT_SWEEP_S = 5.0  # how often orders with an unestablished outcome are looked up again
# The search for orders a forgetful store lost: from a minute before its newest surviving proposal (the two
# clocks differ by milliseconds, a minute covers any skew), and never further back than the plans' bookkeeping
# lives (beyond it, results of old plans are gone from the store on purpose: they must not be re-published).
ORPHAN_SEARCH_MARGIN_S = 60.0
ORPHAN_SEARCH_MAX_S = keys.PLAN_BOOKKEEPING_TTL_S - 3600


class IntentSweeper:
    def __init__(self, handler: PlanHandler, log: Any, clock: Clock) -> None:
        self.handler = handler
        self.redis = handler.redis
        self.log = log
        self._clock = clock
        self.orphan_search = asyncio.Event()  # set while the store instance's forgotten orders are not searched
        self._wake = asyncio.Event()

    def search_needed(self) -> None:
        """The store is an instance nobody searched yet: search now (new proposals wait: ExchangeTruth.searched)."""
        self.handler.truth.searched.clear()
        self.orphan_search.set()
        self._wake.set()

    async def run(self) -> None:
        handler = self.handler
        # Older than a whole window plus a whole resolution: no live handler is still working on it (by the
        # clock of the host that recorded it: the hosts' clocks may differ by up to the bound Apply keeps them to)
        stale_s = (
            handler.wait_s
            + handler.executor.resolve_timeout_s
            + 1
            + handler.settings.apply.max_host_clock_gap_ms / 1000
        )
        interval = min(INTENT_SWEEP_S, max(0.5, handler.executor.resolve_timeout_s / 2))
        while True:
            pause = interval
            if self.orphan_search.is_set():
                with self._step("the search for orders the store forgot"):
                    if await self.adopt_orphans():
                        self.orphan_search.clear()
                    elif (until_settled := self._until_settled_s()) > 0:
                        pause = min(interval, max(0.05, until_settled))  # again once they have all shown
            due: list[str] = []
            with self._step("the intents"):
                due = await self.redis.zrangebyscore(keys.APPLY_INTENTS, "-inf", self._clock.wall() - stale_s)
                handler.metrics.unresolved.set(await self.redis.zcard(keys.APPLY_INTENTS))
            for plan_id in due:
                if plan_id not in handler.executing:
                    with self._step(f"intent {plan_id}"):
                        await self.resolve_intent(plan_id)
            with self._step("the store's replication"):  # what the alerts on replicas and failovers read
                replication = await self.redis.info("replication")
                handler.metrics.store_replicas.set(int(replication.get("connected_slaves", 0)))
                epoch = handler.truth.watch.epoch
                handler.metrics.store_promoted.set(1 if epoch is not None and epoch.promoted else 0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), pause)

    def _until_settled_s(self) -> float:
        """Seconds until no order request from before the store's instance began can execute or show any more."""
        truth = self.handler.truth
        return (truth.unseen_sends(None).settles_at_ms - truth.exchange.now_ms()) / 1000

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[None]:
        """One step of the sweep: whatever it raises is logged and the sweep goes on (next step, next round)."""
        try:
            yield
        except STORE_ERRORS as exc:
            self.log.warning(f"intent sweep: store unavailable ({what})", error=str(exc))
        except Exception:  # (the exchange's failures are handled inside each step: lookups retry, searches resume)
            self.log.exception(f"intent sweep: {what} failed; trying again next round")

    async def resolve_intent(self, plan_id: str) -> None:
        markers = await read_markers(self.redis, plan_id)
        plan = markers.plan
        if markers.has_result or plan is None:
            await self.redis.zrem(keys.APPLY_INTENTS, plan_id)  # done, or its bookkeeping expired
            return
        log = self.log.bind(plan_id=plan_id, symbol=plan.symbol)
        self.handler.executing.add(plan_id)
        try:
            await self.handler.recover(plan, markers.proposal_entry_id, markers.executed, log)
        finally:
            self.handler.executing.discard(plan_id)

    async def adopt_orphans(self) -> bool:
        """On a store instance nobody had searched yet: orders of ours on the exchange whose plan the store has
        no result for, not even an intent (its proposal may be forgotten too, so no redelivery would bring it
        back), get their result from the exchange. Searched from a minute before the newest proposal the
        instance kept of what came before it (whatever it forgot, and so its orders, came after that), at most
        a day back. Complete once every symbol was searched, no order found was still open or in a handler's
        hands, and the search began after every order request from before the instance could have shown
        (``SendRecord.unseen``); then it is recorded in the epoch and new proposals go on (until then they
        wait: a retry of a proposal whose plan's order is among these must find it, not plan it again).
        Returns True when complete; False: search again later."""
        truth = self.handler.truth
        watch = truth.watch
        epoch = watch.epoch
        if epoch is None:
            return False
        settled = self._until_settled_s() <= 0  # measured before the search: what it finds is all there is
        since_ms = max(epoch.kept[0], (self._clock.wall() - ORPHAN_SEARCH_MAX_S) * 1000) - ORPHAN_SEARCH_MARGIN_S * 1000
        adopted, complete = 0, True
        for symbol in sorted(self.handler.allowlist):
            try:
                found = await self.handler.truth.exchange.orders_since(symbol, since_ms)
            except ExchangeError as exc:
                self.log.warning(f"{symbol}: cannot search for forgotten orders now", error=exc.message)
                complete = False
                continue
            for report in found:
                proposal_id = proposal_id_of_order(report.client_order_id)
                if proposal_id is None:
                    continue  # not ours (a manual order, a liquidation, another bot)
                plan_id = plan_id_for(proposal_id)
                if plan_id in self.handler.executing:
                    complete = False  # a handler here is on it: looked at again if it has no result by then
                    continue
                if await self._legacy_plan_known(proposal_id):
                    continue
                if not is_final(report.status):
                    complete = False  # still open: looked at again in the next search
                    continue
                markers = await read_markers(self.redis, plan_id)
                if markers.has_result or markers.executed:  # done, or the intent's resolution will publish it
                    continue
                log = self.log.bind(plan_id=plan_id, symbol=symbol)
                stand_in = markers.plan or plan_stub(plan_id, proposal_id, symbol, "NONE", self._clock.wall())
                run = PlanRun(stand_in, markers.proposal_entry_id, log, epoch)
                await self.handler.adopt(run, OrderOutcome.of(report))
                adopted += 1
        self.log.info(
            "searched the exchange for orders the store forgot", adopted=adopted, complete=complete and settled
        )
        if not (complete and settled) or not epoch.same_as(watch.epoch):
            return False  # (the store changed during the search: the new instance is searched from its own start)
        if not await watch.mark_searched(self.redis, epoch):
            return False
        truth.searched.set()
        return True

    async def _legacy_plan_known(self, proposal_id: str) -> bool:
        """Orders sent before proposal ids became idempotency keys were ``qt-<plan id>``: such an order whose
        plan the store knows (a result, or an intent being resolved) is no orphan."""
        if not is_plan_id(proposal_id):
            return False
        legacy = await read_markers(self.redis, proposal_id)
        return legacy.has_result or legacy.executed is not None
