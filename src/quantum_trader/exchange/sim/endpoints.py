"""The Binance REST endpoints the simulator serves: one handler per path, and ``ENDPOINTS``, the table of their
weights, signing and limits. Errors are ``{"code", "msg"}`` with Binance's HTTP status. POST order weighs 1 on
the IP limit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from quantum_trader.exchange.sim import shapes
from quantum_trader.exchange.sim.config import SimConfig
from quantum_trader.exchange.sim.engine import Engine
from quantum_trader.exchange.sim.params import Json, fmt, mandatory, parse_bool, parse_int, plain
from quantum_trader.exchange.sim.symbols import QUOTE_ASSET, SymbolSpec

FUNDING_INTERVAL_MS: Final = 8 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Call:
    engine: Engine
    config: SimConfig
    params: Mapping[str, str]
    now: int
    fill_fraction: Decimal | None = None


Handler = Callable[[Call], Any]


@dataclass(frozen=True, slots=True)
class Endpoint:
    handler: Handler
    weight: int
    weight_no_symbol: int | None = None  # Binance weighs some endpoints more without a symbol
    signed: bool = True
    orders: int = 0  # counted on the ORDERS limits
    matching: bool = False  # processed by the matching engine, which applies its own recvWindow (-5028)
    key_only: bool = False  # USER_STREAM security: the API key header, no signature (the listen key endpoints)

    def weigh(self, params: Mapping[str, str]) -> int:
        if self.weight_no_symbol is not None and not params.get("symbol"):
            return self.weight_no_symbol
        return self.weight


def _optional_spec(call: Call) -> SymbolSpec | None:
    symbol = call.params.get("symbol")
    return call.engine.spec(symbol) if symbol else None


def exchange_info(call: Call) -> Json:
    cfg = call.config
    return {
        "timezone": "UTC",
        "serverTime": call.now,
        "futuresType": "U_MARGINED",
        "rateLimits": [
            {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": cfg.weight_limit_1m},
            {"rateLimitType": "ORDERS", "interval": "MINUTE", "intervalNum": 1, "limit": cfg.orders_limit_1m},
            {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": cfg.orders_limit_10s},
        ],
        "exchangeFilters": [],
        "assets": [{"asset": QUOTE_ASSET, "marginAvailable": True, "autoAssetExchange": "-10000"}],
        "symbols": [shapes.symbol_info_json(spec) for spec in call.engine.specs.values()],
    }


def premium_index(call: Call) -> Json | list[Json]:
    def row(spec: SymbolSpec) -> Json:
        mark = fmt(call.engine.mark_price(spec.symbol), 8)
        return {
            "symbol": spec.symbol,
            "markPrice": mark,
            "indexPrice": mark,
            "estimatedSettlePrice": mark,
            "lastFundingRate": "0.00010000",
            "interestRate": "0.00010000",
            "nextFundingTime": (call.now // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS,
            "time": call.now,
        }

    spec = _optional_spec(call)
    return row(spec) if spec else [row(s) for s in call.engine.specs.values()]


def ticker_price(call: Call) -> Json | list[Json]:
    def row(spec: SymbolSpec) -> Json:
        return {"symbol": spec.symbol, "price": spec.price(call.engine.mark_price(spec.symbol)), "time": call.now}

    spec = _optional_spec(call)
    return row(spec) if spec else [row(s) for s in call.engine.specs.values()]


def position_risk(version: int) -> Handler:
    def handler(call: Call) -> list[Json]:
        spec = _optional_spec(call)
        rows = call.engine.positions(spec.symbol if spec else None, include_flat=version == 2)
        totals = call.engine.cross_totals()  # once per reply: every row's liquidation price needs the pool
        return [shapes.position_risk_json(call.engine, row, version=version, totals=totals) for row in rows]

    return handler


def account(version: int) -> Handler:
    return lambda call: shapes.account_json(call.engine, version=version)


def new_order(call: Call) -> Json:
    order = call.engine.new_order(call.params, fill_fraction=call.fill_fraction)
    ack = call.params.get("newOrderRespType", "ACK") == "ACK"
    return shapes.order_json(call.engine, order, ack=ack)


def query_order(call: Call) -> Json:
    return shapes.order_json(call.engine, call.engine.query_order(call.params), query=True)


def cancel_order(call: Call) -> Json:
    return shapes.order_json(call.engine, call.engine.cancel_order(call.params))


def open_orders(call: Call) -> list[Json]:
    spec = _optional_spec(call)
    orders = call.engine.open_orders(spec.symbol if spec else None)
    return [shapes.order_json(call.engine, order, query=True) for order in orders]


def cancel_all_orders(call: Call) -> Json:
    call.engine.cancel_all(call.engine.symbol_param(call.params).symbol)
    return {"code": 200, "msg": "The operation of cancel all open order is done."}


def _limit(params: Mapping[str, str]) -> int:
    limit = parse_int(params, "limit") or 500
    return max(1, min(limit, 1000))


def all_orders(call: Call) -> list[Json]:
    """``GET /fapi/v1/allOrders``: from ``orderId`` on, or within ``startTime``..``endTime`` (order creation
    time), oldest first; with neither, the most recent ``limit`` orders (as Binance does)."""
    spec = call.engine.symbol_param(call.params)
    from_id = parse_int(call.params, "orderId")
    start, end = parse_int(call.params, "startTime"), parse_int(call.params, "endTime")
    orders = call.engine.orders(spec.symbol)
    if from_id is not None:
        orders = [o for o in orders if o.order_id >= from_id]
    if start is not None:
        orders = [o for o in orders if o.time_ms >= start]
    if end is not None:
        orders = [o for o in orders if o.time_ms <= end]
    limit = _limit(call.params)
    picked = orders[-limit:] if from_id is None and start is None else orders[:limit]
    return [shapes.order_json(call.engine, o, query=True) for o in picked]


def user_trades(call: Call) -> list[Json]:
    spec = call.engine.symbol_param(call.params)
    trades = call.engine.trades(spec.symbol, parse_int(call.params, "orderId"))
    return [shapes.trade_json(call.engine, t) for t in trades[-_limit(call.params) :]]


def leverage_bracket(call: Call) -> Json | list[Json]:
    spec = _optional_spec(call)
    if spec:
        return shapes.leverage_bracket_json(spec)
    return [shapes.leverage_bracket_json(s) for s in call.engine.specs.values()]


def change_leverage(call: Call) -> Json:
    spec = call.engine.symbol_param(call.params)
    leverage = parse_int(call.params, "leverage")
    if leverage is None:
        raise mandatory("leverage")
    call.engine.set_leverage(spec.symbol, leverage)
    return {"leverage": leverage, "maxNotionalValue": plain(spec.bracket_notional_cap), "symbol": spec.symbol}


def change_position_mode(call: Call) -> Json:
    dual = parse_bool(call.params, "dualSidePosition")
    if dual is None:
        raise mandatory("dualSidePosition")
    call.engine.change_position_mode(dual)
    return {"code": 200, "msg": "success"}


def _listen_key(call: Call) -> Json:
    """POST /fapi/v1/listenKey: the account's active key, extended (a new one when there is none)."""
    return {"listenKey": call.engine.listen_keys.create(call.now)}


