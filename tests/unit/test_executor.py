"""OrderExecutor's own rules, against a scripted exchange: for each sequence of answers, how many orders it
sends and what it calls the outcome.

Every exchange answer is scripted and comes with the exchange-clock time it is given at, so the executor's
waits (``after_absent``'s "look again at t") are a millisecond each: a lookup scripted just before the moment
an order settles, the next one at it. The monotonic clock is fake too; a lookup may move it past the resolve
deadline. A send or a lookup nobody scripted fails the test (it is an order or a lookup too many).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from decimal import Decimal
from typing import Any

import pytest

from quantum_trader.domain.clocks import ClockState
from quantum_trader.domain.execution import CLOCK_MARGIN_MS, LATE_EXECUTION_HORIZON_MS, MAY_EXECUTE_LATE, SendRecord
from quantum_trader.exchange.base import (
    ExchangeBanned,
    ExchangeError,
    ExchangeRejected,
    ExchangeUnavailable,
    NotSent,
    OrderReport,
    OutcomeUnknown,
    Throttled,
)
from quantum_trader.exchange.errors import REJECTION_CODES, RETRYABLE_REJECTION_CODES
from quantum_trader.services.apply.orders import OrderExecutor, OrderOutcome, OutcomeKind
from scripted import RECV_MS, T0, At, FakeClock, RecordingLog, ScriptedExchange

D = Decimal
SETTLED = T0 + RECV_MS + CLOCK_MARGIN_MS  # from when a request signed at T0 can no longer execute
WINDOW_END = T0 + 5000  # the plan's permit window, on the exchange clock
RESOLVE_S = 30.0
COID = "qt-0123456789abcdef"


def report(status: str, executed: str = "0") -> OrderReport:
    return OrderReport("42", COID, status, D(executed), D("100") if D(executed) else D(0), side="SELL")


FILLED = report("FILLED", "1")


def timeout(signed_at_ms: float | None = T0) -> OutcomeUnknown:
    return OutcomeUnknown("RequestTimeout: no reply", 0, signed_at_ms=signed_at_ms)


def executor(exchange: ScriptedExchange, late_horizon_ms: int = LATE_EXECUTION_HORIZON_MS) -> OrderExecutor:
    return OrderExecutor(exchange, RecordingLog(), RESOLVE_S, late_horizon_ms, exchange.clock)


def assert_about_the_plans_order(exchange: ScriptedExchange) -> None:
    """Every send and lookup is of the plan's order: its symbol and client id; every send its side and qty."""
    assert all(call.symbol == "BTCUSDT" and call.client_order_id == COID for call in exchange.calls)
    assert all((call.side, call.qty) == ("SELL", D("1")) for call in exchange.calls if call.kind == "place")


async def run(places: list[At], lookups: list[At] | None = None) -> tuple[OrderOutcome, ScriptedExchange]:
    exchange = ScriptedExchange(FakeClock(), places, lookups or [])
    outcome = await executor(exchange).execute("BTCUSDT", "SELL", D("1"), COID, WINDOW_END)
    assert not exchange.places and not exchange.lookups, "the executor stopped before the script's end"
    assert_about_the_plans_order(exchange)
    return outcome, exchange


# --- definitive answers -------------------------------------------------------------------------------------


async def test_a_filled_reply_is_the_outcome_with_one_send_and_no_lookup() -> None:
    outcome, exchange = await run([At(FILLED)])
    assert outcome.kind is OutcomeKind.FILLED and outcome.report == FILLED and outcome.attempts == 1
    assert exchange.kinds() == ["place"]
    assert exchange.calls[0].client_order_id == COID and exchange.calls[0].deadline_ms == WINDOW_END


@pytest.mark.parametrize("status", ["REJECTED", "EXPIRED", "CANCELED", "EXPIRED_IN_MATCH"])
async def test_a_final_status_without_a_fill_is_the_outcome_without_polling(status: str) -> None:
    outcome, exchange = await run([At(report(status))])
    assert outcome.kind is OutcomeKind.NOT_FILLED and outcome.report == report(status) and outcome.attempts == 1
    assert exchange.kinds() == ["place"]


