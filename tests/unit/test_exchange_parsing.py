"""Exchange replies and failures: classification of errors, and parsing of Binance's documented JSON shapes."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import pytest
from ccxt.base.errors import ExchangeError as CcxtExchangeError
from ccxt.base.errors import (
    ExchangeNotAvailable,
    InsufficientFunds,
    InvalidOrder,
    NetworkError,
    RequestTimeout,
)

from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.exchange.base import (
    ExchangeRejected,
    ExchangeUnavailable,
    OrderReport,
    OutcomeUnknown,
    PositionInfo,
)
from quantum_trader.exchange.errors import (
    MAX_RAW_IN_LOG,
    REJECTION_CODES,
    UNKNOWN_OUTCOME_CODES,
    binance_code,
    classify_order_error,
    classify_read_error,
    truncate,
)
from quantum_trader.exchange.replies import parse_filters, parse_order, parse_position, parse_rate_limits
from quantum_trader.exchange.throttle import RateGuard

D = Decimal


def ccxt_error(cls: type[Exception], code: int, msg: str) -> Exception:
    """An exception as ccxt raises it for a Binance error reply: exchange id, then the body."""
    return cls(f'binanceusdm {{"code":{code},"msg":"{msg}"}}')


# --- classify_order_error ---------------------------------------------------------------------------------

REJECTIONS = [
    (-1013, "Filter failure: LOT_SIZE", InvalidOrder),
    (-1100, "Illegal characters found in parameter 'quantity'.", CcxtExchangeError),
    (-1102, "Mandatory parameter 'quantity' was not sent, was empty/null, or malformed.", CcxtExchangeError),
    (-1106, "Parameter 'price' sent when not required.", CcxtExchangeError),
    (-1111, "Precision is over the maximum defined for this asset.", InvalidOrder),
    (-1116, "Invalid orderType.", InvalidOrder),
    (-1117, "Invalid side.", InvalidOrder),
    (-2010, "Order would immediately trigger.", InvalidOrder),
    (-2019, "Margin is insufficient.", InsufficientFunds),
    (-2022, "ReduceOnly Order is rejected.", InvalidOrder),
    (-4003, "Quantity less than or equal to zero.", InvalidOrder),
    (-4004, "Quantity greater than max quantity.", InvalidOrder),
    (-4005, "Quantity greater than max quantity.", InvalidOrder),
    (-4061, "Order's position side does not match user's setting.", InvalidOrder),
    (-4164, "Order's notional must be no smaller than 100 (unless you choose reduce only).", InvalidOrder),
]


def test_rejection_table_covers_every_rejection_code() -> None:
    assert {code for code, _, _ in REJECTIONS} == REJECTION_CODES
    assert not REJECTION_CODES & UNKNOWN_OUTCOME_CODES


@pytest.mark.parametrize(("code", "msg", "cls"), REJECTIONS)
def test_rejection_codes(code: int, msg: str, cls: type[Exception]) -> None:
    error = classify_order_error(ccxt_error(cls, code, msg))
    assert type(error) is ExchangeRejected
    assert error.code == code
    assert error.message == msg
    assert str(error) == msg


@pytest.mark.parametrize(
    ("code", "msg"),
    [
        (-1007, "Timeout waiting for response from backend server. Send status unknown; execution status unknown."),
        (-1001, "Internal error; unable to process your request. Please try again."),
        (-1000, "An unknown error occured while processing the request."),
        (-1006, "An unexpected response was received from the message bus. Execution status unknown."),
        (-1008, "Server is currently overloaded with other requests. Please try again in a few minutes."),
        (-4116, "ClientOrderId is duplicated."),  # the order may well exist: not a rejection
        (-2013, "Order does not exist."),
        (-9999, "A code nobody has seen before."),
    ],
)
def test_unknown_outcome_codes(code: int, msg: str) -> None:
    error = classify_order_error(ccxt_error(ExchangeNotAvailable, code, msg))
    assert type(error) is OutcomeUnknown
    assert error.code == code
    assert error.message == f"{msg} (code {code})"


@pytest.mark.parametrize(
    "exc",
    [
        RequestTimeout("binanceusdm POST https://fapi.binance.com/fapi/v1/order request timeout (5000 ms)"),
        NetworkError("binanceusdm POST https://fapi.binance.com/fapi/v1/order Connection reset by peer"),
        ExchangeNotAvailable("binanceusdm POST https://fapi.binance.com/fapi/v1/order 503 Service Unavailable"),
        TimeoutError(),
        ConnectionResetError(104, "Connection reset by peer"),
        CcxtExchangeError('binanceusdm {"msg":"code missing","code":-2019}'),  # not Binance's field order
    ],
)
def test_exceptions_without_a_code_are_unknown(exc: Exception) -> None:
    error = classify_order_error(exc)
    assert type(error) is OutcomeUnknown
    assert error.code == 0
    assert error.message.startswith(f"{type(exc).__name__}: ")
    assert str(exc) in error.message


def test_long_messages_without_a_code_are_truncated() -> None:
    body = "<html>" + "x" * 5000 + "</html>"
    error = classify_order_error(NetworkError(body))
    assert error.message == f"NetworkError: {body[:MAX_RAW_IN_LOG]}…"
    assert len(error.message) < MAX_RAW_IN_LOG + 40


def test_truncate() -> None:
    assert truncate("abc") == "abc"
    assert truncate("x" * MAX_RAW_IN_LOG) == "x" * MAX_RAW_IN_LOG
    assert truncate("x" * (MAX_RAW_IN_LOG + 1)) == "x" * MAX_RAW_IN_LOG + "…"
    assert truncate("abcdef", 3) == "abc…"


def test_binance_code_parsing() -> None:
    assert binance_code('binanceusdm {"code":-2019,"msg":"Margin is insufficient."}') == (
        -2019,
        "Margin is insufficient.",
    )
    assert binance_code('{"code": -1013 , "msg" : "Filter failure: LOT_SIZE"}') == (-1013, "Filter failure: LOT_SIZE")
    assert binance_code('{"code":-1102,"msg":"Param \\"quantity\\" bad"}') == (-1102, 'Param \\"quantity\\" bad')
    assert binance_code("request timeout") is None
    assert binance_code('{"code":"x","msg":"y"}') is None


def test_code_found_inside_a_longer_text() -> None:
    exc = InvalidOrder(
        'binanceusdm POST https://fapi.binance.com/fapi/v1/order 400 {"code":-2022,"msg":"ReduceOnly'
        ' Order is rejected."} headers={...}'
    )
    error = classify_order_error(exc)
    assert isinstance(error, ExchangeRejected)
    assert error.code == -2022


# --- classify_read_error ----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [-2019, -1007, -1021, -2015])
def test_read_errors_with_a_code_are_unavailable(code: int) -> None:
    error = classify_read_error(ccxt_error(CcxtExchangeError, code, "some message"))
    assert type(error) is ExchangeUnavailable
    assert error.code == code
    assert error.message == f"some message (code {code})"


def test_read_errors_without_a_code_are_unavailable_and_truncated() -> None:
    error = classify_read_error(RequestTimeout("y" * 1000))
    assert type(error) is ExchangeUnavailable
    assert error.code == 0
    assert error.message == f"RequestTimeout: {'y' * MAX_RAW_IN_LOG}…"


# --- parse_position ---------------------------------------------------------------------------------------

POSITION_ROW: dict[str, Any] = {
    "symbol": "BTCUSDT",
    "positionAmt": "-0.250",
    "entryPrice": "64000.1",
    "breakEvenPrice": "64025.72",
    "markPrice": "64123.45000000",
    "unRealizedProfit": "-30.83750000",
    "liquidationPrice": "70110.12",
    "leverage": "20",
    "maxNotionalValue": "25000000",
    "marginType": "cross",
    "isolatedMargin": "0.00000000",
    "isAutoAddMargin": "false",
    "positionSide": "BOTH",
    "notional": "-16030.86",
    "isolatedWallet": "0",
    "updateTime": 1700000000123,
}


def test_parse_position() -> None:
    assert parse_position(POSITION_ROW) == PositionInfo(
        symbol="BTCUSDT",
        amt=D("-0.250"),
        entry_price=D("64000.1"),
        mark_price=D("64123.45000000"),
        update_time_ms=1700000000123,
    )


def test_parse_flat_position_and_numeric_values() -> None:
    row = {**POSITION_ROW, "positionAmt": "0.000", "entryPrice": "0.0", "updateTime": 0}
    info = parse_position(row)
    assert info.amt == 0
    assert info.update_time_ms == 0
    # Numbers given as JSON numbers rather than strings are read the same way.
    info = parse_position({**POSITION_ROW, "positionAmt": 0.002, "markPrice": 64123})
    assert info.amt == D("0.002")
    assert info.mark_price == D("64123")


def test_parse_position_without_update_time() -> None:
    row = dict(POSITION_ROW)
    del row["updateTime"]
    assert parse_position(row).update_time_ms == 0


@pytest.mark.parametrize("field", ["positionAmt", "entryPrice", "markPrice"])
@pytest.mark.parametrize("value", [None, "", "abc", "1,5", "NaN", "nan", "Infinity", "-inf", [], {}])
def test_parse_position_rejects_bad_numbers(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        parse_position({**POSITION_ROW, field: value})


@pytest.mark.parametrize("field", ["positionAmt", "entryPrice", "markPrice"])
def test_parse_position_rejects_missing_numbers(field: str) -> None:
    row = dict(POSITION_ROW)
    del row[field]
    with pytest.raises(ValueError, match=f"{field}.*missing"):
        parse_position(row)


def test_parse_position_rejects_bad_update_time() -> None:
    with pytest.raises(ValueError):
        parse_position({**POSITION_ROW, "updateTime": "soon"})


# --- parse_order ------------------------------------------------------------------------------------------

ORDER_REPLY: dict[str, Any] = {
    "orderId": 4095123456,
    "symbol": "BTCUSDT",
    "status": "FILLED",
    "clientOrderId": "qt-0123456789abcdef",
    "price": "0.00",
    "avgPrice": "64120.10000",
    "origQty": "0.250",
    "executedQty": "0.250",
    "cumQty": "0.250",
    "cumQuote": "16030.02500",
    "timeInForce": "GTC",
    "type": "MARKET",
    "reduceOnly": True,
    "closePosition": False,
    "side": "BUY",
    "positionSide": "BOTH",
    "stopPrice": "0.00",
    "workingType": "CONTRACT_PRICE",
    "priceProtect": False,
    "origType": "MARKET",
    "priceMatch": "NONE",
    "selfTradePreventionMode": "EXPIRE_MAKER",
    "goodTillDate": 0,
    "updateTime": 1700000000456,
}


def test_parse_order_filled() -> None:
    report = parse_order(ORDER_REPLY)
    assert report == OrderReport(
        order_id="4095123456",
        client_order_id="qt-0123456789abcdef",
        status="FILLED",
        executed_qty=D("0.250"),
        avg_price=D("64120.10000"),
        side="BUY",
        update_time_ms=1700000000456,
    )
    assert report.filled


@pytest.mark.parametrize("status", ["EXPIRED", "NEW", "CANCELED"])
def test_parse_order_not_filled(status: str) -> None:
    reply = {**ORDER_REPLY, "status": status, "executedQty": "0.000", "avgPrice": "0.00"}
    report = parse_order(reply)
    assert report.status == status
    assert report.executed_qty == 0
    assert report.avg_price == 0
    assert not report.filled


@pytest.mark.parametrize("avg", [None, ""])
def test_parse_order_without_avg_price(avg: Any) -> None:
    assert parse_order({**ORDER_REPLY, "avgPrice": avg}).avg_price == 0
    reply = dict(ORDER_REPLY)
    del reply["avgPrice"]
    assert parse_order(reply).avg_price == 0


def test_parse_order_without_client_order_id() -> None:
    reply = dict(ORDER_REPLY)
    del reply["clientOrderId"]
    assert parse_order(reply).client_order_id == ""


@pytest.mark.parametrize("reply", [None, [], "FILLED", 42, [ORDER_REPLY]])
def test_parse_order_rejects_non_objects(reply: Any) -> None:
    with pytest.raises(ValueError, match="not an object"):
        parse_order(reply)


@pytest.mark.parametrize(
    ("changes", "removed", "match"),
    [
        ({}, "executedQty", "executedQty"),
        ({"executedQty": "NaN"}, None, "executedQty"),
        ({"executedQty": "lots"}, None, "executedQty"),
        ({"avgPrice": "NaN"}, None, "avgPrice"),
        ({"avgPrice": "Infinity"}, None, "avgPrice"),
        ({"avgPrice": "n/a"}, None, "avgPrice"),
        ({}, "status", "status or orderId"),
        ({"status": None}, None, "status or orderId"),
        ({"status": 3}, None, "status or orderId"),
        ({}, "orderId", "status or orderId"),
    ],
)
def test_parse_order_rejects_malformed(changes: dict[str, Any], removed: str | None, match: str) -> None:
    reply = {**ORDER_REPLY, **changes}
    if removed:
        del reply[removed]
    with pytest.raises(ValueError, match=match):
        parse_order(reply)


# --- parse_filters ----------------------------------------------------------------------------------------


def btc_entry() -> dict[str, Any]:
    return {
        "symbol": "BTCUSDT",
        "pair": "BTCUSDT",
        "contractType": "PERPETUAL",
        "status": "TRADING",
        "baseAsset": "BTC",
        "quoteAsset": "USDT",
        "pricePrecision": 2,
        "quantityPrecision": 3,
        "filters": [
            {"filterType": "PRICE_FILTER", "maxPrice": "4529764", "minPrice": "556.80", "tickSize": "0.10"},
            {"filterType": "LOT_SIZE", "maxQty": "1000", "minQty": "0.001", "stepSize": "0.001"},
            {"filterType": "MARKET_LOT_SIZE", "maxQty": "120", "minQty": "0.001", "stepSize": "0.001"},
            {"filterType": "MAX_NUM_ORDERS", "limit": 200},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
            {"filterType": "MIN_NOTIONAL", "notional": "100"},
            {"filterType": "PERCENT_PRICE", "multiplierUp": "1.0500", "multiplierDown": "0.9500"},
        ],
    }


def xrp_entry() -> dict[str, Any]:
    return {
        "symbol": "XRPUSDT",
        "filters": [
            {"filterType": "LOT_SIZE", "maxQty": "10000000", "minQty": "0.1", "stepSize": "0.1"},
            {"filterType": "MARKET_LOT_SIZE", "maxQty": "2000000", "minQty": "0.1", "stepSize": "0.1"},
            {"filterType": "MIN_NOTIONAL", "notional": "5"},
        ],
    }


def exchange_info(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"timezone": "UTC", "serverTime": 1700000000000, "rateLimits": [], "symbols": list(entries)}


def test_parse_filters_uses_market_lot_size() -> None:
    assert parse_filters(exchange_info(btc_entry(), xrp_entry())) == {
        "BTCUSDT": SymbolFilters("BTCUSDT", D("0.001"), D("0.001"), D("120"), D("100")),
        "XRPUSDT": SymbolFilters("XRPUSDT", D("0.1"), D("0.1"), D("2000000"), D("5")),
    }


def test_parse_filters_falls_back_to_lot_size() -> None:
    entry = btc_entry()
    entry["filters"] = [f for f in entry["filters"] if f["filterType"] != "MARKET_LOT_SIZE"]
    assert parse_filters(exchange_info(entry))["BTCUSDT"].max_qty == D("1000")


def test_parse_filters_zero_market_step_falls_back_to_lot_size() -> None:
    entry = btc_entry()
    entry["filters"][2] = {"filterType": "MARKET_LOT_SIZE", "maxQty": "120", "minQty": "0", "stepSize": "0"}
    filters = parse_filters(exchange_info(entry))["BTCUSDT"]
    assert filters.step_size == D("0.001")
    assert filters.max_qty == D("1000")


def test_parse_filters_normalizes_step_and_defaults_notional() -> None:
    entry = btc_entry()
    entry["filters"] = [{"filterType": "LOT_SIZE", "maxQty": "1000", "minQty": "0.0010", "stepSize": "0.00100000"}]
    filters = parse_filters(exchange_info(entry))["BTCUSDT"]
    assert str(filters.step_size) == "0.001"
    assert filters.min_notional == 0


@pytest.mark.parametrize(
    "info",
    [None, [], "exchangeInfo", {}, {"symbols": []}, {"symbols": [{"symbol": "BTCUSDT"}]}],
)
def test_parse_filters_empty_or_absent(info: Any) -> None:
    assert parse_filters(info) == {}


@pytest.mark.parametrize(
    "lot",
    [
        {"filterType": "LOT_SIZE", "maxQty": "1000", "minQty": "0.001"},  # no stepSize
        {"filterType": "LOT_SIZE", "maxQty": "1000", "stepSize": "0.001"},  # no minQty
        {"filterType": "LOT_SIZE", "minQty": "0.001", "stepSize": "0.001"},  # no maxQty
        {"filterType": "LOT_SIZE", "maxQty": "1000", "minQty": "0.001", "stepSize": "tiny"},
        {"filterType": "LOT_SIZE", "maxQty": "lots", "minQty": "0.001", "stepSize": "0.001"},
        {"filterType": "LOT_SIZE", "maxQty": "1000", "minQty": "0.001", "stepSize": "NaN"},
    ],
)
def test_parse_filters_skips_malformed_symbols(lot: dict[str, Any]) -> None:
    bad = {"symbol": "BTCUSDT", "filters": [lot]}
    assert parse_filters(exchange_info(bad, xrp_entry())) == parse_filters(exchange_info(xrp_entry()))


def test_parse_filters_skips_entries_without_symbol_and_non_object_filters() -> None:
    no_symbol = btc_entry()
    del no_symbol["symbol"]
    junk_filters = {"symbol": "ETHUSDT", "filters": ["LOT_SIZE", None, 3]}
    assert set(parse_filters(exchange_info(no_symbol, junk_filters, xrp_entry()))) == {"XRPUSDT"}


@pytest.mark.parametrize(
    "lot",
    [
        {"filterType": "LOT_SIZE", "maxQty": "1000", "minQty": "NaN", "stepSize": "0.001"},
        {"filterType": "LOT_SIZE", "maxQty": "NaN", "minQty": "0.001", "stepSize": "0.001"},
        {"filterType": "LOT_SIZE", "maxQty": "1000", "minQty": "0.001", "stepSize": "Infinity"},
        {"filterType": "LOT_SIZE", "maxQty": "1000", "minQty": "0.001", "stepSize": "-0.001"},
        {"filterType": "MARKET_LOT_SIZE", "maxQty": "120", "minQty": "0.001", "stepSize": "0"},
    ],
    ids=["nan-min", "nan-max", "inf-step", "negative-step", "zero-step-no-fallback"],
)
def test_parse_filters_skips_non_finite_or_non_positive_values(lot: dict[str, Any]) -> None:
    assert parse_filters(exchange_info({"symbol": "BTCUSDT", "filters": [lot]})) == {}


@pytest.mark.parametrize(
    "bad_entry", ["BTCUSDT", None, {"symbol": "BTCUSDT", "filters": None}], ids=["string", "null", "null-filters"]
)
def test_parse_filters_skips_non_object_entries(bad_entry: Any) -> None:
    info = exchange_info(copy.deepcopy(bad_entry), xrp_entry())
    assert set(parse_filters(info)) == {"XRPUSDT"}


def test_rate_limits_are_read_from_exchange_info() -> None:
    info = {
        "rateLimits": [
            {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
            {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": 2400},
            {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 500},
        ]
    }
    assert parse_rate_limits(info) == {"weight_limit": 6000, "orders_1m_limit": 2400, "orders_10s_limit": 500}


@pytest.mark.parametrize(
    "entries",
    [
        None,
        "nonsense",
        [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": "6000"}],
        [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": -1}],
        [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": True}],
        [{"rateLimitType": "REQUEST_WEIGHT", "interval": "SECOND", "intervalNum": 10, "limit": 50}],
        [{"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000}],
        [42, None],
    ],
)
def test_unusable_rate_limits_are_skipped(entries: Any) -> None:
    """An odd reply keeps the guard's documented defaults instead of adopting nonsense."""
    assert parse_rate_limits({"rateLimits": entries}) == {}
    guard = RateGuard()
    guard.adopt_limits(parse_rate_limits({"rateLimits": entries}))
    assert (guard.weight_limit, guard.orders_10s_limit, guard.orders_1m_limit) == (2400, 300, 1200)


def test_the_guard_waits_by_the_adopted_limits() -> None:
    guard = RateGuard()
    guard.observe(1000, 200, {"X-MBX-USED-WEIGHT-1M": "5000"})
    assert guard.wait_ms(1000, 1) > 0  # over 0.8 x 2400: wait for the next minute
    guard.adopt_limits({"weight_limit": 10_000})
    assert guard.wait_ms(1000, 1) == 0  # 5000 + 1 fits under 0.8 x 10,000
