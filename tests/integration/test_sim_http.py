"""The simulated exchange over real HTTP: a SimServer on a free port, driven by hand-signed httpx requests
and by ccxt's binanceusdm (the trading system's own code path)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import ccxt.async_support as ccxt
import httpx
import pytest
from sim_fixtures import ADMIN_TOKEN, BinanceClient, client, make_ccxt, make_client, sign, sim

from quantum_trader.exchange.sim import Engine, SimConfig, SimServer

__all__ = ["client", "sim"]  # fixtures, imported for pytest
pytestmark = pytest.mark.integration

D = Decimal


def error_of(response: httpx.Response) -> tuple[int, int, str]:
    body = response.json()
    return response.status_code, body["code"], body["msg"]


# ------------------------------------------------------------------------------------------------ public


def test_ping_time_and_exchange_info(client: BinanceClient) -> None:
    assert client.public("GET", "/fapi/v1/ping").json() == {}
    server_time = client.public("GET", "/fapi/v1/time").json()["serverTime"]
    assert abs(server_time - time.time() * 1000) < 5000
    info = client.public("GET", "/fapi/v1/exchangeInfo").json()
    assert info["timezone"] == "UTC"
    assert {(r["rateLimitType"], r["interval"], r["intervalNum"], r["limit"]) for r in info["rateLimits"]} == {
        ("REQUEST_WEIGHT", "MINUTE", 1, 2400),
        ("ORDERS", "MINUTE", 1, 1200),
        ("ORDERS", "SECOND", 10, 300),
    }
    symbols = {s["symbol"]: s for s in info["symbols"]}
    assert list(symbols) == ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT"]
    btc = symbols["BTCUSDT"]
    assert (btc["contractType"], btc["status"], btc["marginAsset"]) == ("PERPETUAL", "TRADING", "USDT")
    assert {f["filterType"] for f in btc["filters"]} >= {
        "PRICE_FILTER",
        "LOT_SIZE",
        "MARKET_LOT_SIZE",
        "MAX_NUM_ORDERS",
        "MIN_NOTIONAL",
        "PERCENT_PRICE",
    }
    assert "MARKET" in btc["orderTypes"]


def test_premium_index_and_ticker(client: BinanceClient) -> None:
    one = client.public("GET", "/fapi/v1/premiumIndex", {"symbol": "ETHUSDT"}).json()
    assert one["symbol"] == "ETHUSDT" and one["markPrice"] == "3000.00000000"
    assert set(one) >= {"indexPrice", "lastFundingRate", "nextFundingTime", "time"}
    assert one["nextFundingTime"] % (8 * 3600 * 1000) == 0
    every = client.public("GET", "/fapi/v1/premiumIndex").json()
    assert [row["symbol"] for row in every] == ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT"]
    assert client.public("GET", "/fapi/v1/ticker/price", {"symbol": "XRPUSDT"}).json()["price"] == "0.6000"
    assert len(client.public("GET", "/fapi/v1/ticker/price").json()) == 5
    assert error_of(client.public("GET", "/fapi/v1/premiumIndex", {"symbol": "NOPE"})) == (
        400,
        -1121,
        "Invalid symbol.",
    )


def test_unknown_path_is_404(client: BinanceClient) -> None:
    response = client.public("GET", "/fapi/v1/nothingHere")
    assert response.status_code == 404
    assert response.json()["code"] == -5000
    assert client.public("GET", "/fapi/v1/positionRisk").status_code == 404  # retired by Binance, not served


# ------------------------------------------------------------------------------------------------ signing


def test_signed_get_and_post(client: BinanceClient) -> None:
    assert client.signed("GET", "/fapi/v1/positionSide/dual").json() == {"dualSidePosition": False}
    response = client.order(symbol="ETHUSDT", side="BUY", quantity="0.010")
    assert response.status_code == 200, response.text


def test_signature_over_query_plus_body(client: BinanceClient) -> None:
    # Binance's example: some parameters in the query string, the rest in the body, signed as their concatenation.
    query = "symbol=ETHUSDT&side=BUY&type=MARKET"
    body = f"quantity=0.010&newOrderRespType=RESULT&timestamp={int(time.time() * 1000)}"
    signature = sign(client.api_secret, query + body)
    response = client.http.post(
        f"{client.url}/fapi/v1/order?{query}",
        content=f"{body}&signature={signature.upper()}",  # the signature is not case sensitive
        headers={"X-MBX-APIKEY": client.api_key, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "FILLED"


def test_authentication_failures(client: BinanceClient) -> None:
    path = "/fapi/v2/balance"
    invalid_key = (401, -2015, "Invalid API-key, IP, or permissions for action.")
    assert error_of(client.signed("GET", path, api_key="someone-else")) == invalid_key
    response = client.http.get(f"{client.url}{path}?timestamp={int(time.time() * 1000)}&signature=00")
    assert error_of(response) == invalid_key  # no X-MBX-APIKEY at all
    bad_signature = (400, -1022, "Signature for this request is not valid.")
    assert error_of(client.signed("GET", path, secret="wrong-secret")) == bad_signature
    # A parameter changed after signing.
    query = f"timestamp={int(time.time() * 1000)}"
    tampered = f"{query}&signature={sign(client.api_secret, query)}".replace("timestamp=", "timestamp=1")
    response = client.http.get(f"{client.url}{path}?{tampered}", headers={"X-MBX-APIKEY": client.api_key})
    assert error_of(response) == bad_signature
    response = client.http.get(f"{client.url}{path}?{query}", headers={"X-MBX-APIKEY": client.api_key})
    assert error_of(response) == (
        400,
        -1102,
        "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.",
    )


def test_timestamp_and_recv_window(client: BinanceClient) -> None:
    path = "/fapi/v2/balance"
    now = int(time.time() * 1000)
    outside = (400, -1021, "Timestamp for this request is outside of the recvWindow.")
    assert error_of(client.signed("GET", path, timestamp=now - 6000)) == outside  # default recvWindow 5000
    assert client.signed("GET", path, timestamp=now - 6000, recv_window=10_000).status_code == 200
    assert error_of(client.signed("GET", path, timestamp=now - 2000, recv_window=1000)) == outside
    ahead = client.signed("GET", path, timestamp=now + 3000)
    assert error_of(ahead)[:2] == (400, -1021)
    assert client.signed("GET", path, timestamp=now + 500).status_code == 200
    too_wide = client.signed("GET", path, recv_window=60_001)
    assert error_of(too_wide) == (400, -1131, "recvWindow must be less than 60000")
    assert client.signed("GET", path, recv_window=60_000).status_code == 200
    query = "recvWindow=5000"
    response = client.http.get(
        f"{client.url}{path}?{query}&signature={sign(client.api_secret, query)}",
        headers={"X-MBX-APIKEY": client.api_key},
    )
    assert error_of(response)[1:] == (
        -1102,
        "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.",
    )


# ------------------------------------------------------------------------------------------------ orders


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"side": "BUY", "quantity": "0.010"},
            (-1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."),
        ),
        ({"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.010", "type": "OCO"}, (-1116, "Invalid orderType.")),
        ({"symbol": "BTCUSDT", "side": "SIDEWAYS", "quantity": "0.010"}, (-1117, "Invalid side.")),
        ({"symbol": "BTCUSDT", "side": "BUY", "quantity": "0"}, (-4003, "Quantity less than or equal to zero.")),
        (
            {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.0101"},
            (-1111, "Precision is over the maximum defined for this asset."),
        ),
        ({"symbol": "BTCUSDT", "side": "BUY", "quantity": "121"}, (-4005, "Quantity greater than max qty.")),
        (
            {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.001"},
            (-4164, "Order's notional must be no smaller than 100 (unless you choose reduce only)."),
        ),
        (
            {"symbol": "BTCUSDT", "side": "SELL", "quantity": "0.010", "reduceOnly": "true"},
            (-2022, "ReduceOnly Order is rejected."),
        ),
        (
            {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.010", "positionSide": "LONG"},
            (-4061, "Order's position side does not match user's setting."),
        ),
        (
            {"symbol": "BTCUSDT", "side": "BUY", "quantity": "0.010", "newClientOrderId": "no spaces"},
            (
                -1100,
                "Illegal characters found in parameter 'newClientOrderId'; "
                "legal range is '^[\\.A-Z\\:/a-z0-9_\\-]{1,36}$'.",
            ),
        ),
        ({"symbol": "BTCUSDT", "side": "BUY", "quantity": "40"}, (-2019, "Margin is insufficient.")),
    ],
)
def test_order_rejections(client: BinanceClient, params: dict[str, str], expected: tuple[int, str]) -> None:
    response = client.order(**params)
    assert error_of(response) == (400, *expected)
    assert client.admin("GET", "/_sim/orders").json() == []


def test_min_qty_over_http() -> None:
    from quantum_trader.exchange.sim.engine import SymbolSpec

    spec = SymbolSpec("ABCUSDT", "ABC", D("0.1"), D("0.5"), D(1000), D(100), D(0), D(10), D("0.01"))
    with SimServer(SimConfig(symbols=(spec,), price_sigma=0.0)) as server, httpx.Client() as http:
        response = make_client(server, http).order(symbol="ABCUSDT", side="BUY", quantity="0.4")
        assert error_of(response) == (400, -4004, "Quantity less than min qty.")


def test_hedge_mode_reduce_only_is_not_required(client: BinanceClient) -> None:
    assert client.admin("POST", "/_sim/position-mode", {"dual": True}).json() == {"dualSidePosition": True}
    assert client.signed("GET", "/fapi/v1/positionSide/dual").json() == {"dualSidePosition": True}
    response = client.order(symbol="BTCUSDT", side="SELL", quantity="0.010", positionSide="LONG", reduceOnly="true")
    assert error_of(response) == (400, -1106, "Parameter 'reduceonly' sent when not required.")
    response = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010")
    assert error_of(response)[1] == -4061
    assert client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", positionSide="LONG").status_code == 200


def test_position_mode_leverage_and_cancel_all_endpoints(client: BinanceClient) -> None:
    response = client.signed("POST", "/fapi/v1/positionSide/dual", {"dualSidePosition": "false"})
    assert error_of(response) == (400, -4059, "No need to change position side.")
    response = client.signed("POST", "/fapi/v1/positionSide/dual", {"dualSidePosition": "true"})
    assert response.json() == {"code": 200, "msg": "success"}
    client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", positionSide="LONG")
    refused = client.admin("POST", "/_sim/position-mode", {"dual": False})
    assert refused.status_code == 400
    assert refused.json() == {"error": "Position side cannot be changed if there exists position."}
    assert client.signed("POST", "/fapi/v1/leverage", {"symbol": "ETHUSDT", "leverage": 5}).json() == {
        "leverage": 5,
        "maxNotionalValue": "50000000",
        "symbol": "ETHUSDT",
    }
    response = client.signed("POST", "/fapi/v1/leverage", {"symbol": "SOLUSDT", "leverage": 200})
    assert error_of(response)[1] == -4028
    # 5x on 100000 USDT: 167 ETH at 3000 (501,000) is more than the margin allows.
    assert error_of(client.order(symbol="ETHUSDT", side="BUY", quantity="167", positionSide="LONG"))[1] == -2019
    limit = {"symbol": "ETHUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "positionSide": "LONG"}
    for price in ("2900", "2950"):
        assert client.order(**limit, quantity="0.010", price=price).json()["status"] == "NEW"
    response = client.signed("DELETE", "/fapi/v1/allOpenOrders", {"symbol": "ETHUSDT"})
    assert response.json() == {"code": 200, "msg": "The operation of cancel all open order is done."}
    assert client.signed("GET", "/fapi/v1/openOrders").json() == []


def test_ack_is_the_default_and_result_has_every_field(client: BinanceClient) -> None:
    ack = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="ack-1").json()
    assert (ack["status"], ack["executedQty"], ack["clientOrderId"]) == ("NEW", "0.000", "ack-1")
    result = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newOrderRespType="RESULT").json()
    assert set(result) == {
        "orderId",
        "symbol",
        "status",
        "clientOrderId",
        "price",
        "avgPrice",
        "origQty",
        "executedQty",
        "cumQty",
        "cumQuote",
        "timeInForce",
        "type",
        "reduceOnly",
        "closePosition",
        "side",
        "positionSide",
        "stopPrice",
        "workingType",
        "priceProtect",
        "origType",
        "priceMatch",
        "selfTradePreventionMode",
        "goodTillDate",
        "updateTime",
    }
    assert (result["status"], result["executedQty"], result["avgPrice"]) == ("FILLED", "0.010", "60000.00000")
    assert len(result["clientOrderId"]) == 22  # generated like Binance when none is sent
    # ACK hid the execution, but the first order did fill: the query says so.
    query = client.signed("GET", "/fapi/v1/order", {"symbol": "BTCUSDT", "origClientOrderId": "ack-1"}).json()
    assert (query["status"], query["executedQty"]) == ("FILLED", "0.010")


def test_resending_a_filled_market_client_id_creates_a_second_order(client: BinanceClient) -> None:
    first = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="dup-1").json()
    second = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="dup-1").json()
    assert first["orderId"] != second["orderId"]
    risk = client.signed("GET", "/fapi/v2/positionRisk", {"symbol": "BTCUSDT"}).json()
    assert risk[0]["positionAmt"] == "0.020"
    latest = client.signed("GET", "/fapi/v1/order", {"symbol": "BTCUSDT", "origClientOrderId": "dup-1"}).json()
    assert latest["orderId"] == second["orderId"]
    orders = client.admin("GET", "/_sim/orders", None).json()
    assert [o["clientOrderId"] for o in orders] == ["dup-1", "dup-1"]


def test_duplicate_client_id_while_open(client: BinanceClient) -> None:
    limit = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.010"}
    resting = client.order(**limit, price="59000", newClientOrderId="open-1").json()
    assert resting["status"] == "NEW"
    response = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="open-1")
    assert error_of(response) == (400, -4116, "ClientOrderId is duplicated.")
    open_orders = client.signed("GET", "/fapi/v1/openOrders", {"symbol": "BTCUSDT"}).json()
    assert [o["clientOrderId"] for o in open_orders] == ["open-1"]
    canceled = client.signed("DELETE", "/fapi/v1/order", {"symbol": "BTCUSDT", "origClientOrderId": "open-1"})
    assert canceled.json()["status"] == "CANCELED"
    assert client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="open-1").status_code == 200


def test_query_and_cancel_unknown_orders(client: BinanceClient) -> None:
    response = client.signed("GET", "/fapi/v1/order", {"symbol": "BTCUSDT", "orderId": 42})
    assert error_of(response) == (400, -2013, "Order does not exist.")
    filled = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010").json()
    response = client.signed("DELETE", "/fapi/v1/order", {"symbol": "BTCUSDT", "orderId": filled["orderId"]})
    assert error_of(response) == (400, -2011, "Unknown order sent.")


def test_reduce_only_clamps_to_the_position(client: BinanceClient) -> None:
    set_position = client.admin("POST", "/_sim/position", {"symbol": "SOLUSDT", "amt": "-3", "entry_price": "160"})
    assert set_position.json()["positionAmt"] == "-3"
    response = client.order(
        symbol="SOLUSDT", side="BUY", quantity="10", reduceOnly="true", newOrderRespType="RESULT"
    ).json()
    assert (response["status"], response["origQty"], response["executedQty"]) == ("FILLED", "3", "3")
    state = client.admin("GET", "/_sim/state").json()
    assert state["positions"] == []
    assert state["wallet"]["balance"] == "100030.00000000"  # 3 x (160 - 150) realised


def test_positions_account_and_balance(client: BinanceClient) -> None:
    client.admin("POST", "/_sim/position", {"symbol": "ETHUSDT", "amt": "2", "entry_price": "2900"})
    v2 = client.signed("GET", "/fapi/v2/positionRisk").json()
    assert len(v2) == 5 and {row["positionSide"] for row in v2} == {"BOTH"}
    eth = next(row for row in v2 if row["symbol"] == "ETHUSDT")
    assert (eth["positionAmt"], eth["entryPrice"], eth["unRealizedProfit"]) == ("2.000", "2900", "200.00000000")
    assert set(eth) >= {"breakEvenPrice", "markPrice", "liquidationPrice", "leverage", "notional", "updateTime"}
    v3 = client.signed("GET", "/fapi/v3/positionRisk").json()
    assert [row["symbol"] for row in v3] == ["ETHUSDT"]
    assert client.signed("GET", "/fapi/v3/positionRisk", {"symbol": "BTCUSDT"}).json() == []
    account = client.signed("GET", "/fapi/v2/account").json()
    assert account["totalUnrealizedProfit"] == "200.00000000" and account["canTrade"] is True
    assert [p["symbol"] for p in client.signed("GET", "/fapi/v3/account").json()["positions"]] == ["ETHUSDT"]
    for path in ("/fapi/v2/balance", "/fapi/v3/balance"):
        balance = client.signed("GET", path).json()
        assert balance[0]["asset"] == "USDT" and balance[0]["balance"] == "100000.00000000"
    brackets = client.signed("GET", "/fapi/v1/leverageBracket").json()
    assert [b["symbol"] for b in brackets] == ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT"]
    trades = client.signed("GET", "/fapi/v1/userTrades", {"symbol": "ETHUSDT"}).json()
    assert trades == []  # an admin position is not a trade


def test_user_trades_and_all_orders(client: BinanceClient) -> None:
    placed = client.order(symbol="ETHUSDT", side="SELL", quantity="0.100", newOrderRespType="RESULT").json()
    trades = client.signed("GET", "/fapi/v1/userTrades", {"symbol": "ETHUSDT"}).json()
    assert [(t["orderId"], t["qty"], t["price"], t["side"]) for t in trades] == [
        (placed["orderId"], "0.100", "3000.00", "SELL")
    ]
    everything = client.signed("GET", "/fapi/v1/allOrders", {"symbol": "ETHUSDT"}).json()
    assert [o["orderId"] for o in everything] == [placed["orderId"]]


# ------------------------------------------------------------------------------------------------ headers and limits


def test_weight_and_order_count_headers() -> None:
    with clocked_server() as (_, client, _):
        check_weight_and_order_count_headers(client)


def check_weight_and_order_count_headers(client: BinanceClient) -> None:
    assert client.public("GET", "/fapi/v1/time").headers["X-MBX-USED-WEIGHT-1M"] == "1"
    assert client.public("GET", "/fapi/v1/exchangeInfo").headers["X-MBX-USED-WEIGHT-1M"] == "2"
    assert client.signed("GET", "/fapi/v2/positionRisk").headers["X-MBX-USED-WEIGHT-1M"] == "7"
    assert client.public("GET", "/fapi/v1/premiumIndex").headers["X-MBX-USED-WEIGHT-1M"] == "17"
    response = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010")
    assert response.headers["X-MBX-USED-WEIGHT-1M"] == "18"
    assert (response.headers["X-MBX-ORDER-COUNT-10S"], response.headers["X-MBX-ORDER-COUNT-1M"]) == ("1", "1")
    rejected = client.order(symbol="BTCUSDT", side="BUY", quantity="0")
    assert rejected.headers["X-MBX-ORDER-COUNT-10S"] == "2"  # refused orders count too
    assert "X-MBX-ORDER-COUNT-10S" not in client.signed("GET", "/fapi/v2/balance").headers


class SteppedClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@contextmanager
def clocked_server(**config: Any) -> Iterator[tuple[SimServer, BinanceClient, SteppedClock]]:
    """A simulator whose clock only moves when the test says (rate-limit windows included)."""
    clock = SteppedClock(1_700_000_020.0)  # 40 s into a clock minute
    engine = Engine(clock=clock, price_sigma=0.0)
    with SimServer(SimConfig(admin_token=ADMIN_TOKEN, **config), engine) as server, httpx.Client() as http:
        yield server, make_client(server, http, engine.now_ms), clock


@pytest.fixture
def limited() -> Iterator[tuple[SimServer, BinanceClient, SteppedClock]]:
    with clocked_server(weight_limit_1m=10, orders_limit_10s=3, ban_after_429s=2, ban_seconds=30) as parts:
        yield parts


def test_429_then_418_ban_then_recovery(limited: tuple[SimServer, BinanceClient, SteppedClock]) -> None:
    _, client, clock = limited
    for _ in range(10):
        assert client.public("GET", "/fapi/v1/ping").status_code == 200
    limited_response = client.public("GET", "/fapi/v1/ping")
    assert error_of(limited_response) == (
        429,
        -1003,
        "Too many requests; current limit is 10 requests per minute. "
        "Please use the websocket for live updates to avoid polling the API.",
    )
    assert limited_response.headers["Retry-After"] == "20"  # to the end of the minute
    assert client.public("GET", "/fapi/v1/ping").status_code == 429
    banned = client.public("GET", "/fapi/v1/ping")
    assert banned.status_code == 418
    assert banned.json()["code"] == -1003 and "IP banned until" in banned.json()["msg"]
    assert banned.headers["Retry-After"] == "30"
    clock.t += 25  # a new minute, but still banned
    assert client.public("GET", "/fapi/v1/ping").status_code == 418
    clock.t += 10
    assert client.public("GET", "/fapi/v1/ping").status_code == 200
    assert client.admin("GET", "/_sim/state").json()["rateLimits"]["usedWeight1m"] == 1


def test_order_rate_limit(limited: tuple[SimServer, BinanceClient, SteppedClock]) -> None:
    server, client, clock = limited
    for _ in range(3):
        assert client.order(symbol="ETHUSDT", side="BUY", quantity="0.010").status_code == 200
    response = client.order(symbol="ETHUSDT", side="BUY", quantity="0.010")
    assert error_of(response) == (429, -1015, "Too many new orders; current limit is 3 orders per 10 SECOND.")
    assert len(server.engine.orders()) == 3
    clock.t += 10
    assert client.order(symbol="ETHUSDT", side="BUY", quantity="0.010").status_code == 200


# ------------------------------------------------------------------------------------------------ admin


def test_admin_disabled_is_404() -> None:
    with SimServer(SimConfig()) as server, httpx.Client() as http:
        response = make_client(server, http).admin("GET", "/_sim/state")
        assert response.status_code == 404
        assert response.json()["code"] == -5000


def test_admin_wrong_token_is_401(client: BinanceClient) -> None:
    assert client.admin("GET", "/_sim/state", token="guess").status_code == 401
    assert client.admin("POST", "/_sim/reset", token="").status_code == 401


def test_admin_state_price_wallet_and_validation(client: BinanceClient) -> None:
    assert client.admin("POST", "/_sim/price", {"symbol": "BTCUSDT", "price": "65000.04"}).json() == {
        "symbol": "BTCUSDT",
        "markPrice": "65000.00",
    }
    client.admin("POST", "/_sim/wallet", {"balance": "5000"})
    client.order(symbol="BTCUSDT", side="BUY", quantity="0.010")
    state = client.admin("GET", "/_sim/state").json()
    assert state["prices"]["BTCUSDT"] == "65000.00"
    assert state["wallet"]["balance"] == "5000.00000000"
    assert state["orders"] == {"total": 1, "open": 0}
    assert state["positions"][0]["positionAmt"] == "0.010"
    assert state["rateLimits"]["orderCount1m"] == 1
    assert client.admin("POST", "/_sim/price", {"symbol": "BTCUSDT"}).status_code == 400
    assert client.admin("POST", "/_sim/position", {"symbol": "BTCUSDT", "amt": "0.0001"}).status_code == 400
    assert client.admin("POST", "/_sim/faults", {"kind": "nonsense"}).status_code == 400
    assert client.admin("GET", "/_sim/orders?symbol=ETHUSDT").json() == []


# ------------------------------------------------------------------------------------------------ faults


def add_fault(client: BinanceClient, **rule: Any) -> None:
    rule.setdefault("path", "/fapi/v1/order")
    rule.setdefault("method", "POST")
    response = client.admin("POST", "/_sim/faults", rule)
    assert response.status_code == 200, response.text


def orders_with(client: BinanceClient, client_id: str) -> list[dict[str, Any]]:
    return [o for o in client.admin("GET", "/_sim/orders").json() if o["clientOrderId"] == client_id]


def test_fault_latency_then_normal(client: BinanceClient) -> None:
    add_fault(client, kind="latency", ms=200, count=1)
    started = time.monotonic()
    assert client.order(symbol="BTCUSDT", side="BUY", quantity="0.010").status_code == 200
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    client.order(symbol="BTCUSDT", side="BUY", quantity="0.010")
    assert time.monotonic() - started < 0.2  # the rule was used up
    assert client.admin("GET", "/_sim/faults").json() == []


def test_fault_timeout_after_fill_executes_the_order(client: BinanceClient) -> None:
    add_fault(client, kind="timeout_after_fill", ms=600)
    with pytest.raises(httpx.ReadTimeout):
        client.signed(
            "POST",
            "/fapi/v1/order",
            {"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "0.010", "newClientOrderId": "lost-1"},
            timeout=0.2,
        )
    [order] = orders_with(client, "lost-1")
    assert (order["status"], order["executedQty"]) == ("FILLED", "0.010")


def test_fault_timeout_before_fill_executes_nothing(client: BinanceClient) -> None:
    add_fault(client, kind="timeout_before_fill", ms=50)
    response = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="never-1")
    assert error_of(response)[:2] == (503, -1001)
    assert orders_with(client, "never-1") == []


@pytest.mark.parametrize("status", [500, 502, 503])
def test_fault_http_5xx_executes_nothing(client: BinanceClient, status: int) -> None:
    add_fault(client, kind="http_5xx", status=status)
    response = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="five-1")
    assert response.status_code == status
    assert orders_with(client, "five-1") == []


def test_fault_http_429_and_418(client: BinanceClient) -> None:
    add_fault(client, kind="http_429", retry_after=7, path="/fapi/v2/positionRisk", method="GET")
    response = client.signed("GET", "/fapi/v2/positionRisk")
    assert error_of(response)[:2] == (429, -1003)
    assert response.headers["Retry-After"] == "7"
    add_fault(client, kind="http_418", retry_after=60, path=None, method=None)
    response = client.public("GET", "/fapi/v1/time")
    assert response.status_code == 418 and response.headers["Retry-After"] == "60"
    assert client.public("GET", "/fapi/v1/time").status_code == 200


def test_fault_error_codes(client: BinanceClient) -> None:
    add_fault(client, kind="error_code", code=-1021)
    response = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="e-1021")
    assert error_of(response) == (400, -1021, "Timestamp for this request is outside of the recvWindow.")
    assert orders_with(client, "e-1021") == []

    add_fault(client, kind="error_code", code=-1007, executed=True)
    response = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="e-1007")
    assert error_of(response) == (
        408,
        -1007,
        "Timeout waiting for response from backend server. Send status unknown; execution status unknown.",
    )
    assert [o["status"] for o in orders_with(client, "e-1007")] == ["FILLED"]

    add_fault(client, kind="error_code", code=-1007, executed=False)
    client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="e-1007b")
    assert orders_with(client, "e-1007b") == []

    add_fault(client, kind="error_code", code=-1001)
    assert error_of(client.order(symbol="BTCUSDT", side="BUY", quantity="0.010"))[:2] == (503, -1001)
    # -1021 means "not executed": a rule cannot claim otherwise.
    response = client.admin("POST", "/_sim/faults", {"kind": "error_code", "code": -1021, "executed": True})
    assert response.status_code == 400


def test_fault_partial_fill(client: BinanceClient) -> None:
    add_fault(client, kind="partial_fill", fraction=0.4)
    response = client.order(symbol="ETHUSDT", side="BUY", quantity="1.005", newOrderRespType="RESULT").json()
    assert (response["status"], response["origQty"], response["executedQty"]) == ("EXPIRED", "1.005", "0.402")
    risk = client.signed("GET", "/fapi/v2/positionRisk", {"symbol": "ETHUSDT"}).json()
    assert risk[0]["positionAmt"] == "0.402"


@pytest.mark.parametrize("executed", [True, False])
def test_fault_bad_json(client: BinanceClient, executed: bool) -> None:
    add_fault(client, kind="bad_json", executed=executed)
    response = client.order(symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="garbled")
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()
    assert len(orders_with(client, "garbled")) == (1 if executed else 0)


@pytest.mark.parametrize("executed", [True, False])
def test_fault_missing_fields(client: BinanceClient, executed: bool) -> None:
    add_fault(client, kind="missing_fields", executed=executed, fields=["status", "executedQty", "orderId"])
    response = client.order(
        symbol="BTCUSDT", side="BUY", quantity="0.010", newClientOrderId="partial-json", newOrderRespType="RESULT"
    )
    body = response.json()
    assert response.status_code == 200
    assert {"status", "executedQty", "orderId"}.isdisjoint(body)
    assert body["clientOrderId"] == "partial-json"
    assert len(orders_with(client, "partial-json")) == (1 if executed else 0)


def test_fault_scope_count_and_clear(client: BinanceClient) -> None:
    add_fault(client, kind="http_5xx", status=500, count=None, path="/fapi/v2/balance", method="GET")
    for _ in range(3):
        assert client.signed("GET", "/fapi/v2/balance").status_code == 500
    assert client.signed("GET", "/fapi/v2/account").status_code == 200  # another path
    assert [rule["kind"] for rule in client.admin("GET", "/_sim/faults").json()] == ["http_5xx"]
    assert client.admin("DELETE", "/_sim/faults").status_code == 200
    assert client.signed("GET", "/fapi/v2/balance").status_code == 200


def test_stop_does_not_wait_for_a_held_request() -> None:
    with httpx.Client() as http:
        server = SimServer(SimConfig(admin_token=ADMIN_TOKEN)).start()
        binance = make_client(server, http)
        binance.admin("POST", "/_sim/faults", {"kind": "timeout_after_fill", "path": "/fapi/v1/time"})
        with pytest.raises(httpx.ReadTimeout):
            http.get(server.url + "/fapi/v1/time", timeout=0.1)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5


# ------------------------------------------------------------------------------------------------ ccxt


@pytest.fixture
async def exchange(sim: SimServer, client: BinanceClient) -> Any:
    ex = make_ccxt(sim)
    try:
        await ex.load_markets()
        yield ex
    finally:
        await ex.close()


async def test_ccxt_load_markets_precision_and_limits(exchange: Any) -> None:
    expected = {
        "BTC/USDT:USDT": (0.001, 0.1, 0.001, 1000, 120, 100),
        "ETH/USDT:USDT": (0.001, 0.01, 0.001, 10000, 2000, 20),
        "SOL/USDT:USDT": (1, 0.01, 1, 1000000, 5000, 5),
        "BNB/USDT:USDT": (0.01, 0.01, 0.01, 100000, 1000, 5),
        "XRP/USDT:USDT": (0.1, 0.0001, 0.1, 10000000, 1000000, 5),
    }
    assert sorted(exchange.markets) == sorted(expected)
    for symbol, (step, tick, min_qty, max_qty, market_max, notional) in expected.items():
        market = exchange.market(symbol)
        assert market["swap"] and market["linear"] and market["active"] and market["settle"] == "USDT"
        assert market["precision"]["amount"] == step
        assert market["precision"]["price"] == tick
        assert (market["limits"]["amount"]["min"], market["limits"]["amount"]["max"]) == (min_qty, max_qty)
        assert market["limits"]["market"]["max"] == market_max
        assert market["limits"]["cost"]["min"] == notional
    assert exchange.amount_to_precision("BTC/USDT:USDT", 0.0123456) == "0.012"


async def test_ccxt_reduce_only_close_and_fetch_by_client_id(exchange: Any, client: BinanceClient) -> None:
    client.admin("POST", "/_sim/position", {"symbol": "BTCUSDT", "amt": "0.005", "entry_price": "59000"})
    order = await exchange.create_order(
        "BTC/USDT:USDT", "market", "sell", 0.01, params={"reduceOnly": True, "newClientOrderId": "ccxt-close-1"}
    )
    assert (order["status"], order["filled"], order["clientOrderId"]) == ("closed", 0.005, "ccxt-close-1")
    assert order["reduceOnly"] is True
    fetched = await exchange.fetch_order(None, "BTC/USDT:USDT", params={"origClientOrderId": "ccxt-close-1"})
    assert (fetched["id"], fetched["status"], fetched["filled"]) == (order["id"], "closed", 0.005)
    assert await exchange.fetch_positions() == []
    balance = await exchange.fetch_balance()
    assert balance["USDT"]["total"] == pytest.approx(100005.0)  # 0.005 x (60000 - 59000)


async def test_ccxt_positions_and_implicit_api(exchange: Any, client: BinanceClient) -> None:
    client.admin("POST", "/_sim/position", {"symbol": "ETHUSDT", "amt": "-1.5", "entry_price": "3100"})
    [position] = await exchange.fetch_positions()
    assert (position["symbol"], position["side"], position["contracts"]) == ("ETH/USDT:USDT", "short", 1.5)
    assert position["unrealizedPnl"] == pytest.approx(150.0)
    rows = await exchange.fapiPrivateV2GetPositionRisk({"symbol": "ETHUSDT"})
    assert rows[0]["positionAmt"] == "-1.500"
    placed = await exchange.fapiPrivatePostOrder(
        {"symbol": "ETHUSDT", "side": "BUY", "type": "MARKET", "quantity": "0.500", "reduceOnly": "true"}
    )
    assert placed["status"] == "NEW"  # ACK by default
    info = await exchange.fapiPublicGetExchangeInfo()
    assert len(info["symbols"]) == 5


async def test_ccxt_error_mapping(exchange: Any, sim: SimServer) -> None:
    # ccxt picks its USD-M-specific code table by URL prefix (https://fapi.binance.com, testnet, demo-fapi), so
    # at the simulator's URL the futures-only codes surface as a plain ExchangeError carrying the Binance body.
    with pytest.raises(ccxt.ExchangeError, match='"code":-2022'):
        await exchange.create_order("BTC/USDT:USDT", "market", "sell", 0.01, params={"reduceOnly": True})
    with pytest.raises(ccxt.OrderNotFound):  # codes common to all Binance markets map as usual
        await exchange.fetch_order("123", "BTC/USDT:USDT")
    # With the USD-M table merged in, the classes are those seen against Binance itself.
    exchange.exceptions["exact"].update(exchange.exceptions["linear"]["exact"])
    with pytest.raises(ccxt.InvalidOrder, match="-2022"):
        await exchange.create_order("BTC/USDT:USDT", "market", "sell", 0.01, params={"reduceOnly": True})
    with pytest.raises(ccxt.InsufficientFunds):
        await exchange.create_order("BTC/USDT:USDT", "market", "buy", 100)
    wrong = make_ccxt(sim, secret="not-the-secret")
    try:
        with pytest.raises(ccxt.AuthenticationError):
            await wrong.fapiPrivateV2GetBalance()
    finally:
        await wrong.close()


async def test_ccxt_timeout_leaves_an_executed_order(exchange: Any, client: BinanceClient, sim: SimServer) -> None:
    add_fault(client, kind="timeout_after_fill", ms=1500)
    exchange.timeout = 300
    with pytest.raises(ccxt.RequestTimeout):
        await exchange.create_order("ETH/USDT:USDT", "market", "buy", 0.1, params={"newClientOrderId": "ccxt-t-1"})
    exchange.timeout = 10_000
    fetched = await exchange.fetch_order(None, "ETH/USDT:USDT", params={"origClientOrderId": "ccxt-t-1"})
    assert (fetched["status"], fetched["filled"]) == ("closed", 0.1)


async def test_ccxt_places_600_concurrent_orders_each_exactly_once() -> None:
    """Concurrency, not speed: 600 orders in flight at once through ccxt each land once with their own id. (The
    rate is printed for the curious; speed is `qt bench`'s to measure, not a timed assert's.)"""
    config = SimConfig(orders_limit_10s=100_000, orders_limit_1m=100_000, weight_limit_1m=100_000)
    with SimServer(config) as server:
        ex = make_ccxt(server)
        try:
            count = 600
            sides = ["BUY", "SELL"]
            started = time.perf_counter()
            results = await asyncio.gather(
                *(
                    ex.fapiPrivatePostOrder(
                        {"symbol": "ETHUSDT", "side": sides[i % 2], "type": "MARKET", "quantity": "0.010"}
                    )
                    for i in range(count)
                )
            )
            rate = count / (time.perf_counter() - started)
        finally:
            await ex.close()
        assert len({r["orderId"] for r in results}) == count
        assert len(server.engine.orders()) == count
        print(f"600 concurrent orders through ccxt: {rate:.0f} orders/s")