async def test_an_expired_order_with_a_partial_fill_is_filled() -> None:
    outcome, exchange = await run([At(report("EXPIRED", "0.4"))])
    assert outcome.kind is OutcomeKind.FILLED and outcome.report is not None
    assert outcome.report.executed_qty == D("0.4")
    assert exchange.kinds() == ["place"]


@pytest.mark.parametrize("code", sorted(REJECTION_CODES))
async def test_a_definitive_rejection_is_never_sent_again(code: int) -> None:
    outcome, exchange = await run([At(ExchangeRejected("refused", code, signed_at_ms=T0))])
    assert (outcome.kind, outcome.code, outcome.message, outcome.attempts) == (OutcomeKind.REJECTED, code, "refused", 1)
    assert exchange.kinds() == ["place"]


@pytest.mark.parametrize("code", sorted(RETRYABLE_REJECTION_CODES))
async def test_a_retryable_rejection_is_sent_again_at_most_once(code: int) -> None:
    refused = ExchangeRejected("not processed", code, signed_at_ms=T0)
    outcome, exchange = await run([At(refused, T0 + 10), At(refused, T0 + 20)])
    assert (outcome.kind, outcome.code, outcome.attempts) == (OutcomeKind.REJECTED, code, 2)
    assert exchange.kinds() == ["place", "place"]
    assert {call.client_order_id for call in exchange.calls} == {COID}


@pytest.mark.parametrize("code", sorted(RETRYABLE_REJECTION_CODES))
async def test_a_retryable_rejection_then_a_fill_is_the_fill_of_the_second_send(code: int) -> None:
    outcome, exchange = await run([At(ExchangeRejected("not processed", code, signed_at_ms=T0)), At(FILLED)])
    assert outcome.kind is OutcomeKind.FILLED and outcome.attempts == 2
    assert exchange.sends == 2


async def test_a_retryable_rejection_after_the_window_closed_is_not_sent_again() -> None:
    outcome, exchange = await run([At(ExchangeRejected("outside recvWindow", -1021), WINDOW_END)])
    assert (outcome.kind, outcome.code, outcome.attempts) == (OutcomeKind.REJECTED, -1021, 1)
    assert exchange.sends == 1


async def test_an_unclear_outcome_of_the_send_after_a_retryable_rejection_is_never_sent_a_third_time() -> None:
    # until the resend says when it was signed, the record dates it with the refused request's stamp, T0 + 100
    places = [At(ExchangeRejected("ahead", -1021, signed_at_ms=T0 + 100)), At(timeout(signed_at_ms=None))]
    outcome, exchange = await run(places, [At(None, SETTLED + 99), At(None, SETTLED + 100)])
    assert outcome.kind is OutcomeKind.NOT_PLACED and outcome.attempts == 2
    assert exchange.kinds() == ["place", "place", "query", "query"]


# --- nothing left: not sent, throttled, banned ---------------------------------------------------------------

NOT_LEAVING = [
    (NotSent("the permit window closed"), OutcomeKind.NOT_SENT),
    (Throttled("no room inside the window"), OutcomeKind.THROTTLED),
    (ExchangeBanned("IP banned until later", 418), OutcomeKind.BANNED),
]


@pytest.mark.parametrize(("failure", "kind"), NOT_LEAVING)
async def test_a_send_that_could_not_leave_ends_it(failure: ExchangeError, kind: OutcomeKind) -> None:
    outcome, exchange = await run([At(failure)])
    assert (outcome.kind, outcome.message, outcome.attempts) == (kind, failure.message, 1)
    assert outcome.code == (418 if kind is OutcomeKind.BANNED else 0)  # a ban is always 418, whatever it carried
    assert exchange.kinds() == ["place"]


@pytest.mark.parametrize(("failure", "kind"), NOT_LEAVING)
async def test_a_resend_that_could_not_leave_ends_it(failure: ExchangeError, kind: OutcomeKind) -> None:
    outcome, exchange = await run([At(timeout()), At(failure)], [At(None, SETTLED)])
    assert (outcome.kind, outcome.attempts) == (kind, 2)
    assert exchange.kinds() == ["place", "query", "place"]


# --- unclear outcomes: looked up, resent only when proven absent and unable to land -------------------------


