"""Quantity arithmetic. Quantities are Decimals end to end; floats only appear in permit JSON (the contract)."""

from __future__ import annotations

from decimal import ROUND_DOWN, Decimal, InvalidOperation, localcontext


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
    """Largest multiple of ``step`` not above ``qty`` (never rounds a close up past the position)."""
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    if qty <= 0:
        return Decimal(0)
    with localcontext() as ctx:
        ctx.prec = 120  # exact for any realistic quantity: the default 28 digits can round the quotient up
        steps = (qty / step).to_integral_value(rounding=ROUND_DOWN)
        result = steps * step
        if result > qty:  # belt and braces: never above what was asked
            result -= step
        return result.quantize(step) if result.adjusted() < 60 else result


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
