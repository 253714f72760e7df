"""Garbage in the fields of Binance's replies that the parsers read as numbers: an order's ``updateTime`` and a
symbol's ``MIN_NOTIONAL`` notional. (Documented shapes and the other fields: test_exchange_parsing.py.)"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.exchange.replies import parse_filters, parse_order

ORDER: dict[str, Any] = {
    "orderId": 4095123456,
    "symbol": "SOLUSDT",
    "status": "FILLED",
    "clientOrderId": "qt-00000000000000e1",
    "avgPrice": "150.10",
    "executedQty": "1",
    "side": "SELL",
    "updateTime": 1700000000456,
}


@pytest.mark.parametrize(
    "value",
    ["soon", "1.5", "1e12", "NaN", "0x10", [1700000000456], {"ms": 1700000000456}],
    ids=["word", "fraction-string", "exponent-string", "nan-string", "hex-string", "list", "object"],
)
def test_an_order_update_time_that_is_not_an_integer_is_a_value_error(value: Any) -> None:
    """ValueError, never TypeError: the adapter maps exactly ValueError/TypeError of a reply to OutcomeUnknown (an
    order) or ExchangeUnavailable (a lookup), and the message says which field it was."""
    with pytest.raises(ValueError, match=r"^field 'updateTime' is not a number$"):
        parse_order({**ORDER, "updateTime": value})


@pytest.mark.parametrize(("value", "expected"), [("1700000000456", 1700000000456), (None, 0), ("", 0), (0, 0)])
def test_an_order_update_time_as_a_string_or_absent_is_read(value: Any, expected: int) -> None:
    assert parse_order({**ORDER, "updateTime": value}).update_time_ms == expected


def sol_entry(notional: Any) -> dict[str, Any]:
    return {
        "symbol": "SOLUSDT",
        "filters": [
            {"filterType": "LOT_SIZE", "maxQty": "1000000", "minQty": "1", "stepSize": "1"},
            {"filterType": "MARKET_LOT_SIZE", "maxQty": "5000", "minQty": "1", "stepSize": "1"},
            {"filterType": "MIN_NOTIONAL", "notional": notional},
        ],
    }


@pytest.mark.parametrize(
    "notional",
    ["five", "", "5,0", "5 USDT", None, [5], {"value": "5"}],
    ids=["word", "empty", "comma", "unit", "null", "list", "object"],
)
def test_a_garbled_min_notional_keeps_the_symbol_with_no_notional_floor(notional: Any) -> None:
    """The lot size is what a reduce-only close needs (Binance waives the notional floor for reduce-only), so an
    unreadable notional costs the symbol nothing: it is kept with min_notional 0 and the load goes on."""
    info = {"symbols": [sol_entry(notional), sol_entry("5") | {"symbol": "XRPUSDT"}]}
    assert parse_filters(info) == {
        "SOLUSDT": SymbolFilters("SOLUSDT", Decimal(1), Decimal(1), Decimal(5000), Decimal(0)),
        "XRPUSDT": SymbolFilters("XRPUSDT", Decimal(1), Decimal(1), Decimal(5000), Decimal(5)),
    }