async def test_a_timeout_then_absent_past_the_recv_window_is_sent_exactly_once_more() -> None:
    outcome, exchange = await run([At(timeout(), T0 + 30), At(FILLED)], [At(None, SETTLED)])
    assert outcome.kind is OutcomeKind.FILLED and outcome.attempts == 2
    assert exchange.kinds() == ["place", "query", "place"]
    resend = exchange.calls[2]
    assert resend.client_order_id == COID and resend.deadline_ms == WINDOW_END and resend.at_ms == SETTLED


async def test_absent_inside_the_recv_window_is_looked_up_again_and_not_resent_yet() -> None:
    outcome, exchange = await run([At(timeout()), At(FILLED)], [At(None, SETTLED - 1), At(None, SETTLED)])
    assert outcome.kind is OutcomeKind.FILLED and outcome.attempts == 2
    assert exchange.kinds() == ["place", "query", "query", "place"]  # the first absent sent nothing


async def test_absent_inside_the_recv_window_then_found_is_the_first_sends_outcome() -> None:
    outcome, exchange = await run([At(timeout())], [At(None, SETTLED - 1), At(FILLED, SETTLED)])
    assert outcome.kind is OutcomeKind.FILLED and outcome.attempts == 1 and outcome.report == FILLED
    assert exchange.kinds() == ["place", "query", "query"]


async def test_the_recv_window_runs_from_the_timestamp_the_request_carried() -> None:
    # signed at T0 + 700: still able to land at T0 + 1949 although a request signed at T0 could not
    stamped = SETTLED + 700
    outcome, exchange = await run([At(timeout(T0 + 700)), At(FILLED)], [At(None, stamped - 1), At(None, stamped)])
    assert outcome.attempts == 2
    assert exchange.kinds() == ["place", "query", "query", "place"]


async def test_an_unstamped_unclear_send_counts_as_signed_when_it_failed() -> None:
    failed_at = T0 + 400
    outcome, exchange = await run(
        [At(timeout(None), failed_at), At(FILLED)], [At(None, SETTLED + 399), At(None, SETTLED + 400)]
    )
    assert outcome.attempts == 2
    assert exchange.kinds() == ["place", "query", "query", "place"]


async def test_absent_past_the_recv_window_after_the_permit_window_closed_is_not_placed() -> None:
    exchange = ScriptedExchange(FakeClock(), [At(timeout())], [At(None, SETTLED)])
    outcome = await executor(exchange).execute("BTCUSDT", "SELL", D("1"), COID, SETTLED)
    assert outcome.kind is OutcomeKind.NOT_PLACED and outcome.attempts == 1
    assert exchange.kinds() == ["place", "query"]


@pytest.mark.parametrize("code", sorted(MAY_EXECUTE_LATE))
async def test_execution_status_unknown_then_absent_is_never_resent_and_not_placed_only_after_the_horizon(
    code: int,
) -> None:
    unknown = OutcomeUnknown("Internal error; unable to process your request", code, signed_at_ms=T0)
    horizon = T0 + LATE_EXECUTION_HORIZON_MS
    # the first lookup is long past the recvWindow (a timeout would be resent there) but inside the horizon
    outcome, exchange = await run([At(unknown, T0 + 50)], [At(None, horizon - 1), At(None, horizon)])
    assert outcome.kind is OutcomeKind.NOT_PLACED and outcome.attempts == 1
    assert exchange.kinds() == ["place", "query", "query"]


async def test_execution_status_unknown_then_a_late_fill_is_the_fill() -> None:
    unknown = OutcomeUnknown("unknown", -1007, signed_at_ms=T0)
    horizon = T0 + LATE_EXECUTION_HORIZON_MS
    outcome, exchange = await run([At(unknown)], [At(None, horizon - 1), At(FILLED, horizon)])
    assert outcome.kind is OutcomeKind.FILLED and outcome.attempts == 1
    assert exchange.sends == 1


async def test_the_late_horizon_is_the_executors_setting() -> None:
    exchange = ScriptedExchange(
        FakeClock(),
        [At(OutcomeUnknown("unknown", -1007, signed_at_ms=T0))],
        [At(None, T0 + 1999), At(None, T0 + 2000)],
    )
    outcome = await executor(exchange, late_horizon_ms=2000).execute("BTCUSDT", "SELL", D("1"), COID, WINDOW_END)
    assert outcome.kind is OutcomeKind.NOT_PLACED
    assert exchange.kinds() == ["place", "query", "query"]


