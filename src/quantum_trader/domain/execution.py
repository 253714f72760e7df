"""What to do after sending an order whose outcome is not known: the pure rules of the order path.

A market order's client id is unique only among OPEN orders, and a market order is never open for long, so a
resent order with the same id is a second order. Hence, after an unclear send, the order is looked up by its
client id, and a resend happens only when all of these hold:

- the exchange says definitively that no such order exists (-2013);
- the first request can no longer execute: Binance USD-M checks ``timestamp + recvWindow`` twice, at the
  gateway (-1021) and again in the matching engine (-5028 "Timestamp for this request is outside of the ME
  recvWindow"), so a request signed at ``t`` cannot execute after ``t + recvWindow`` on the exchange's clock;
  ``t`` is the timestamp the request carried (signed just before it left), plus the measured error of this
  host's reading of the exchange clock (domain/clocks.py: re-measured right before the verdict) and, for sends
  another host may have made, the difference between the two hosts' clocks, plus a margin for the exchange's
  own processing;
- the failure was not one Binance documents as "execution status unknown" (-1000, -1006, -1007): those are
  looked up for the late-execution horizon and never resent (a close that may be executing is not doubled);
- the record allows a resend at all (``may_resend``: not after an acknowledgement, nor when the sends are not
  known, as after a restart or a store that forgot them), this is the first resend, and the plan's permit
  window is still open.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

# Binance: "execution status unknown" - the request passed the gateway; it may still execute.
MAY_EXECUTE_LATE = frozenset({-1000, -1006, -1007})
# Binance order statuses that will not change any more.
FINAL_STATUSES = frozenset({"FILLED", "CANCELED", "EXPIRED", "REJECTED", "EXPIRED_IN_MATCH"})
# The exchange's own processing after its window check, until an order it executed shows in lookups (the clock
# error is measured and added on its own: SendRecord.clock_error_ms).
CLOCK_MARGIN_MS = 250
# After "execution status unknown", how long an order may still appear in the exchange's records. The matching
# engine's recvWindow check already bounds it to the request's recvWindow; this is a margin on top of that.
LATE_EXECUTION_HORIZON_MS = 10_000


class Step(Enum):
    """What to do when the exchange says no order has our client id."""

    QUERY_LATER = "query_later"  # a request may still land until then: ask again
    RESEND = "resend"  # proven absent and unable to land: send once more now
    NOT_PLACED = "not_placed"  # final: nothing was traded


@dataclass(frozen=True, slots=True)
class SendRecord:
    """One order's sending history, in exchange-clock milliseconds."""

    attempts: int
    last_signed_ms: float  # the timestamp the last request carried (or the latest it can have carried)
    recv_window_ms: int
    window_end_ms: float
    may_resend: bool = True
    late_execution_possible: bool = False  # a -1000/-1006/-1007 was seen, or the sends are not known
    max_attempts: int = 2
    late_horizon_ms: int = LATE_EXECUTION_HORIZON_MS
    # how far the timestamps above may be off: this host's error to the exchange clock, plus, for sends another
    # host may have made (``unseen``), the difference between the hosts' clocks (domain/clocks.py)
    clock_error_ms: float = 0.0
    unseen_sends: bool = False

    @classmethod
    def unseen(
        cls, signed_before_ms: float, recv_window_ms: int, late_horizon_ms: int, clock_error_ms: float = 0.0
    ) -> SendRecord:
        """Sends this process did not see (a restart, a racing handler, a store that forgot them): when, with
        what answer and how often is unknown, only that none was signed after ``signed_before_ms``. Look up
        only, never resend, and only call it absent once even a late execution could no longer show."""
        return cls(
            attempts=0,
            last_signed_ms=signed_before_ms,
            recv_window_ms=recv_window_ms,
            window_end_ms=0,
            may_resend=False,
            late_execution_possible=True,
            late_horizon_ms=late_horizon_ms,
            clock_error_ms=clock_error_ms,
            unseen_sends=True,
        )

    @property
    def settles_at_ms(self) -> float:
        """From when "no such order" is final: the last request can no longer execute or show."""
        horizon = max(
            self.recv_window_ms + CLOCK_MARGIN_MS, self.late_horizon_ms if self.late_execution_possible else 0
        )
        return self.last_signed_ms + horizon + self.clock_error_ms

    def unclear(self, code: int, signed_at_ms: float) -> SendRecord:
        """The record after an unclear outcome (``code`` 0 when there was no Binance code) of a request that
        carried the timestamp ``signed_at_ms``."""
        late = self.late_execution_possible or code in MAY_EXECUTE_LATE
        return replace(
            self,
            last_signed_ms=max(self.last_signed_ms, signed_at_ms),
            late_execution_possible=late,
            may_resend=self.may_resend and not late,
        )

    def acknowledged(self, now_ms: float) -> SendRecord:
        """The exchange took the order (an ACK or an open order) by ``now_ms``: it exists, so it is never sent
        again, and a lookup that does not find it yet (the exchange's records can lag its answer) is not the
        end of it until the late-execution horizon after that moment."""
        return replace(
            self, may_resend=False, late_execution_possible=True, last_signed_ms=max(self.last_signed_ms, now_ms)
        )

    def resent(self, signed_at_ms: float) -> SendRecord:
        return replace(self, attempts=self.attempts + 1, last_signed_ms=signed_at_ms)

    def with_clocks(self, own_error_ms: float, host_gap_ms: float) -> SendRecord:
        """The record with the clock error as measured now: this host's error to the exchange clock, plus the
        largest difference to another Apply host's clock when another host may have sent (never less than the
        error it was made with)."""
        error = own_error_ms + (host_gap_ms if self.unseen_sends else 0.0)
        return replace(self, clock_error_ms=max(self.clock_error_ms, error))


def after_absent(record: SendRecord, now_ms: float) -> tuple[Step, float]:
    """The exchange says no order has our client id. Returns (step, when in ms)."""
    if now_ms < record.settles_at_ms:
        return Step.QUERY_LATER, record.settles_at_ms
    if record.may_resend and record.attempts < record.max_attempts and now_ms < record.window_end_ms:
        return Step.RESEND, now_ms
    return Step.NOT_PLACED, now_ms


def is_final(status: str) -> bool:
    return status in FINAL_STATUSES
