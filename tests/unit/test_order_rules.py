"""The pure rules of the order path: when to look again, when one resend is allowed, when it is final; and
the rate guard that keeps requests inside Binance's limits."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.domain.execution import (
    CLOCK_MARGIN_MS,
    LATE_EXECUTION_HORIZON_MS,
    SendRecord,
    Step,
    after_absent,
    is_final,
)
from quantum_trader.exchange.throttle import Banned, RateGuard

T0 = 1_800_000_000_000.0


def record(**kw: Any) -> SendRecord:
    values: dict[str, Any] = {"attempts": 1, "last_signed_ms": T0, "recv_window_ms": 1000, "window_end_ms": T0 + 5000}
    values.update(kw)
    return SendRecord(**values)


def test_absent_while_the_request_could_still_land_means_look_again_later() -> None:
    step, when = after_absent(record(), T0 + 200)
    assert step is Step.QUERY_LATER and when == T0 + 1000 + CLOCK_MARGIN_MS


def test_absent_after_the_recv_window_inside_the_permit_window_allows_one_resend() -> None:
    assert after_absent(record(), T0 + 1000 + CLOCK_MARGIN_MS)[0] is Step.RESEND


def test_a_second_resend_is_never_allowed() -> None:
    second = record().resent(T0 + 1300)
    assert second.attempts == 2
    assert after_absent(second, T0 + 1300 + 1000 + CLOCK_MARGIN_MS)[0] is Step.NOT_PLACED


def test_no_resend_after_the_permit_window_closed() -> None:
    late = record(window_end_ms=T0 + 1100)
    assert after_absent(late, T0 + 1300)[0] is Step.NOT_PLACED


@pytest.mark.parametrize("code", [-1000, -1006, -1007])
def test_execution_status_unknown_is_looked_up_longer_and_never_resent(code: int) -> None:
    unclear = record(window_end_ms=T0 + 60_000).unclear(code, T0)
    step, when = after_absent(unclear, T0 + 2000)
    assert step is Step.QUERY_LATER and when == T0 + LATE_EXECUTION_HORIZON_MS
    assert after_absent(unclear, T0 + LATE_EXECUTION_HORIZON_MS)[0] is Step.NOT_PLACED


def test_other_unclear_outcomes_keep_the_resend_possible() -> None:
    assert after_absent(record().unclear(0, T0).unclear(-1001, T0), T0 + 1300)[0] is Step.RESEND


@given(
    attempts=st.integers(1, 3),
    sent=st.floats(0, 10_000),
    recv=st.integers(100, 60_000),
    window=st.floats(0, 100_000),
    now=st.floats(0, 200_000),
    late=st.booleans(),
)
def test_a_resend_only_ever_follows_a_settled_request_inside_the_window(
    attempts: int, sent: float, recv: int, window: float, now: float, late: bool
) -> None:
    rec = SendRecord(attempts, T0 + sent, recv, T0 + window, may_resend=not late, late_execution_possible=late)
    step, when = after_absent(rec, T0 + now)
    if step is Step.RESEND:
        assert not late and attempts < rec.max_attempts
        assert T0 + now >= rec.last_signed_ms + recv + CLOCK_MARGIN_MS
        assert T0 + now < rec.window_end_ms
    if step is Step.QUERY_LATER:
        assert when > T0 + now


@pytest.mark.parametrize(
    ("status", "final"),
    [
        ("FILLED", True),
        ("EXPIRED", True),
        ("CANCELED", True),
        ("REJECTED", True),
        ("EXPIRED_IN_MATCH", True),
        ("NEW", False),
        ("PARTIALLY_FILLED", False),
    ],
)
def test_final_statuses(status: str, final: bool) -> None:
    assert is_final(status) is final


# --- rate guard -------------------------------------------------------------------------------------------

MINUTE = 60_000.0


def test_requests_wait_for_the_next_minute_when_the_weight_would_pass_the_safe_limit() -> None:
    guard = RateGuard(weight_limit=100, safety=0.8)
    now = 10 * MINUTE + 1000
    guard.sent(now, 75)
    assert guard.wait_ms(now, 5) == 0
    assert guard.wait_ms(now, 6) == MINUTE - 1000
    assert guard.wait_ms(11 * MINUTE, 6) == 0  # the window rolled over


def test_the_exchanges_own_counters_win_over_our_estimate() -> None:
    guard = RateGuard(weight_limit=2400)
    now = 5 * MINUTE + 2000
    guard.observe(now, 200, {"X-MBX-USED-WEIGHT-1M": "1919"})
    assert guard.wait_ms(now, 1) == 0
    assert guard.wait_ms(now, 2) > 0


def test_order_counts_per_10_seconds_are_respected() -> None:
    guard = RateGuard(orders_10s_limit=10, safety=1.0)
    now = 100_000.0 + 2500
    guard.observe(now, 200, {"X-MBX-ORDER-COUNT-10S": "10"})
    assert guard.wait_ms(now, 1, orders=1) == 7500
    assert guard.wait_ms(now, 1, orders=0) == 0  # reads are not orders


def test_one_budget_reserves_room_for_orders_and_lookups_over_polls_and_plan_reads() -> None:
    """At 1,200 of 2,400 weight (50 %) a plan's position read waits for the next minute while polls, lookups
    and orders go; at 1,680 (70 %) polls wait too; orders and lookups go up to 1,920 (80 %)."""
    guard = RateGuard(weight_limit=2400, safety=0.8)
    now = 7 * MINUTE + 15_000
    guard.observe(now, 200, {"X-MBX-USED-WEIGHT-1M": "1195"})
    assert guard.wait_ms(now, 5, purpose="plan") == 0
    guard.observe(now, 200, {"X-MBX-USED-WEIGHT-1M": "1196"})
    assert guard.wait_ms(now, 5, purpose="plan") == MINUTE - 15_000
    assert [guard.wait_ms(now, 5, purpose=p) for p in ("poll", "lookup", "order")] == [0, 0, 0]
    guard.observe(now, 200, {"X-MBX-USED-WEIGHT-1M": "1680"})
    assert guard.wait_ms(now, 5, purpose="poll") > 0 and guard.wait_ms(now, 5, purpose="lookup") == 0
    guard.observe(now, 200, {"X-MBX-USED-WEIGHT-1M": "1919"})
    assert guard.wait_ms(now, 1, purpose="order") == 0 and guard.wait_ms(now, 2, purpose="order") > 0


def test_the_room_names_the_limit_that_binds_and_when_it_frees() -> None:
    guard = RateGuard()  # Binance's defaults: 2,400 weight, 300 orders per 10 s, 1,200 per minute
    now = 20 * MINUTE + 52_500  # 7.5 s before the minute's end, 7.5 s before the 10 s window's
    guard.observe(now, 200, {"X-MBX-ORDER-COUNT-10S": "100", "X-MBX-ORDER-COUNT-1M": "960"})
    room = guard.room(now, 1, orders=1)
    assert (room.limit, room.used, room.allowed, room.cap, room.wait_ms) == ("orders per minute", 960, 960, 1200, 7500)
    text = room.describe(now)
    assert text.startswith("orders per minute: 960 used, 960 of 1200 allowed (80%); room again at ")
    assert text.endswith(" UTC (in 7.5 s)")
    assert guard.room(now, 1).wait_ms == 0 and guard.room(now, 1).describe(now) == "room now"  # reads: no orders
    used = guard.used(now)
    assert used == {"weight_1m": 0.0, "orders_10s": 100 / 300, "orders_1m": 0.8}
    assert guard.used(now + MINUTE)["orders_1m"] == 0  # a new window


def test_a_reply_from_the_last_window_does_not_fill_the_new_one() -> None:
    """A request sent 30 ms before a 10 s edge, answered 20 ms after it, carries the old window's count (245):
    taken in the new window it would stop every order for 10 s. Counts of requests sent near the edge (within
    the clocks' disagreement) are not taken either; those sent well inside the window are."""
    guard = RateGuard(safety=0.8)  # 240 orders per 10 s allowed
    edge = 30 * MINUTE + 40_000
    guard.observe(edge + 20, 200, {"X-MBX-ORDER-COUNT-10S": "245"}, sent_ms=edge - 30)
    guard.observe(edge + 300, 200, {"X-MBX-ORDER-COUNT-10S": "244"}, sent_ms=edge + 100)  # received at 9.9xx s?
    assert guard.orders_10s == 0 and guard.wait_ms(edge + 300, 1, orders=1) == 0
    guard.observe(edge + 2000, 200, {"X-MBX-ORDER-COUNT-10S": "240"}, sent_ms=edge + 1990)
    assert guard.orders_10s == 240 and guard.wait_ms(edge + 2000, 1, orders=1) == 8000


def test_a_429_blocks_everything_for_retry_after() -> None:
    guard = RateGuard()
    guard.observe(T0, 429, {"Retry-After": "3"})
    assert guard.wait_ms(T0 + 1000, 1) == 2000
    assert guard.wait_ms(T0 + 3000, 1) == 0


def test_a_418_is_a_ban_not_a_wait() -> None:
    guard = RateGuard()
    guard.observe(T0, 418, {"Retry-After": "120"})
    with pytest.raises(Banned) as ban:
        guard.wait_ms(T0 + 60_000, 1)
    assert ban.value.until_ms == T0 + 120_000
    assert guard.wait_ms(T0 + 120_000, 1) == 0


def test_a_418_without_retry_after_bans_for_two_minutes() -> None:
    guard = RateGuard()
    guard.observe(T0, 418, {})
    with pytest.raises(Banned):
        guard.wait_ms(T0 + 119_000, 1)


def test_garbage_headers_are_ignored() -> None:
    guard = RateGuard()
    guard.observe(T0, 200, {"X-MBX-USED-WEIGHT-1M": "lots", "Retry-After": "soon"})
    assert guard.used_weight == 0 and guard.wait_ms(T0, 1) == 0


def test_sends_nobody_here_saw_are_looked_up_until_even_a_late_execution_could_show_and_never_resent() -> None:
    unseen = SendRecord.unseen(T0, recv_window_ms=1000, late_horizon_ms=LATE_EXECUTION_HORIZON_MS)
    step, when = after_absent(unseen, T0 + 1500)
    assert step is Step.QUERY_LATER and when == T0 + LATE_EXECUTION_HORIZON_MS
    assert after_absent(unseen, T0 + LATE_EXECUTION_HORIZON_MS)[0] is Step.NOT_PLACED


def test_an_acknowledged_order_is_never_sent_again_nor_called_absent_at_once() -> None:
    # the first attempt's record has no stamp yet (it succeeded): the acknowledgement dates it
    acked = record(last_signed_ms=0.0, window_end_ms=T0 + 60_000).acknowledged(T0 + 100)
    assert not acked.may_resend
    assert after_absent(acked, T0 + 1000 + CLOCK_MARGIN_MS)[0] is Step.QUERY_LATER  # records may lag the ACK
    assert after_absent(acked, T0 + 100 + LATE_EXECUTION_HORIZON_MS)[0] is Step.NOT_PLACED


def test_the_proof_starts_at_the_timestamp_the_request_carried() -> None:
    # the first attempt is stamped only when it leaves: a record that never saw it settles at the stamp
    stamped = record(last_signed_ms=0.0).unclear(0, T0 + 700)
    assert stamped.last_signed_ms == T0 + 700
    assert after_absent(stamped, T0 + 1000 + CLOCK_MARGIN_MS)[0] is Step.QUERY_LATER
    assert after_absent(stamped, T0 + 700 + 1000 + CLOCK_MARGIN_MS)[0] is Step.RESEND
    # an earlier stamp never moves the proof back
    assert stamped.unclear(0, T0).last_signed_ms == T0 + 700


def test_an_earlier_execution_status_unknown_forbids_a_resend_after_later_clear_answers() -> None:
    forbidden = record(window_end_ms=T0 + 60_000).unclear(-1007, T0).unclear(0, T0 + 100)
    assert not forbidden.may_resend and forbidden.late_execution_possible
    assert after_absent(forbidden, T0 + LATE_EXECUTION_HORIZON_MS + 100)[0] is Step.NOT_PLACED


@pytest.mark.parametrize("later", [0, -1001])
def test_a_later_clear_answer_does_not_shorten_the_look_up_after_execution_status_unknown(later: int) -> None:
    """After a -1007 the order may still execute until the late-execution horizon; an unclear answer with
    another code later on (the resend never happens, but a record may be updated again) keeps that horizon."""
    once = record(window_end_ms=T0 + 60_000).unclear(-1007, T0)
    again = once.unclear(later, T0)
    assert again.settles_at_ms == once.settles_at_ms == T0 + LATE_EXECUTION_HORIZON_MS
    # past the recvWindow, inside the horizon: still only "look again", never "not placed" nor a resend
    assert after_absent(again, T0 + 2000) == (Step.QUERY_LATER, T0 + LATE_EXECUTION_HORIZON_MS)