@pytest.mark.parametrize("second", [0, -1001, -1007])
async def test_a_second_unclear_outcome_after_the_resend_is_never_sent_a_third_time(second: int) -> None:
    resend_unclear = OutcomeUnknown("again", second, signed_at_ms=SETTLED)
    settles = SETTLED + (LATE_EXECUTION_HORIZON_MS if second in MAY_EXECUTE_LATE else RECV_MS + CLOCK_MARGIN_MS)
    outcome, exchange = await run([At(timeout()), At(resend_unclear)], [At(None, SETTLED), At(None, settles)])
    assert outcome.kind is OutcomeKind.NOT_PLACED and outcome.attempts == 2
    assert exchange.kinds() == ["place", "query", "place", "query"]


async def test_lookups_failing_past_the_resolve_bound_after_an_unclear_send_are_unknown_never_resent() -> None:
    down = ExchangeUnavailable("Service Unavailable (code -1001)", -1001)
    outcome, exchange = await run([At(timeout())], [At(None, SETTLED - 1), At(down, SETTLED, RESOLVE_S + 1)])
    assert (outcome.kind, outcome.code, outcome.attempts) == (OutcomeKind.UNKNOWN, -1001, 1)
    assert exchange.kinds() == ["place", "query", "query"]


async def test_a_ban_while_looking_up_is_unknown_never_resent() -> None:
    outcome, exchange = await run([At(timeout())], [At(ExchangeBanned("banned", -1003), SETTLED)])
    assert (outcome.kind, outcome.code, outcome.message, outcome.attempts) == (OutcomeKind.UNKNOWN, 418, "banned", 1)
    assert exchange.sends == 1


async def test_the_last_failed_lookups_message_is_kept_cut_to_200_characters() -> None:
    long = "Service Unavailable: " + "x" * 300
    down = ExchangeUnavailable(long, -1001)
    outcome, _ = await run([At(timeout())], [At(down, SETTLED, RESOLVE_S + 1)])
    assert (outcome.kind, outcome.code, outcome.message) == (OutcomeKind.UNKNOWN, -1001, long[:200])


# --- acknowledgements: the order exists, it is followed and never sent again -------------------------------


async def test_an_ack_then_failing_lookups_is_unknown_never_resent() -> None:
    acked_at = T0 + 20
    down = ExchangeUnavailable("Service Unavailable", -1001)
    lookups = [At(None, acked_at + LATE_EXECUTION_HORIZON_MS - 1), At(down, None, RESOLVE_S + 1)]
    outcome, exchange = await run([At(report("NEW"), acked_at)], lookups)
    assert (outcome.kind, outcome.report, outcome.attempts) == (OutcomeKind.UNKNOWN, None, 1)
    assert exchange.kinds() == ["place", "query", "query"]


async def test_an_ack_still_open_past_the_resolve_bound_is_unknown_never_resent() -> None:
    outcome, exchange = await run([At(report("NEW"))], [At(report("PARTIALLY_FILLED", "0.5"), None, RESOLVE_S + 1)])
    assert outcome.kind is OutcomeKind.UNKNOWN and outcome.message == f"order {COID} still PARTIALLY_FILLED"
    assert exchange.kinds() == ["place", "query"]


async def test_an_ack_then_found_final_is_that_outcome() -> None:
    outcome, exchange = await run([At(report("NEW"))], [At(FILLED)])
    assert outcome.kind is OutcomeKind.FILLED and outcome.report == FILLED and outcome.attempts == 1
    assert exchange.kinds() == ["place", "query"]


async def test_an_ack_never_found_is_not_resent_even_with_the_permit_window_open() -> None:
    acked_at = T0 + 20
    settles = acked_at + LATE_EXECUTION_HORIZON_MS
    exchange = ScriptedExchange(FakeClock(), [At(report("NEW"), acked_at)], [At(None, settles - 1), At(None, settles)])
    outcome = await executor(exchange).execute("BTCUSDT", "SELL", D("1"), COID, settles + 60_000)
    assert outcome.kind is OutcomeKind.NOT_PLACED and outcome.attempts == 1
    assert exchange.kinds() == ["place", "query", "query"]


# --- follow: sends this process did not see ------------------------------------------------------------------


def unseen() -> SendRecord:
    return SendRecord.unseen(T0, RECV_MS, LATE_EXECUTION_HORIZON_MS)


