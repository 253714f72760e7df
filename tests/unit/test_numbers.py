"""Quantity arithmetic: Decimals end to end, rounding that never closes more than asked."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.domain.numbers import format_qty, is_multiple, relative_diff_pct, round_down_to_step, to_decimal

D = Decimal

# --- round_down_to_step -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qty", "step", "expected"),
    [
        ("0.0567", "0.001", "0.056"),
        ("0.056", "0.001", "0.056"),
        ("0.0569999", "0.001", "0.056"),
        ("1", "0.001", "1.000"),
        ("123.456", "1", "123"),
        ("123.456", "10", "120"),
        ("0.75", "0.5", "0.5"),
        ("1.0", "0.3", "0.9"),
        ("0.0009", "0.001", "0"),
        ("0", "0.001", "0"),
        ("-1", "0.001", "0"),
    ],
)
def test_round_down_examples(qty: str, step: str, expected: str) -> None:
    assert round_down_to_step(D(qty), D(step)) == D(expected)


def test_round_down_keeps_the_step_exponent() -> None:
    assert str(round_down_to_step(D("1"), D("0.001"))) == "1.000"
    assert str(round_down_to_step(D("0.5"), D("0.01"))) == "0.50"


@pytest.mark.parametrize("step", ["0", "-0.001"])
def test_round_down_rejects_non_positive_step(step: str) -> None:
    with pytest.raises(ValueError, match="step must be positive"):
        round_down_to_step(D("1"), D(step))


_steps = st.sampled_from([D("1"), D("0.1"), D("0.01"), D("0.001"), D("0.00001"), D("0.5"), D("0.25"), D("5"), D("10")])
_qtys = st.decimals(min_value=D("-1000"), max_value=D("10000000"), places=8, allow_nan=False, allow_infinity=False)


@given(qty=_qtys, step=_steps)
def test_round_down_properties(qty: Decimal, step: Decimal) -> None:
    got = round_down_to_step(qty, step)
    assert got >= 0
    assert is_multiple(got, step)
    if qty <= 0:
        assert got == 0
        return
    assert got <= qty
    assert qty - got < step  # the largest such multiple
    assert Fraction(got) == (Fraction(qty) // Fraction(step)) * Fraction(step)
    assert round_down_to_step(got, step) == got  # idempotent


@pytest.mark.parametrize(
    ("qty", "step", "expected"),
    [
        # more digits than Decimal's default 28: a rounded quotient would give 10 and 0.003, above the qty
        ("9.999999999999999999999999999", "5", "5"),
        ("0.0029999999999999999999999999999", "0.001", "0.002"),
    ],
)
def test_round_down_never_exceeds_qty_with_long_decimals(qty: str, step: str, expected: str) -> None:
    got = round_down_to_step(D(qty), D(step))
    assert got == D(expected)
    assert got.as_tuple() == D(expected).as_tuple()  # with the step's exponent, as format_qty sends it


# --- format_qty -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qty", "step", "expected"),
    [
        ("0.056", "0.001", "0.056"),
        ("1", "0.001", "1.000"),
        ("1.5", "0.1", "1.5"),
        ("120", "1", "120"),
        ("1.2E+2", "1", "120"),
        ("120", "1E+1", "120"),
        ("0.00000100", "0.000001", "0.000001"),
    ],
)
def test_format_qty(qty: str, step: str, expected: str) -> None:
    assert format_qty(D(qty), D(step)) == expected


@given(qty=_qtys, step=_steps)
def test_format_qty_of_a_rounded_qty_is_exact(qty: Decimal, step: Decimal) -> None:
    rounded = round_down_to_step(qty, step)
    text = format_qty(rounded, step)
    assert "E" not in text
    assert D(text) == rounded
    decimals = max(0, -step.as_tuple().exponent)  # type: ignore[operator]
    assert len(text.partition(".")[2]) == decimals


# --- to_decimal -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.002, "0.002"),
        (0.1, "0.1"),
        (1e-7, "1E-7"),
        (123456.789, "123456.789"),
        (1.0, "1.0"),
        (3, "3"),
        ("0.30000000000000004", "0.30000000000000004"),
        (" 1.5 ", "1.5"),
        (D("2.50"), "2.50"),
    ],
)
def test_to_decimal(value: float | int | str | Decimal, expected: str) -> None:
    got = to_decimal(value)
    assert got == D(expected)
    assert str(got) == str(D(expected))


def test_float_goes_through_repr_not_binary_expansion() -> None:
    assert to_decimal(0.002) != D(0.002)  # the binary value of 0.002 is not 0.002
    assert to_decimal(0.1) + to_decimal(0.2) == D("0.3")


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_round_trip_is_exact(value: float) -> None:
    got = to_decimal(value)
    assert float(got) == value
    assert got == D(repr(value))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "NaN", "sNaN", "Infinity", "-inf"])
def test_non_finite_rejected(value: float | str) -> None:
    with pytest.raises(ValueError, match="finite"):
        to_decimal(value)


@pytest.mark.parametrize("value", ["", "abc", "1,5", "0x10", "1.2.3"])
def test_not_a_number_rejected(value: str) -> None:
    with pytest.raises(ValueError, match="not a number"):
        to_decimal(value)


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_non_finite_decimal_rejected(value: str) -> None:
    with pytest.raises(ValueError):
        to_decimal(D(value))


# --- is_multiple / relative_diff_pct ----------------------------------------------------------------------


def test_is_multiple() -> None:
    assert is_multiple(D("0.056"), D("0.001"))
    assert not is_multiple(D("0.0565"), D("0.001"))
    assert is_multiple(D("0"), D("0.001"))
    assert not is_multiple(D("1"), D("0"))
    assert not is_multiple(D("1"), D("-1"))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("0", "0", "0"),
        ("100", "100", "0"),
        ("100", "99", "1"),
        ("99", "100", "1"),
        ("-100", "-99", "1"),
        ("1", "-1", "200"),
        ("0", "5", "100"),
        ("2", "1", "50"),
    ],
)
def test_relative_diff_pct(a: str, b: str, expected: str) -> None:
    assert relative_diff_pct(D(a), D(b)) == D(expected)


_amts = st.decimals(min_value=D("-1000000"), max_value=D("1000000"), places=6, allow_nan=False, allow_infinity=False)


@given(a=_amts, b=_amts)
def test_relative_diff_pct_properties(a: Decimal, b: Decimal) -> None:
    diff = relative_diff_pct(a, b)
    assert diff == relative_diff_pct(b, a)
    assert 0 <= diff <= 200
    assert (diff == 0) == (a == b)
    if a * b >= 0:
        assert diff <= 100  # same side (or flat): never more than 100 %
