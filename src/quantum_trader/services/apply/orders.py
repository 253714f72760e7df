"""Sending one reduce-only order and finding out, for certain, what became of it.

The decisions are in ``domain.execution`` (pure); this is the loop that carries them out against the exchange:
send; on a definitive answer stop; on an unclear one look the order up by its client id until it is found in
a final state, or proven absent (then at most one resend, inside the permit window), or the lookups run out
(unknown: the intent stays recorded and is resolved again later, never resent).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

from quantum_trader.clock import SYSTEM_CLOCK, Clock
from quantum_trader.domain.clocks import ClockState, judge
from quantum_trader.domain.execution import LATE_EXECUTION_HORIZON_MS, SendRecord, Step, after_absent, is_final
from quantum_trader.exchange.base import (
    Exchange,
    ExchangeBanned,
    ExchangeError,
    ExchangeRejected,
    NotSent,
    OrderReport,
    OutcomeUnknown,
    Throttled,
)
from quantum_trader.exchange.errors import RETRYABLE_REJECTION_CODES
from quantum_trader.services.apply.pushed_orders import PushedOrders

RESOLVE_TIMEOUT_S = 30.0  # how long lookups may fail before the outcome is called unknown (and left for later)
LOOKUP_SPACING_S = 0.2  # between lookups of an order that is still open, and after a failed lookup (doubling)
LOOKUP_SPACING_MAX_S = 2.0


class OutcomeKind(StrEnum):
    FILLED = "filled"  # the order exists and executed (fully or partly)
    NOT_FILLED = "not_filled"  # the order exists and ended without a fill (expired, cancelled)
    REJECTED = "rejected"  # the exchange refused it: no order
    NOT_PLACED = "not_placed"  # proven absent, and no request of it can still execute
    NOT_SENT = "not_sent"  # the permit window closed before the request could leave: nothing was sent
    UNKNOWN = "unknown"  # could not be established (lookups failing): no result yet, the symbol stays held
    BANNED = "banned"  # not sent: the exchange banned this IP
    THROTTLED = "throttled"  # not sent: the rate limits left no room inside the window


@dataclass(frozen=True, slots=True)
class OrderOutcome:
    kind: OutcomeKind
    report: OrderReport | None = None
    code: int = 0
    message: str = ""
    attempts: int = 1

    @classmethod
    def of(cls, report: OrderReport, attempts: int = 1) -> OrderOutcome:
        return cls(OutcomeKind.FILLED if report.filled else OutcomeKind.NOT_FILLED, report, attempts=attempts)

    @property
    def exists(self) -> bool:
        """An order with the plan's client id is on the exchange."""
        return self.report is not None


Resolution = OrderOutcome | Literal[Step.RESEND]


