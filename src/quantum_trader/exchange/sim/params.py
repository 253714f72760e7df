"""Binance's request parameters in, its number strings out: ``EngineError``, the ``parse_*`` helpers and ``fmt``.

Every parameter reaches the engine as a string, as Binance receives it; a malformed one is refused with Binance's
own code (-1102 missing or malformed, -1130 not valid, -1106 sent when not required).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Final

Json = dict[str, Any]

ZERO: Final = Decimal(0)
ONE: Final = Decimal(1)
_NUMBER_RE: Final = re.compile(r"^-?(\d+\.?\d*|\.\d+)$")


class EngineError(Exception):
    """A Binance-style rejection: ``{"code": code, "msg": msg}`` served with ``http_status``."""

    def __init__(self, code: int, msg: str, http_status: int = 400) -> None:
        super().__init__(f"{code} {msg}")
        self.code = code
        self.msg = msg
        self.http_status = http_status

    def body(self) -> Json:
        return {"code": self.code, "msg": self.msg}


def mandatory(name: str) -> EngineError:
    return EngineError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


def not_valid(name: str) -> EngineError:
    return EngineError(-1130, f"Data sent for parameter '{name}' is not valid.")


def not_required(name: str) -> EngineError:
    return EngineError(-1106, f"Parameter '{name}' sent when not required.")


def require(params: Mapping[str, str], name: str) -> str:
    value = params.get(name)
    if value is None or value == "":
        raise mandatory(name)
    return value


def parse_decimal(params: Mapping[str, str], name: str) -> Decimal:
    raw = require(params, name)
    if not _NUMBER_RE.match(raw):
        raise mandatory(name)
    try:
        return Decimal(raw)
    except InvalidOperation:
        raise mandatory(name) from None


def parse_bool(params: Mapping[str, str], name: str) -> bool | None:
    raw = params.get(name)
    if raw is None:
        return None
    lowered = raw.lower()
    if lowered not in ("true", "false"):
        raise not_valid(name)
    return lowered == "true"


def parse_int(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not raw.lstrip("-").isdigit():
        raise mandatory(name)
    return int(raw)


def decimals_of(step: Decimal) -> int:
    exponent = step.normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


_QUANTS: dict[int, Decimal] = {}


def fmt(value: Decimal, places: int) -> str:
    """``value`` with exactly ``places`` decimals, as Binance prints prices and quantities (never ``-0``)."""
    quant = _QUANTS.get(places)
    if quant is None:
        quant = _QUANTS[places] = Decimal(1).scaleb(-places)
    out = value.quantize(quant, rounding=ROUND_HALF_UP)
    return f"{out if out else abs(out):f}"


def plain(value: Decimal, max_places: int = 8) -> str:
    """A trimmed decimal (``60000.1``, ``0.0`` for zero) as Binance prints entry prices."""
    out = value.quantize(Decimal(1).scaleb(-max_places), rounding=ROUND_HALF_UP).normalize()
    if not out:
        return "0.0"
    return f"{out:f}"