@pytest.mark.parametrize(
    ("lookups", "kind"),
    [
        ([At(None, T0 + LATE_EXECUTION_HORIZON_MS - 1), At(None, T0 + LATE_EXECUTION_HORIZON_MS)],
         OutcomeKind.NOT_PLACED),
        ([At(None, SETTLED + 8749), At(FILLED)], OutcomeKind.FILLED),
        ([At(report("CANCELED"))], OutcomeKind.NOT_FILLED),
        ([At(ExchangeUnavailable("down", -1001), None, RESOLVE_S + 1)], OutcomeKind.UNKNOWN),
        ([At(ExchangeBanned("banned", 418))], OutcomeKind.UNKNOWN),
        ([At(report("NEW"), None, RESOLVE_S + 1)], OutcomeKind.UNKNOWN),  # still open at the bound
    ],
)  # fmt: skip
async def test_following_unseen_sends_never_sends(lookups: list[At], kind: OutcomeKind) -> None:
    exchange = ScriptedExchange(FakeClock(), [], list(lookups))
    outcome = await executor(exchange).follow("BTCUSDT", COID, unseen())
    assert outcome.kind is kind and outcome.attempts == 0  # the record's count, whatever the way out
    assert exchange.sends == 0 and exchange.queries == len(lookups)
    assert_about_the_plans_order(exchange)


def test_an_outcome_of_a_report_counts_one_send_unless_told() -> None:
    """Apply adopts an order found on the exchange with ``OrderOutcome.of(report)``: one send."""
    assert (OrderOutcome.of(FILLED).kind, OrderOutcome.of(FILLED).attempts) == (OutcomeKind.FILLED, 1)
    assert OrderOutcome.of(report("CANCELED"), 2).attempts == 2


# --- what the executor tells the log: the exchange's code and message ----------------------------------------


async def test_a_resend_after_a_retryable_rejection_logs_its_code_and_message() -> None:
    exchange = ScriptedExchange(
        FakeClock(), [At(ExchangeRejected("not processed", -1021, signed_at_ms=T0)), At(FILLED)]
    )
    log = RecordingLog()
    await OrderExecutor(exchange, log, RESOLVE_S, clock=exchange.clock).execute(
        "BTCUSDT", "SELL", D("1"), COID, WINDOW_END
    )
    assert log.fields() == [{"code": -1021, "msg": "not processed"}]


async def test_an_unclear_send_logs_its_error_before_the_lookups() -> None:
    exchange = ScriptedExchange(FakeClock(), [At(timeout())], [At(FILLED, SETTLED)])
    log = RecordingLog()
    await OrderExecutor(exchange, log, RESOLVE_S, clock=exchange.clock).execute(
        "BTCUSDT", "SELL", D("1"), COID, WINDOW_END
    )
    assert log.fields() == [{"error": "RequestTimeout: no reply"}]


async def test_the_first_send_is_dated_by_its_own_stamp_even_at_the_clocks_zero() -> None:
    """The record starts from no send at all: a request signed at exchange time 0 settles at exactly
    recvWindow + margin, where it is absent and sent once more (no lookup later than that)."""
    settled = RECV_MS + CLOCK_MARGIN_MS
    exchange = ScriptedExchange(FakeClock(), [At(timeout(0.0)), At(FILLED)], [At(None, settled)], ms=0.0)
    outcome = await executor(exchange).execute("BTCUSDT", "SELL", D("1"), COID, settled + 1000)
    assert outcome.kind is OutcomeKind.FILLED and outcome.attempts == 2
    assert exchange.kinds() == ["place", "query", "place"] and not exchange.lookups


# --- waits between lookups, in virtual time ------------------------------------------------------------------


