"""The pushed events' order rule (domain/stream_sequence.py) and the wire schema of the events
(exchange/stream_events.py), without I/O.

The property: whatever the stream does to a history of states (duplicates, delays, swaps) and wherever a REST
read lands in it, the states applied are strictly increasing, none twice, and the last one held is the newest
that was delivered or read.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.domain.stream_sequence import ORDERS_KEPT, READ, Sequence, still_missed, stream_gap
from quantum_trader.exchange.stream_events import (
    AccountUpdate,
    BadStreamEvent,
    MarkPriceUpdate,
    OrderTradeUpdate,
    decode_event,
)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[tuple[int, int]], list[int]]:
    """A position's history of distinct versions (T, E), and the order the stream delivers them in: a
    shuffle with some delivered twice and some not at all."""
    n = draw(st.integers(1, 12))
    times = sorted(draw(st.lists(st.integers(0, 50), min_size=n, max_size=n)))
    history = [(t, 1000 + i) for i, t in enumerate(times)]  # E strictly increases, T never goes back
    picks = draw(st.lists(st.integers(0, n - 1), max_size=3 * n))
    return history, picks


@given(deliveries(), st.integers(0, 40), st.booleans())
def test_positions_apply_each_state_once_and_never_an_older_one(
    drawn: tuple[list[tuple[int, int]], list[int]], read_at: int, with_read: bool
) -> None:
    history, picks = drawn
    sequence = Sequence()
    applied: list[tuple[int, int]] = []
    for step, index in enumerate(picks):
        if with_read and step == min(read_at, len(picks) - 1):
            update_time = history[index][0]  # a REST read that holds the state of some transaction
            for _ in range(2):  # read twice: the same state confirmed again is kept (it is still true)
                if sequence.resynced("BTCUSDT", update_time):
                    applied.append((update_time, READ))
        t, e = history[index]
        if sequence.position("BTCUSDT", t, e):
            applied.append((t, e))
    assert applied == sorted(applied)  # never an older state after a newer one
    events = [version for version in applied if version[1] != READ]
    assert events == sorted(set(events))  # no event applied twice
    if applied:
        assert sequence.positions["BTCUSDT"] == applied[-1]
        delivered = [history[i] for i in picks]
        assert applied[-1] >= max(delivered)  # the newest delivered is held (or a read as new)
        # an event passed over was never newer than what was held: older, the same, or in a read of its time
        assert all(version[0] <= applied[-1][0] for version in delivered)


def test_a_read_holds_the_transaction_an_event_then_repeats() -> None:
    sequence = Sequence()
    assert sequence.resynced("ETHUSDT", 500)
    assert not sequence.position("ETHUSDT", 500, 900)  # the same transaction: already in the read
    assert not sequence.position("ETHUSDT", 499, 950)  # older than the read
    assert sequence.position("ETHUSDT", 501, 960)
    assert not sequence.resynced("ETHUSDT", 500)  # a lagging read never undoes a newer event
    assert sequence.resynced("ETHUSDT", 501)  # a read of the state held confirms it


@st.composite
def order_histories(draw: st.DrawFn) -> tuple[list[tuple[Decimal, str, int]], list[int]]:
    fills = draw(st.lists(st.integers(1, 5), min_size=0, max_size=5))
    states: list[tuple[Decimal, str, int]] = [(Decimal(0), "NEW", 100)]
    total = Decimal(0)
    for n, fill in enumerate(fills):
        total += Decimal(fill) / 1000
        states.append((total, "PARTIALLY_FILLED", 101 + n))
    states.append((total, draw(st.sampled_from(["FILLED", "CANCELED", "EXPIRED"])), 200))
    picks = draw(st.lists(st.integers(0, len(states) - 1), max_size=3 * len(states)))
    return states, picks


@given(order_histories())
def test_orders_apply_each_state_once_and_never_an_older_one(
    drawn: tuple[list[tuple[Decimal, str, int]], list[int]],
) -> None:
    states, picks = drawn
    sequence = Sequence()
    applied = [i for i in picks if sequence.order("BTCUSDT", 7, *states[i])]
    assert applied == sorted(set(applied))
    if picks:
        assert applied[-1] == max(picks)


def test_orders_are_forgotten_oldest_first_beyond_the_bound() -> None:
    sequence = Sequence()
    for order_id in range(ORDERS_KEPT + 1):
        assert sequence.order("BTCUSDT", order_id, Decimal(0), "NEW", 1)
    assert ("BTCUSDT", 0) not in sequence.orders and len(sequence.orders) == ORDERS_KEPT
    assert not sequence.order("BTCUSDT", ORDERS_KEPT, Decimal(0), "NEW", 1)  # the newest is still known


def test_marks_move_forward_only() -> None:
    sequence = Sequence()
    assert sequence.mark("BTCUSDT", 10) and not sequence.mark("BTCUSDT", 10) and not sequence.mark("BTCUSDT", 9)
    assert sequence.mark("ETHUSDT", 9)


ORDER = {
    "e": "ORDER_TRADE_UPDATE", "E": 1568879465651, "T": 1568879465650,
    "o": {"s": "BTCUSDT", "c": "qt-" + "a" * 32, "S": "SELL", "o": "MARKET", "f": "GTC", "q": "0.001", "p": "0",
          "ap": "9000.1", "sp": "0", "x": "TRADE", "X": "FILLED", "i": 8886774, "l": "0.001", "z": "0.001",
          "L": "9000.1", "N": "USDT", "n": "0.0036", "T": 1568879465650, "t": 77, "b": "0", "a": "0", "m": False,
          "R": True, "wt": "CONTRACT_PRICE", "ot": "MARKET", "ps": "BOTH", "cp": False, "rp": "0.5", "pP": False,
          "si": 0, "ss": 0, "V": "NONE", "pm": "NONE", "gtd": 0},
}  # fmt: skip


def test_events_decode_from_binances_shapes() -> None:
    order = decode_event(json.dumps(ORDER))
    assert isinstance(order, OrderTradeUpdate)
    assert (order.o.c, order.o.x, order.o.X, order.o.z, order.o.R, order.o.t) == (
        "qt-" + "a" * 32, "TRADE", "FILLED", Decimal("0.001"), True, 77
    )  # fmt: skip
    account = {"e": "ACCOUNT_UPDATE", "E": 2, "T": 1, "a": {"m": "ORDER", "B": [], "P": [
        {"s": "BTCUSDT", "pa": "-0.020", "ep": "9000", "cr": "0", "up": "0", "mt": "cross", "iw": "0", "ps": "BOTH"}
    ]}}  # fmt: skip
    update = decode_event(json.dumps({"stream": "key", "data": account}))  # the combined form
    assert isinstance(update, AccountUpdate) and update.a.P[0].pa == Decimal("-0.020")
    mark = decode_event('{"e":"markPriceUpdate","E":5,"s":"BTCUSDT","p":"60000.10","r":"0","T":0}')
    assert isinstance(mark, MarkPriceUpdate) and mark.p == Decimal("60000.10")
    assert decode_event('{"result": null, "id": 1}') is None
    assert decode_event('{"e": "TRADE_LITE", "E": 1}') is None  # a type the chain does not follow


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"\x80\x81abc", "not UTF-8 at byte 0"),
        (b'{"e": "ACCOUNT_UPDATE", "E": 1, "T": 1, "a": {"m": "ORDER", "P": [{"s": "X", "pa": "lots"}]}}', "$.a.P[0]"),
        ('{"e": "ORDER_TRADE_UPDATE", "E": "soon"}', "ORDER_TRADE_UPDATE"),
        ("[1, 2", "not JSON"),
        (b"{" + b" " * (1 << 20) + b"}", "bytes"),
    ],
)
def test_a_bad_frame_says_what_and_where(frame: str | bytes, message: str) -> None:
    with pytest.raises(BadStreamEvent, match=message.replace("$", r"\$").replace("[", r"\[").replace("]", r"\]")):
        decode_event(frame)


def test_a_poll_shows_a_change_the_stream_missed_once_it_had_time_to_bring_it() -> None:
    held, read = Decimal("2"), Decimal("1.7")
    assert stream_gap(held, read, 8_000, pushed_ms=5_000, asked_ms=10_000, grace_ms=1_000) == "missed"
    assert stream_gap(held, read, 9_000, pushed_ms=5_000, asked_ms=10_000, grace_ms=1_000) == "missed"  # the grace
    assert stream_gap(held, read, 9_001, pushed_ms=5_000, asked_ms=10_000, grace_ms=1_000) == "young"  # on its way?
    # the stream carried that change (an event not yet written, or one passed over as stale): not missed
    assert stream_gap(held, read, 8_000, pushed_ms=8_000, asked_ms=10_000, grace_ms=1_000) is None
    assert stream_gap(read, read, 1_000, pushed_ms=-1, asked_ms=10_000, grace_ms=1_000) is None  # shown already
    assert stream_gap(None, read, 1_000, pushed_ms=-1, asked_ms=10_000, grace_ms=1_000) is None  # nothing held yet
    assert still_missed(pushed_ms=9_000, read_update_ms=9_500) and not still_missed(9_500, 9_500)


def test_every_position_event_counts_as_brought_even_one_passed_over_as_stale() -> None:
    sequence = Sequence()
    assert sequence.resynced("BTCUSDT", 5_000)
    assert not sequence.position("BTCUSDT", 5_000, 5_001)  # stale against the read of its own millisecond
    assert sequence.pushed["BTCUSDT"] == 5_000
    assert sequence.position("BTCUSDT", 6_000, 6_001) and sequence.pushed["BTCUSDT"] == 6_000
    assert not sequence.position("BTCUSDT", 5_500, 5_501) and sequence.pushed["BTCUSDT"] == 6_000  # late: kept max
