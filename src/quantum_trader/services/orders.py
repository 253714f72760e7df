"""Sending one reduce-only order and finding out, for certain, what became of it.

The decisions are in ``domain.execution`` (pure); this is the loop that carries them out against the exchange:
send; on a definitive answer stop; on an unclear one look the order up by its client id until it is found in
a final state, or proven absent (then at most one resend, inside the permit window), or the lookups run out
(unknown: the intent stays recorded and is resolved again after a restart).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Literal

from quantum_trader.domain.execution import LATE_EXECUTION_HORIZON_MS, SendRecord, after_absent, is_final
from quantum_trader.exchange.base import (
    Exchange,
    ExchangeBanned,
    ExchangeError,
    ExchangeRejected,
    OrderReport,
    OutcomeUnknown,
    Throttled,
)
from quantum_trader.exchange.errors import RETRYABLE_REJECTION_CODES

OutcomeKind = Literal["filled", "not_filled", "rejected", "not_placed", "unknown", "banned", "throttled"]

RESOLVE_TIMEOUT_S = 30.0  # how long lookups may fail before the outcome is called unknown (and left for later)
LOOKUP_SPACING_S = 0.2  # between lookups of an order that is still open, and after a failed lookup (doubling)


@dataclass(frozen=True, slots=True)
class OrderOutcome:
    kind: OutcomeKind
    report: OrderReport | None = None
    code: int = 0
    message: str = ""
    attempts: int = 1

    @classmethod
    def of(cls, report: OrderReport, attempts: int = 1) -> OrderOutcome:
        return cls("filled" if report.filled else "not_filled", report, attempts=attempts)


class OrderExecutor:
    def __init__(
        self,
        exchange: Exchange,
        log: Any,
        resolve_timeout_s: float = RESOLVE_TIMEOUT_S,
        late_horizon_ms: int = LATE_EXECUTION_HORIZON_MS,
    ) -> None:
        self.exchange = exchange
        self.log = log
        self.resolve_timeout_s = resolve_timeout_s
        self.late_horizon_ms = late_horizon_ms

    async def execute(
        self, symbol: str, side: str, qty: Decimal, client_order_id: str, window_end_ms: float
    ) -> OrderOutcome:
        """Place the order; resend at most once, and only when it is proven absent and cannot land any more."""
        record = SendRecord(
            1,
            self.exchange.now_ms(),
            self.exchange.order_recv_window_ms,
            window_end_ms,
            late_horizon_ms=self.late_horizon_ms,
        )
        while True:
            try:
                report = await self.exchange.place_reduce_only_market(
                    symbol, side, qty, client_order_id, deadline_ms=window_end_ms
                )
            except ExchangeBanned as exc:
                return OrderOutcome("banned", code=418, message=exc.message, attempts=record.attempts)
            except Throttled as exc:
                return OrderOutcome("throttled", message=exc.message, attempts=record.attempts)
            except ExchangeRejected as exc:
                now = self.exchange.now_ms()
                if (
                    exc.code in RETRYABLE_REJECTION_CODES
                    and record.attempts < record.max_attempts
                    and now < window_end_ms
                ):
                    self.log.warning("order refused before processing; sending again", code=exc.code, msg=exc.message)
                    record = record.resent(now)
                    continue
                return OrderOutcome("rejected", code=exc.code, message=exc.message, attempts=record.attempts)
            except OutcomeUnknown as exc:
                self.log.warning("order outcome unknown; looking it up by client order id", error=exc.message)
                record = record.unclear(exc.code)
                resolved = await self.resolve(symbol, client_order_id, record)
                if resolved == "resend":
                    self.log.warning("order proven absent and past its recvWindow; sending it once more")
                    record = record.resent(self.exchange.now_ms())
                    continue
                return resolved
            if not is_final(report.status):  # ACK-style reply: follow it to its final state
                return await self._finish(symbol, client_order_id, record)
            return OrderOutcome.of(report, record.attempts)

    async def resolve(self, symbol: str, client_order_id: str, record: SendRecord) -> OrderOutcome | Literal["resend"]:
        """What became of the order: look it up by client id, never resend on our own initiative."""
        deadline = time.monotonic() + self.resolve_timeout_s
        spacing = LOOKUP_SPACING_S
        last_error = ""
        while True:
            try:
                report = await self.exchange.query_order(symbol, client_order_id)
            except ExchangeBanned as exc:
                return OrderOutcome("unknown", code=418, message=exc.message, attempts=record.attempts)
            except ExchangeError as exc:
                last_error = exc.message
                if time.monotonic() > deadline:
                    return OrderOutcome("unknown", code=exc.code, message=last_error[:200], attempts=record.attempts)
                await asyncio.sleep(spacing)
                spacing = min(spacing * 2, 2.0)
                continue
            if report is not None:
                if is_final(report.status):
                    return OrderOutcome.of(report, record.attempts)
                await asyncio.sleep(LOOKUP_SPACING_S)
                continue
            step, when_ms = after_absent(record, self.exchange.now_ms())
            if step == "query_later":
                await asyncio.sleep(max(0.0, when_ms - self.exchange.now_ms()) / 1000)
                continue
            if step == "resend":
                return "resend"
            return OrderOutcome("not_placed", attempts=record.attempts)

    async def _finish(self, symbol: str, client_order_id: str, record: SendRecord) -> OrderOutcome:
        # The order was acknowledged, so it exists: whatever a lookup says, it is never sent again.
        outcome = await self.resolve(symbol, client_order_id, replace(record, attempts=record.max_attempts))
        return outcome if outcome != "resend" else OrderOutcome("unknown", attempts=record.attempts)