class VirtualTimeSelector(selectors.DefaultSelector):
    """Never blocks: a wait for the next timer moves the fake monotonic clock to it instead (nothing here
    waits on I/O, so whenever nothing is ready the loop is waiting for a timer)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if not ready:
            assert timeout is not None, "nothing scheduled and nothing ready: the executor would wait forever"
            self.clock.mono_s += timeout
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is the executor's fake monotonic clock: ``asyncio.sleep(d)`` takes no real
    time and moves ``clock.mono_s`` on by exactly ``d``, so the waits themselves can be read off the calls."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(VirtualTimeSelector(clock))
        self.clock = clock

    def time(self) -> float:
        return self.clock.mono_s


def in_virtual_time(clock: FakeClock, work: Coroutine[Any, Any, OrderOutcome]) -> OrderOutcome:
    loop = VirtualTimeLoop(clock)
    try:
        return loop.run_until_complete(work)
    finally:
        loop.close()


def run_in_virtual_time(places: list[At], lookups: list[At]) -> tuple[OrderOutcome, ScriptedExchange, list[float]]:
    """``run``, with the executor's waits in virtual time; also the monotonic time of each lookup, from the
    first send."""
    exchange = ScriptedExchange(FakeClock(), places, lookups)
    start = exchange.clock.mono_s
    outcome = in_virtual_time(exchange.clock, executor(exchange).execute("BTCUSDT", "SELL", D("1"), COID, WINDOW_END))
    assert not exchange.places and not exchange.lookups, "the executor stopped before the script's end"
    assert_about_the_plans_order(exchange)
    return outcome, exchange, [call.mono_s - start for call in exchange.calls if call.kind == "query"]


def test_failing_lookups_back_off_doubling_to_two_seconds_until_the_resolve_bound() -> None:
    down = ExchangeUnavailable("Service Unavailable", -1001)
    waits = [0.2, 0.4, 0.8, 1.6] + [2.0] * 14  # 0.2 doubling, at most 2 s: the 19th lookup is past 30 s
    expected = [sum(waits[:n]) for n in range(len(waits) + 1)]
    outcome, exchange, queried_at = run_in_virtual_time([At(timeout())], [At(down) for _ in expected])
    assert (outcome.kind, outcome.code, outcome.attempts) == (OutcomeKind.UNKNOWN, -1001, 1)
    assert queried_at == pytest.approx(expected, abs=1e-9)
    assert expected[-2] <= RESOLVE_S < expected[-1] and exchange.sends == 1


def test_a_failed_lookup_right_at_the_resolve_bound_is_tried_again() -> None:
    down = ExchangeUnavailable("Service Unavailable", -1001)
    outcome, exchange, queried_at = run_in_virtual_time([At(timeout())], [At(down, SETTLED, RESOLVE_S), At(FILLED)])
    assert outcome.kind is OutcomeKind.FILLED and outcome.attempts == 1 and exchange.sends == 1
    assert queried_at == pytest.approx([RESOLVE_S, RESOLVE_S + 0.2], abs=1e-9)


def test_an_open_order_is_looked_up_every_200_ms_until_final() -> None:
    outcome, _, queried_at = run_in_virtual_time(
        [At(report("NEW"))], [At(report("NEW")), At(report("PARTIALLY_FILLED", "0.5")), At(FILLED)]
    )
    assert outcome.kind is OutcomeKind.FILLED and outcome.report == FILLED and outcome.attempts == 1
    assert queried_at == pytest.approx([0.0, 0.2, 0.4], abs=1e-9)  # no doubling: it is there, only not final


def test_an_open_order_found_right_at_the_resolve_bound_is_looked_up_again() -> None:
    outcome, _, queried_at = run_in_virtual_time([At(report("NEW"))], [At(report("NEW"), None, RESOLVE_S), At(FILLED)])
    assert outcome.kind is OutcomeKind.FILLED
    assert queried_at == pytest.approx([RESOLVE_S, RESOLVE_S + 0.2], abs=1e-9)


def test_absent_before_it_settles_waits_exactly_until_it_settles() -> None:
    """Half a millisecond early: the wait is that half millisecond (``after_absent``'s time, no minimum)."""
    outcome, exchange, queried_at = run_in_virtual_time(
        [At(timeout()), At(FILLED)], [At(None, SETTLED - 0.5), At(None, SETTLED)]
    )
    assert outcome.kind is OutcomeKind.FILLED and outcome.attempts == 2
    assert queried_at == pytest.approx([0.0, 0.0005], abs=1e-12)
    assert exchange.kinds() == ["place", "query", "query", "place"]


# --- the clocks: re-measured before every verdict, their errors in the bound, no verdict out of bounds --------


async def test_a_verdict_re_measures_the_exchange_clock_and_waits_out_its_error() -> None:
    """Absent past recvWindow + margin on the clock as last measured; re-measured, the offset is known only to
    within 300 ms: the resend waits those 300 ms and a lookup more (before the measured error counted, it went
    out at once)."""
    exchange = ScriptedExchange(
        FakeClock(), [At(timeout()), At(FILLED)], [At(None, SETTLED), At(None, SETTLED + 300)], clock_error_ms=300
    )
    outcome = await executor(exchange).execute("BTCUSDT", "SELL", D("1"), COID, WINDOW_END)
    assert outcome.kind is OutcomeKind.FILLED and outcome.attempts == 2
    assert exchange.kinds() == ["place", "query", "query", "place"]
    assert exchange.syncs == [SETTLED, SETTLED + 300]  # measured right before each verdict


async def test_clocks_out_of_bounds_call_nothing_absent_and_leave_the_outcome_unknown() -> None:
    exchange = ScriptedExchange(
        FakeClock(), [At(timeout())], [At(None, SETTLED), At(None, SETTLED + 10, mono_s=RESOLVE_S + 1)]
    )
    bad = ClockState(own_error_ms=0.0, problem="another Apply host's clock differs by 900 ms")
    log = RecordingLog()
    ex = OrderExecutor(exchange, log, RESOLVE_S, clock=exchange.clock, clocks=lambda: bad)
    outcome = await ex.execute("BTCUSDT", "SELL", D("1"), COID, WINDOW_END)
    assert outcome.kind is OutcomeKind.UNKNOWN and "clocks are out of bounds" in outcome.message
    assert exchange.kinds() == ["place", "query", "query"]  # never resent, never called absent
    assert any("clocks out of bounds" in message for message, _ in log.warnings)


async def test_a_clock_that_cannot_be_measured_calls_nothing_absent() -> None:
    exchange = ScriptedExchange(
        FakeClock(),
        [At(timeout())],
        [At(None, SETTLED), At(None, SETTLED + 10, mono_s=RESOLVE_S + 1)],
        sync_failure=ExchangeUnavailable("/time: 503"),
    )
    outcome = await executor(exchange).execute("BTCUSDT", "SELL", D("1"), COID, WINDOW_END)
    assert outcome.kind is OutcomeKind.UNKNOWN
    assert exchange.kinds() == ["place", "query", "query"]


async def test_sends_another_host_may_have_made_wait_out_the_gap_between_the_hosts_clocks() -> None:
    """For a record of unseen sends (a restart, a racing handler) the largest difference to another Apply
    host's clock counts too; for this host's own sends it does not."""
    gap = ClockState(own_error_ms=5.0, host_gap_ms=400.0)
    settles = SETTLED + LATE_EXECUTION_HORIZON_MS - RECV_MS - CLOCK_MARGIN_MS  # unseen: the late horizon
    exchange = ScriptedExchange(FakeClock(), [], [At(None, settles), At(None, settles + 405)])
    ex = OrderExecutor(exchange, RecordingLog(), RESOLVE_S, clock=exchange.clock, clocks=lambda: gap)
    record = SendRecord.unseen(T0, RECV_MS, LATE_EXECUTION_HORIZON_MS)
    outcome = await ex.follow("BTCUSDT", COID, record)
    assert outcome.kind is OutcomeKind.NOT_PLACED and exchange.kinds() == ["query", "query"]


# --- the user-data stream's word (services/apply/pushed_orders.py) -------------------------------------------


def order_event(status: str, filled: str, coid: str = COID) -> Any:
    from quantum_trader.exchange.stream_events import OrderTradeUpdate, OrderUpdate

    update = OrderUpdate(
        s="BTCUSDT", c=coid, S="SELL", i=42, x="TRADE" if D(filled) else "NEW", X=status, z=D(filled),
        ap=D("100") if D(filled) else D(0), T=int(T0) + 5,
    )  # fmt: skip
    return OrderTradeUpdate(E=int(T0) + 6, T=int(T0) + 5, o=update)


async def test_an_unclear_send_the_stream_showed_filled_is_resolved_without_a_lookup() -> None:
    from quantum_trader.services.apply.pushed_orders import PushedOrders

    pushed = PushedOrders(RecordingLog())
    exchange = ScriptedExchange(FakeClock(), [At(timeout())], [])  # a lookup would be one too many

    async def place(*args: Any, **kwargs: Any) -> OrderReport:
        await pushed.on_event(order_event("FILLED", "1"), 0.0)  # the fill's event came before the reply failed
        return await ScriptedExchange.place_reduce_only_market(exchange, *args, **kwargs)

    exchange.place_reduce_only_market = place  # type: ignore[method-assign]
    run = OrderExecutor(exchange, RecordingLog(), RESOLVE_S, LATE_EXECUTION_HORIZON_MS, exchange.clock, pushed=pushed)
    outcome = await run.execute("BTCUSDT", "SELL", D("1"), COID, WINDOW_END)
    assert outcome.kind is OutcomeKind.FILLED and outcome.report is not None
    assert (outcome.report.client_order_id, outcome.report.executed_qty, outcome.report.order_id) == (COID, 1, "42")
    assert exchange.kinds() == ["place"]


async def test_a_fill_the_stream_shows_while_lookups_wait_ends_the_wait_with_no_further_lookup() -> None:
    """Absent inside the recv window: the executor would look again at SETTLED (a minute of real waiting is
    scripted below); the stream's event ends that wait, and no second lookup or resend is made."""
    from quantum_trader.services.apply.pushed_orders import PushedOrders

    pushed = PushedOrders(RecordingLog())
    exchange = ScriptedExchange(FakeClock(), [At(timeout())], [At(None, T0 + 10)])
    exchange.ms = T0
    far = SendRecord(1, 0.0, 60_000, WINDOW_END)  # a recv window of a minute: the next lookup would be far off
    run = OrderExecutor(exchange, RecordingLog(), RESOLVE_S, LATE_EXECUTION_HORIZON_MS, exchange.clock, pushed=pushed)

    async def fill_soon() -> None:
        await asyncio.sleep(0.05)
        await pushed.on_event(order_event("NEW", "0", coid="qt-someone-else"), 0.0)  # not this order: no effect
        await pushed.on_event(order_event("FILLED", "1"), 0.0)

    filler = asyncio.ensure_future(fill_soon())
    outcome = await asyncio.wait_for(run.resolve("BTCUSDT", COID, far.unclear(0, T0)), 5)
    await filler
    assert outcome != "resend" and isinstance(outcome, OrderOutcome)
    assert outcome.kind is OutcomeKind.FILLED and exchange.kinds() == ["query"]


async def test_the_streams_non_final_state_does_not_end_the_lookups() -> None:
    from quantum_trader.services.apply.pushed_orders import PushedOrders

    pushed = PushedOrders(RecordingLog())
    await pushed.on_event(order_event("NEW", "0"), 0.0)
    assert pushed.final(COID) is None
    exchange = ScriptedExchange(FakeClock(), [At(timeout())], [At(FILLED)])
    run = OrderExecutor(exchange, RecordingLog(), RESOLVE_S, LATE_EXECUTION_HORIZON_MS, exchange.clock, pushed=pushed)
    outcome = await run.execute("BTCUSDT", "SELL", D("1"), COID, WINDOW_END)
    assert outcome.kind is OutcomeKind.FILLED and exchange.kinds() == ["place", "query"]


async def test_an_order_the_stream_has_shown_is_never_called_absent_nor_sent_again() -> None:
    """The stream showed the order (NEW) while the lookup, lagging, says absent past the recv window (which
    alone would resend): no resend, no verdict; its fill on the stream is the outcome."""
    from quantum_trader.services.apply.pushed_orders import PushedOrders

    pushed = PushedOrders(RecordingLog())
    await pushed.on_event(order_event("NEW", "0"), 0.0)
    exchange = ScriptedExchange(FakeClock(), [At(timeout(), T0 + 30)], [At(None, SETTLED)])  # no second send
    run = OrderExecutor(exchange, RecordingLog(), RESOLVE_S, LATE_EXECUTION_HORIZON_MS, exchange.clock, pushed=pushed)

    async def fill_soon() -> None:
        await asyncio.sleep(0.05)
        await pushed.on_event(order_event("FILLED", "1"), 0.0)

    filler = asyncio.ensure_future(fill_soon())
    outcome = await asyncio.wait_for(run.execute("BTCUSDT", "SELL", D("1"), COID, WINDOW_END), 5)
    await filler
    assert outcome.kind is OutcomeKind.FILLED and outcome.attempts == 1
    assert exchange.kinds() == ["place", "query"]