def _keep_alive(call: Call) -> Json:
    """PUT /fapi/v1/listenKey: extend the account's key (the ``listenKey`` parameter, when sent, must name it)."""
    keys = call.engine.listen_keys
    key = call.params.get("listenKey") or keys.live(call.now) or ""
    keys.keep_alive(key, call.now)
    return {"listenKey": key}


def _close_key(call: Call) -> Json:
    """DELETE /fapi/v1/listenKey: close the account's key."""
    keys = call.engine.listen_keys
    keys.close(call.params.get("listenKey") or keys.live(call.now) or "", call.now)
    return {}


ENDPOINTS: Final[dict[tuple[str, str], Endpoint]] = {
    ("GET", "/fapi/v1/ping"): Endpoint(lambda call: {}, 1, signed=False),
    ("GET", "/fapi/v1/time"): Endpoint(lambda call: {"serverTime": call.now}, 1, signed=False),
    ("GET", "/fapi/v1/exchangeInfo"): Endpoint(exchange_info, 1, signed=False),
    ("GET", "/fapi/v1/premiumIndex"): Endpoint(premium_index, 1, 10, signed=False),
    ("GET", "/fapi/v1/ticker/price"): Endpoint(ticker_price, 1, 2, signed=False),
    ("GET", "/fapi/v2/ticker/price"): Endpoint(ticker_price, 1, 2, signed=False),
    ("GET", "/fapi/v2/positionRisk"): Endpoint(position_risk(2), 5),
    ("GET", "/fapi/v3/positionRisk"): Endpoint(position_risk(3), 5),
    ("GET", "/fapi/v2/account"): Endpoint(account(2), 5),
    ("GET", "/fapi/v3/account"): Endpoint(account(3), 5),
    ("GET", "/fapi/v2/balance"): Endpoint(lambda call: shapes.balance_json(call.engine), 5),
    ("GET", "/fapi/v3/balance"): Endpoint(lambda call: shapes.balance_json(call.engine), 5),
    ("GET", "/fapi/v1/positionSide/dual"): Endpoint(lambda call: {"dualSidePosition": call.engine.dual}, 30),
    ("POST", "/fapi/v1/positionSide/dual"): Endpoint(change_position_mode, 1),
    ("POST", "/fapi/v1/order"): Endpoint(new_order, 1, orders=1, matching=True),
    ("GET", "/fapi/v1/order"): Endpoint(query_order, 1),
    ("DELETE", "/fapi/v1/order"): Endpoint(cancel_order, 1, matching=True),
    ("GET", "/fapi/v1/openOrders"): Endpoint(open_orders, 1, 40),
    ("DELETE", "/fapi/v1/allOpenOrders"): Endpoint(cancel_all_orders, 1, matching=True),
    ("GET", "/fapi/v1/allOrders"): Endpoint(all_orders, 5),
    ("GET", "/fapi/v1/userTrades"): Endpoint(user_trades, 5),
    ("GET", "/fapi/v1/leverageBracket"): Endpoint(leverage_bracket, 1),
    ("POST", "/fapi/v1/leverage"): Endpoint(change_leverage, 1),
    ("POST", "/fapi/v1/listenKey"): Endpoint(_listen_key, 1, signed=False, key_only=True),
    ("PUT", "/fapi/v1/listenKey"): Endpoint(_keep_alive, 1, signed=False, key_only=True),
    ("DELETE", "/fapi/v1/listenKey"): Endpoint(_close_key, 1, signed=False, key_only=True),
}