class OrderExecutor:
    def __init__(
        self,
        exchange: Exchange,
        log: Any,
        resolve_timeout_s: float = RESOLVE_TIMEOUT_S,
        late_horizon_ms: int = LATE_EXECUTION_HORIZON_MS,
        clock: Clock = SYSTEM_CLOCK,
        clocks: Callable[[], ClockState] | None = None,
        pushed: PushedOrders | None = None,
    ) -> None:
        self.exchange = exchange
        self.log = log
        self.resolve_timeout_s = resolve_timeout_s
        self.late_horizon_ms = late_horizon_ms
        self.clock = clock
        # what the clocks allow (Apply: services/apply/clocks.py, with the other hosts'); by default this host's
        # own reading, unbounded
        self.clocks = clocks or self._own_clock
        # the user-data stream's view of the chain's orders (services/apply/pushed_orders.py); None: lookups only
        self.pushed = pushed

    def _own_clock(self) -> ClockState:
        reading = self.exchange.clock_reading()
        return judge(reading, [], self.clock.wall(), max_error_ms=math.inf, max_host_gap_ms=math.inf)

    async def execute(
        self, symbol: str, side: str, qty: Decimal, client_order_id: str, window_end_ms: float
    ) -> OrderOutcome:
        """Place the order; resend at most once, and only when it is proven absent and cannot execute any more."""
        record = SendRecord(
            1, 0.0, self.exchange.order_recv_window_ms, window_end_ms, late_horizon_ms=self.late_horizon_ms
        )
        while True:
            try:
                report = await self.exchange.place_reduce_only_market(
                    symbol, side, qty, client_order_id, deadline_ms=window_end_ms
                )
            except ExchangeBanned as exc:
                return OrderOutcome(OutcomeKind.BANNED, code=418, message=exc.message, attempts=record.attempts)
            except Throttled as exc:
                return OrderOutcome(OutcomeKind.THROTTLED, message=exc.message, attempts=record.attempts)
            except NotSent as exc:
                # A resend that could not leave in time is the first attempt's outcome, which was established.
                return OrderOutcome(OutcomeKind.NOT_SENT, message=exc.message, attempts=record.attempts)
            except ExchangeRejected as exc:
                now = self.exchange.now_ms()
                if (
                    exc.code in RETRYABLE_REJECTION_CODES
                    and record.attempts < record.max_attempts
                    and now < window_end_ms
                ):
                    self.log.warning("order refused before processing; sending again", code=exc.code, msg=exc.message)
                    record = record.resent(exc.signed_at_ms or now)
                    continue
                return OrderOutcome(OutcomeKind.REJECTED, code=exc.code, message=exc.message, attempts=record.attempts)
            except OutcomeUnknown as exc:
                self.log.warning("order outcome unknown; looking it up by client order id", error=exc.message)
                # not stamped (it failed before the adapter could say): it was signed by now at the latest
                record = record.unclear(exc.code, exc.signed_at_ms or self.exchange.now_ms())
                resolved = await self.resolve(symbol, client_order_id, record)
                if resolved is Step.RESEND:
                    self.log.warning("order proven absent and past its recvWindow; sending it once more")
                    record = record.resent(self.exchange.now_ms())
                    continue
                return resolved
            if not is_final(report.status):  # ACK-style reply: follow it to its final state, never resend
                return await self.follow(symbol, client_order_id, record.acknowledged(self.exchange.now_ms()))
            return OrderOutcome.of(report, record.attempts)

    async def resolve(self, symbol: str, client_order_id: str, record: SendRecord) -> Resolution:
        """What became of the order: look it up by client id; ``Step.RESEND`` only when ``record`` allows it."""
        deadline = self.clock.mono() + self.resolve_timeout_s
        spacing = LOOKUP_SPACING_S
        while True:
            shown = self.pushed.final(client_order_id) if self.pushed is not None else None
            if shown is not None:  # the stream showed it final: no lookup needed
                return OrderOutcome.of(shown, record.attempts)
            try:
                report = await self.exchange.query_order(symbol, client_order_id)
            except ExchangeBanned as exc:
                return OrderOutcome(OutcomeKind.UNKNOWN, code=418, message=exc.message, attempts=record.attempts)
            except ExchangeError as exc:
                if self.clock.mono() > deadline:
                    return OrderOutcome(
                        OutcomeKind.UNKNOWN, code=exc.code, message=exc.message[:200], attempts=record.attempts
                    )
                await self._pause(client_order_id, spacing)
                spacing = min(spacing * 2, LOOKUP_SPACING_MAX_S)
                continue
            if report is not None:
                if is_final(report.status):
                    return OrderOutcome.of(report, record.attempts)
                if self.clock.mono() > deadline:  # found, but not final within the bound: left for later
                    message = f"order {client_order_id} still {report.status}"
                    return OrderOutcome(OutcomeKind.UNKNOWN, message=message, attempts=record.attempts)
                await self._pause(client_order_id, LOOKUP_SPACING_S)
                continue
            step, when_ms = after_absent(record, self.exchange.now_ms())
            if step is not Step.QUERY_LATER:
                # a verdict ("resend", "absent for good") only on the exchange clock measured right now, with
                # its error and the other hosts' in the bound, and only while the clocks are within bounds
                checked = await self._clocks_checked(record)
                if checked is None:
                    if self.clock.mono() > deadline:
                        message = "the clocks are out of bounds: the order is not called absent"
                        return OrderOutcome(OutcomeKind.UNKNOWN, message=message, attempts=record.attempts)
                    await self._pause(client_order_id, spacing)
                    spacing = min(spacing * 2, LOOKUP_SPACING_MAX_S)
                    continue
                record = checked
                step, when_ms = after_absent(record, self.exchange.now_ms())
            if step is Step.QUERY_LATER:
                await self._pause(client_order_id, max(0.0, when_ms - self.exchange.now_ms()) / 1000)
                continue
            shown = self.pushed.seen(client_order_id) if self.pushed is not None else None
            if shown is not None:  # the stream showed the order (while the clocks were measured, or before):
                if is_final(shown.status):  # it exists, whatever the lookup said; never absent, never resent
                    return OrderOutcome.of(shown, record.attempts)
                await self._pause(client_order_id, LOOKUP_SPACING_S)
                continue
            if step is Step.RESEND:
                return Step.RESEND
            return OrderOutcome(OutcomeKind.NOT_PLACED, attempts=record.attempts)

    async def _pause(self, client_order_id: str, seconds: float) -> None:
        """Wait before the next lookup; the stream showing the order final ends the wait early (a state that
        is not final, NEW, says nothing a lookup needs: its fill follows on the stream)."""
        pushed = self.pushed
        if pushed is None:
            await asyncio.sleep(seconds)
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while (left := until - loop.time()) > 0 and pushed.final(client_order_id) is None:
            await pushed.wait(client_order_id, left)

    async def _clocks_checked(self, record: SendRecord) -> SendRecord | None:
        """The record with the clock errors as measured now (the exchange clock re-measured first); None while
        the clocks are out of bounds or the exchange clock cannot be measured (fail closed: no verdict)."""
        try:
            await self.exchange.sync_time()
        except ExchangeError as exc:
            self.log.warning("cannot measure the exchange clock before a verdict; looking again", error=exc.message)
            return None
        state = self.clocks()
        if not state.ok:
            self.log.warning("clocks out of bounds: no order is called absent until they are back", why=state.problem)
            return None
        return record.with_clocks(state.own_error_ms, state.host_gap_ms)

    async def follow(self, symbol: str, client_order_id: str, record: SendRecord) -> OrderOutcome:
        """Look up an order whose sends are not to be repeated (``record.may_resend`` is False) until its
        outcome is established: found final, proven absent after every send could have shown, or unknown."""
        assert not record.may_resend
        outcome = await self.resolve(symbol, client_order_id, record)
        assert outcome is not Step.RESEND  # after_absent never resends a record that may not
        return outcome
