"""domain/clocks.py: the error of a reading as it ages, the verdict from this host's reading and its peers', and
the reading's text in the store (a hostile writer's text is an error, never a reading)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.domain.clocks import DRIFT_MS_PER_S, UNMEASURED, ClockReading, decode, encode, judge

NOW = 1_700_000_000.0
BOUNDS = {"max_error_ms": 250.0, "max_host_gap_ms": 500.0}


def test_a_reading_grows_uncertain_with_the_drift_since_it_was_measured() -> None:
    reading = ClockReading(offset_ms=12.0, error_ms=3.0, measured_at=NOW)
    assert reading.error_at(NOW) == 3.0
    assert reading.error_at(NOW + 600) == pytest.approx(3.0 + 600 * DRIFT_MS_PER_S)
    assert reading.error_at(NOW - 5) == 3.0  # a clock that stepped back makes it no more certain


def test_without_a_reading_apply_fails_closed() -> None:
    assert judge(None, [], NOW, **BOUNDS) is UNMEASURED and not UNMEASURED.ok


def test_alone_and_precise_the_clocks_allow_everything() -> None:
    state = judge(ClockReading(40.0, 2.0, NOW), [], NOW, **BOUNDS)
    assert state.ok and (state.own_error_ms, state.host_gap_ms) == (2.0, 0.0)


def test_an_uncertain_offset_fails_closed_and_says_by_how_much() -> None:
    state = judge(ClockReading(0.0, 251.0, NOW), [], NOW, **BOUNDS)
    assert not state.ok and "uncertain by 251 ms" in state.problem
    aged = judge(ClockReading(0.0, 5.0, NOW - 3000), [], NOW, **BOUNDS)  # 5 + 300 ms of drift
    assert not aged.ok


def test_the_gap_to_a_peer_is_the_offsets_difference_plus_both_errors() -> None:
    own, peer = ClockReading(100.0, 2.0, NOW), ClockReading(-150.0, 3.0, NOW)
    state = judge(own, [peer], NOW, **BOUNDS)
    assert state.ok and state.host_gap_ms == pytest.approx(250.0 + 2.0 + 3.0)
    far = judge(own, [peer, ClockReading(-400.0, 1.0, NOW)], NOW, **BOUNDS)
    assert not far.ok and far.host_gap_ms == pytest.approx(500.0 + 3.0) and "differs" in far.problem


@given(
    offset=st.floats(-1e7, 1e7, allow_nan=False),
    error=st.floats(0, 1e5, allow_nan=False),
    measured_at=st.floats(0, 4e9, allow_nan=False),
    published_at=st.floats(0, 4e9, allow_nan=False),
)
def test_a_reading_survives_the_store(offset: float, error: float, measured_at: float, published_at: float) -> None:
    reading = ClockReading(offset, error, measured_at)
    assert decode(encode(reading, published_at)) == (reading, published_at)


@pytest.mark.parametrize("text", ["", "1|2|3", "1|2|3|4|5", "a|2|3|4", "nan|2|3|4", "1|inf|3|4", "1|-2|3|4", "\udcff"])
def test_anything_else_in_the_store_is_no_reading(text: str) -> None:
    with pytest.raises(ValueError):
        decode(text)


def test_every_bound_is_finite_in_the_verdict_text() -> None:
    state = judge(ClockReading(0.0, math.inf, NOW), [], NOW, **BOUNDS)
    assert not state.ok
