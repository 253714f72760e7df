"""What to do after sending an order whose outcome is not known: the pure rules of the order path.

A market order's client id is unique only among OPEN orders, and a market order is never open for long, so a
resent order with the same id is a second order. Hence, after an unclear send, the order is looked up by its
client id, and a resend happens only when all of these hold:

- the exchange says definitively that no such order exists (-2013);
- the first request can no longer be accepted: its ``recvWindow`` has passed on the exchange's clock (plus a
  margin for clock error), so a request still travelling would be refused with -1021;
- the failure was not one Binance documents as "execution status unknown" (-1000, -1006, -1007): those passed
  the gateway and may execute late, so they are looked up for ``LATE_EXECUTION_HORIZON_MS`` and never resent;
- this is the first resend, and the plan's permit window is still open.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

# Binance: "execution status unknown" - the request passed the gateway; it may still execute.
MAY_EXECUTE_LATE = frozenset({-1000, -1006, -1007})
# Binance order statuses that will not change any more.
FINAL_STATUSES = frozenset({"FILLED", "CANCELED", "EXPIRED", "REJECTED", "EXPIRED_IN_MATCH"})
CLOCK_MARGIN_MS = 250  # clock sync error + the exchange's own processing after its window check
# After "execution status unknown", how long an order may still appear in the exchange's records. Binance
# resolves such requests within seconds; past this, absent means absent (and it is never resent).
LATE_EXECUTION_HORIZON_MS = 10_000


@dataclass(frozen=True, slots=True)
class SendRecord:
    """One order's sending history, in exchange-clock milliseconds."""

    attempts: int
    last_sent_ms: float
    recv_window_ms: int
    window_end_ms: float
    late_execution_possible: bool = False  # a -1000/-1006/-1007 was seen for some attempt
    max_attempts: int = 2
    late_horizon_ms: int = LATE_EXECUTION_HORIZON_MS

    @property
    def settles_at_ms(self) -> float:
        """From when "no such order" is final: the last request can no longer be accepted or executed."""
        horizon = self.late_horizon_ms if self.late_execution_possible else self.recv_window_ms + CLOCK_MARGIN_MS
        return self.last_sent_ms + horizon

    def unclear(self, code: int) -> SendRecord:
        """The record after an unclear outcome (``code`` 0 when there was no Binance code)."""
        return replace(self, late_execution_possible=self.late_execution_possible or code in MAY_EXECUTE_LATE)

    def resent(self, now_ms: float) -> SendRecord:
        return replace(self, attempts=self.attempts + 1, last_sent_ms=now_ms)


Step = Literal["query_later", "resend", "not_placed"]


def after_absent(record: SendRecord, now_ms: float) -> tuple[Step, float]:
    """The exchange says no order has our client id. Returns (step, when in ms).

    ``query_later``: ask again at ``when`` (the request may still land until then); ``resend``: send once more
    now; ``not_placed``: final, nothing was traded.
    """
    if now_ms < record.settles_at_ms:
        return "query_later", record.settles_at_ms
    if not record.late_execution_possible and record.attempts < record.max_attempts and now_ms < record.window_end_ms:
        return "resend", now_ms
    return "not_placed", now_ms


def is_final(status: str) -> bool:
    return status in FINAL_STATUSES
