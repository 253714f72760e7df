"""Quantity arithmetic. Quantities are Decimals end to end; floats only appear in permit JSON (the contract)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation


def to_decimal(value: float | int | str | Decimal) -> Decimal:
    """Exact decimal of a wire number. Floats go through repr so 0.002 stays 0.002, not 0.00200000000000000004."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"not a finite number: {value!r}")
        return value
    try:
        result = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r}") from None
    if not result.is_finite():
        raise ValueError(f"not a finite number: {value!r}")
    return result


def round_down_to_step(qty: Decimal, step: Decimal) -> Decimal:
    """Largest multiple of ``step`` not above ``qty`` (never rounds a close up past the position), with the
    step's exponent. Exact for every finite input: computed on integers, so no context precision can round the
    quotient up (a 28- or even 120-digit context can, for long enough quantities)."""
    if not (qty.is_finite() and step.is_finite()):
        raise ValueError(f"quantity and step must be finite, got {qty} and {step}")
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    if qty < step:  # (also keeps the integers small: a hostile 1E-999999 never becomes 10**999999)
        return Decimal(0)
    q_coeff, q_exp = _integer(qty)
    s_coeff, s_exp = _integer(step)
    low = min(q_exp, s_exp)  # both as integers in units of 10**low
    steps = (q_coeff * 10 ** (q_exp - low)) // (s_coeff * 10 ** (s_exp - low))
    return Decimal((0, tuple(int(d) for d in str(steps * s_coeff)), s_exp))  # built exactly, no context


def _integer(value: Decimal) -> tuple[int, int]:
    """(coefficient, exponent) of a positive finite Decimal (its only callers' inputs): value ==
    coefficient * 10**exponent."""
    sign, digits, exponent = value.as_tuple()
    assert sign == 0 and isinstance(exponent, int), value
    return int("".join(map(str, digits))), exponent


def format_qty(qty: Decimal, step: Decimal) -> str:
    """The quantity with exactly the step's decimals, as Binance wants it."""
    return format(qty.quantize(step), "f")


def is_multiple(qty: Decimal, step: Decimal) -> bool:
    return step > 0 and (qty % step) == 0


def relative_diff_pct(a: Decimal, b: Decimal) -> Decimal:
    """|a - b| as a percentage of the larger magnitude (0 when both are 0)."""
    scale = max(abs(a), abs(b))
    if scale == 0:
        return Decimal(0)
    return abs(a - b) * 100 / scale
