"""The simulated exchange over HTTP: Binance USD-M futures REST paths, signing, rate limits, admin API, faults.

Reproduced Binance behaviours:

* SIGNED endpoints: ``X-MBX-APIKEY`` must be the configured key (-2015, HTTP 401). The HMAC-SHA256 hex signature
  (case-insensitive) covers totalParams = query string concatenated with the request body, without the
  ``signature`` parameter (-1102 when absent, -1022 when wrong). ``timestamp`` is mandatory; a request is
  accepted when ``timestamp < serverTime + 1000`` and ``serverTime - timestamp <= recvWindow`` (default 5000,
  more than 60000 is -1131), otherwise -1021. This is the gateway's check, made against the time of receipt.
* The matching engine's own recvWindow: an order request (new order, cancel, cancel all) it processes after
  ``timestamp + recvWindow`` on the exchange's clock is refused with -5028 and executes nothing, however long
  a fault held it after receipt (``latency``, ``late_execution``). So no request executes later than that.
* Request weight per fixed clock minute (Binance's ``X-MBX-USED-WEIGHT-1M`` resets on the minute) and order
  counts per 10 s and per minute, reported on every answer (order counts on order placement). Over the weight
  limit: HTTP 429 -1003 with ``Retry-After`` (seconds to the window's end); over an order limit: 429 -1015.
  More than ``ban_after_429s`` requests answered 429 in one window ban the client: HTTP 418 for ``ban_seconds``.
* Errors are ``{"code", "msg"}`` with Binance's HTTP status; unknown paths are HTTP 404 with -5000.

Simplifications: one limiter for the whole simulator (every client is "one IP" and one account); POST order
weighs 1 on the IP limit; admin requests (``/_sim/...``) are neither limited nor faulted.
The admin API and the fault kinds are described in ``server.py`` and ``faults.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from quantum_trader.exchange.sim import engine as eng
from quantum_trader.exchange.sim import shapes
from quantum_trader.exchange.sim.engine import Engine, EngineError, Json
from quantum_trader.exchange.sim.faults import (
    FaultBook,
    FaultError,
    FaultRule,
    Reply,
    apply_fault,
    ban_msg,
    weight_limit_msg,
)

if TYPE_CHECKING:
    from quantum_trader.exchange.sim.server import SimConfig

log = logging.getLogger(__name__)

DEFAULT_RECV_WINDOW: Final = 5000
MAX_RECV_WINDOW: Final = 60000
FUNDING_INTERVAL_MS: Final = 8 * 3600 * 1000
ADMIN_HEADER: Final = "x-sim-admin-token"
_encode = msgspec.json.encode


def error_reply(error: EngineError) -> Reply:
    return Reply(error.http_status, error.body())


# ------------------------------------------------------------------------------------------------ rate limits


class RateLimiter:
    """Binance's REQUEST_WEIGHT (1 minute) and ORDERS (10 s, 1 minute) limits over fixed clock windows."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.minute = self.ten_s = -1
        self.weight = self.orders_1m = self.orders_10s = 0
        self.limited = 0  # requests answered 429 in this minute
        self.banned_until = 0

    def _roll(self, now: int) -> None:
        if now // 60_000 != self.minute:
            self.minute = now // 60_000
            self.weight = self.orders_1m = self.limited = 0
        if now // 10_000 != self.ten_s:
            self.ten_s = now // 10_000
            self.orders_10s = 0

    def admit(self, now: int, weight: int, orders: int) -> Reply | None:
        """Count the request; an answer when it must be refused."""
        cfg = self.config
        self._roll(now)
        if now < self.banned_until:
            return self._banned(now)
        self.weight += weight
        if self.weight > cfg.weight_limit_1m:
            self.limited += 1
            if self.limited > cfg.ban_after_429s:
                self.banned_until = now + cfg.ban_seconds * 1000
                return self._banned(now)
            retry = _seconds_until((self.minute + 1) * 60_000, now)
            return Reply(429, {"code": -1003, "msg": weight_limit_msg(cfg.weight_limit_1m)}, {"Retry-After": retry})
        if orders:
            self.orders_10s += orders
            self.orders_1m += orders
            if self.orders_10s > cfg.orders_limit_10s:
                return self._too_many_orders(cfg.orders_limit_10s, "10 SECOND", (self.ten_s + 1) * 10_000, now)
            if self.orders_1m > cfg.orders_limit_1m:
                return self._too_many_orders(cfg.orders_limit_1m, "1 MINUTE", (self.minute + 1) * 60_000, now)
        return None

    def _banned(self, now: int) -> Reply:
        retry = _seconds_until(self.banned_until, now)
        return Reply(418, {"code": -1003, "msg": ban_msg(self.banned_until)}, {"Retry-After": retry})

    @staticmethod
    def _too_many_orders(limit: int, interval: str, window_end: int, now: int) -> Reply:
        msg = f"Too many new orders; current limit is {limit} orders per {interval}."
        return Reply(429, {"code": -1015, "msg": msg}, {"Retry-After": _seconds_until(window_end, now)})

    def headers(self, *, orders: bool) -> dict[str, str]:
        headers = {"X-MBX-USED-WEIGHT-1M": str(self.weight)}
        if orders:
            headers["X-MBX-ORDER-COUNT-10S"] = str(self.orders_10s)
            headers["X-MBX-ORDER-COUNT-1M"] = str(self.orders_1m)
        return headers

    def state(self) -> Json:
        return {
            "usedWeight1m": self.weight,
            "orderCount10s": self.orders_10s,
            "orderCount1m": self.orders_1m,
            "bannedUntil": self.banned_until or None,
        }


def _seconds_until(until_ms: int, now: int) -> str:
    return str(max(1, math.ceil((until_ms - now) / 1000)))


# ------------------------------------------------------------------------------------------------ signing


def _strip_signature(raw: bytes) -> bytes:
    if b"signature=" not in raw:
        return raw
    return b"&".join(part for part in raw.split(b"&") if not part.startswith(b"signature="))


def authenticate(config: SimConfig, now: int, request: Request, raw_query: bytes, body: bytes, params: Json) -> None:
    """Binance's SIGNED endpoint checks, in the order: API key, signature, timestamp/recvWindow."""
    api_key = request.headers.get("x-mbx-apikey")
    if api_key is None or not hmac.compare_digest(api_key.encode(), config.api_key.encode()):
        raise EngineError(-2015, "Invalid API-key, IP, or permissions for action.", 401)
    signature = params.get("signature")
    if not signature:
        raise eng.mandatory("signature")
    total_params = _strip_signature(raw_query) + _strip_signature(body)
    expected = hmac.new(config.api_secret.encode(), total_params, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, str(signature).lower()):
        raise EngineError(-1022, "Signature for this request is not valid.")
    timestamp = eng.parse_int(params, "timestamp")
    if timestamp is None:
        raise eng.mandatory("timestamp")
    recv_window = eng.parse_int(params, "recvWindow")
    if recv_window is None:
        recv_window = DEFAULT_RECV_WINDOW
    if recv_window > MAX_RECV_WINDOW:
        raise EngineError(-1131, "recvWindow must be less than 60000")
    if timestamp >= now + 1000:
        raise EngineError(-1021, "Timestamp for this request was 1000ms ahead of the server's time.")
    if now - timestamp > recv_window:
        raise EngineError(-1021, "Timestamp for this request is outside of the recvWindow.")


def window_end(params: Mapping[str, str]) -> int:
    """``timestamp + recvWindow`` of a request that passed ``authenticate``: the last moment it may execute."""
    timestamp = eng.parse_int(params, "timestamp") or 0
    recv_window = eng.parse_int(params, "recvWindow")
    return timestamp + (DEFAULT_RECV_WINDOW if recv_window is None else recv_window)


def check_me_window(now: int, params: Mapping[str, str]) -> None:
    """The matching engine's recvWindow, checked when it processes the request (the gateway checked receipt)."""
    if now > window_end(params):
        raise EngineError(-5028, "Timestamp for this request is outside of the ME recvWindow.")


# ------------------------------------------------------------------------------------------------ endpoints


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

    def weigh(self, params: Mapping[str, str]) -> int:
        if self.weight_no_symbol is not None and not params.get("symbol"):
            return self.weight_no_symbol
        return self.weight


def _optional_spec(call: Call) -> eng.SymbolSpec | None:
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
        "assets": [{"asset": eng.QUOTE_ASSET, "marginAvailable": True, "autoAssetExchange": "-10000"}],
        "symbols": [shapes.symbol_info_json(spec) for spec in call.engine.specs.values()],
    }


def premium_index(call: Call) -> Json | list[Json]:
    def row(spec: eng.SymbolSpec) -> Json:
        mark = eng.fmt(call.engine.mark_price(spec.symbol), 8)
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
    def row(spec: eng.SymbolSpec) -> Json:
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
    limit = eng.parse_int(params, "limit") or 500
    return max(1, min(limit, 1000))


def all_orders(call: Call) -> list[Json]:
    """``GET /fapi/v1/allOrders``: from ``orderId`` on, or within ``startTime``..``endTime`` (order creation
    time), oldest first; with neither, the most recent ``limit`` orders (as Binance does)."""
    spec = call.engine.symbol_param(call.params)
    from_id = eng.parse_int(call.params, "orderId")
    start, end = eng.parse_int(call.params, "startTime"), eng.parse_int(call.params, "endTime")
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
    trades = call.engine.trades(spec.symbol, eng.parse_int(call.params, "orderId"))
    return [shapes.trade_json(call.engine, t) for t in trades[-_limit(call.params) :]]


def leverage_bracket(call: Call) -> Json | list[Json]:
    spec = _optional_spec(call)
    if spec:
        return shapes.leverage_bracket_json(spec)
    return [shapes.leverage_bracket_json(s) for s in call.engine.specs.values()]


def change_leverage(call: Call) -> Json:
    spec = call.engine.symbol_param(call.params)
    leverage = eng.parse_int(call.params, "leverage")
    if leverage is None:
        raise eng.mandatory("leverage")
    call.engine.set_leverage(spec.symbol, leverage)
    return {"leverage": leverage, "maxNotionalValue": eng.plain(spec.bracket_notional_cap), "symbol": spec.symbol}


def change_position_mode(call: Call) -> Json:
    dual = eng.parse_bool(call.params, "dualSidePosition")
    if dual is None:
        raise eng.mandatory("dualSidePosition")
    call.engine.change_position_mode(dual)
    return {"code": 200, "msg": "success"}


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
}


# ------------------------------------------------------------------------------------------------ the app


@dataclass(slots=True)
class LateExecution:
    """A request a ``late_execution`` rule let through the gateway, for the matching engine to execute later."""

    method: str
    path: str
    params: Mapping[str, str]
    received_ms: int
    due_ms: int
    outcome: str = "pending"  # then "executed" (HTTP 200) or "refused" (any error, -5028 among them)
    reply: Reply | None = None
    executed_ms: int | None = None
    timer: asyncio.TimerHandle | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True  # checked under the engine lock when the timer fires, so a racing timer is void
        if self.timer is not None:
            self.timer.cancel()

    def finish(self, reply: Reply, now: int) -> None:
        self.outcome = "executed" if reply.status == 200 else "refused"
        self.reply, self.executed_ms = reply, now

    def to_json(self) -> Json:
        params = self.params
        return {
            "method": self.method,
            "path": self.path,
            "symbol": params.get("symbol"),
            "clientOrderId": params.get("newClientOrderId") or params.get("origClientOrderId"),
            "receivedAt": self.received_ms,
            "dueAt": self.due_ms,
            "windowEnd": window_end(params) if "timestamp" in params else None,
            "outcome": self.outcome,
            "executedAt": self.executed_ms,
            "httpStatus": self.reply.status if self.reply else None,
            "reply": self.reply.body if self.reply and not isinstance(self.reply.body, bytes) else None,
        }


class SimState:
    """Everything one simulator app serves from."""

    def __init__(self, config: SimConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.limiter = RateLimiter(config)
        self.faults = FaultBook()
        self.late: list[LateExecution] = []  # every late_execution since the last reset, oldest first

    def reset(self) -> None:
        with self.engine.lock:
            for late in self.late:
                late.cancel()
            self.late = []
            self.engine.reset()
        self.limiter.reset()
        self.faults.clear()


def _parse(raw: bytes) -> list[tuple[str, str]]:
    return parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True) if raw else []


def _respond(reply: Reply, extra: Mapping[str, str] | None = None) -> Response:
    content = reply.body if isinstance(reply.body, bytes) else _encode(reply.body)
    headers = {**extra, **reply.headers} if extra else reply.headers
    return Response(content, status_code=reply.status, headers=headers, media_type=reply.media_type)


def _not_found(method: str, path: str) -> Response:
    return _respond(Reply(404, {"code": -5000, "msg": f"Path {path}, Method {method} is invalid"}))


class SimApp:
    """Request dispatch; one instance per Starlette app."""

    def __init__(self, state: SimState) -> None:
        self.state = state

    async def handle(self, request: Request) -> Response:
        path, method = request.scope["path"], request.method
        if path.startswith("/_sim/"):
            return await self.admin(request, path, method)
        endpoint = ENDPOINTS.get((method, path))
        if endpoint is None:
            return _not_found(method, path)
        raw_query = request.scope.get("query_string", b"")
        body = await request.body() if method != "GET" else b""
        params = dict(_parse(raw_query))
        params.update(_parse(body))
        state = self.state
        now = state.engine.now_ms()  # the request's receipt: the gateway checks its timestamp against this
        refused = state.limiter.admit(now, endpoint.weigh(params), endpoint.orders)
        if refused is not None:
            return _respond(refused, state.limiter.headers(orders=endpoint.orders > 0))

        def run(fill_fraction: Decimal | None) -> Reply:
            refused = self.gateway(endpoint, request, raw_query, body, params, now)
            return refused if refused is not None else self.execute(endpoint, method, path, params, fill_fraction)

        def defer(delay_ms: int) -> Reply | None:
            refused = self.gateway(endpoint, request, raw_query, body, params, now)
            if refused is None:
                self.execute_later(endpoint, method, path, params, now, delay_ms)
            return refused

        rule = state.faults.take(method, path)
        if rule is None:
            reply = run(None)
        else:
            reply = await apply_fault(rule, run, defer, params, now, state.config.weight_limit_1m)
        return _respond(reply, state.limiter.headers(orders=endpoint.orders > 0))

    def gateway(
        self, endpoint: Endpoint, request: Request, raw_query: bytes, body: bytes, params: dict[str, str], now: int
    ) -> Reply | None:
        """The gateway's checks of a SIGNED request received at ``now``; the refusal, or None."""
        if not endpoint.signed:
            return None
        try:
            authenticate(self.state.config, now, request, raw_query, body, params)
        except EngineError as error:
            return error_reply(error)
        return None

    def execute(
        self, endpoint: Endpoint, method: str, path: str, params: Mapping[str, str], fill_fraction: Decimal | None
    ) -> Reply:
        """Process a request that passed the gateway, now (the matching engine's recvWindow first)."""
        state = self.state
        engine = state.engine
        try:
            with engine.lock:
                now = engine.now_ms()
                if endpoint.signed and endpoint.matching:
                    check_me_window(now, params)
                call = Call(engine, state.config, params, now, fill_fraction)
                return Reply(200, endpoint.handler(call))
        except EngineError as error:
            return error_reply(error)
        except Exception:
            log.exception("sim exchange: unexpected error on %s %s", method, path)
            return Reply(500, {"code": -1000, "msg": "An unknown error occured while processing the request."})

    def execute_later(
        self, endpoint: Endpoint, method: str, path: str, params: Mapping[str, str], received: int, delay_ms: int
    ) -> None:
        """Have the engine execute the request ``delay_ms`` from now, off the request (a timer on the loop: a
        server stopping first simply drops it)."""
        state = self.state
        late = LateExecution(method, path, params, received, received + delay_ms)
        with state.engine.lock:
            state.late.append(late)
            late.timer = asyncio.get_running_loop().call_later(delay_ms / 1000, self._run_late, endpoint, late)

    def _run_late(self, endpoint: Endpoint, late: LateExecution) -> None:
        engine = self.state.engine
        with engine.lock:
            if late.cancelled:
                return
            late.finish(self.execute(endpoint, late.method, late.path, late.params, None), engine.now_ms())

    # -------------------------------------------------------------------------------------------- admin

    async def admin(self, request: Request, path: str, method: str) -> Response:
        token = self.state.config.admin_token
        if token is None:
            return _not_found(method, path)
        given = request.headers.get(ADMIN_HEADER, "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return _respond(Reply(401, {"error": "invalid admin token"}))
        handler = ADMIN_ROUTES.get((method, path))
        if handler is None:
            return _respond(Reply(404, {"error": f"no admin endpoint {method} {path}"}))
        data: Any = None
        if method == "POST":
            raw = await request.body()
            try:
                data = msgspec.json.decode(raw) if raw else {}
            except msgspec.DecodeError:
                return _respond(Reply(400, {"error": "body must be JSON"}))
        try:
            with self.state.engine.lock:
                return _respond(Reply(200, handler(self.state, request, data)))
        except (AdminError, FaultError, EngineError, ValueError, InvalidOperation) as error:
            message = error.msg if isinstance(error, EngineError) else str(error)
            return _respond(Reply(400, {"error": message}))


class AdminError(ValueError):
    pass


def _field(data: Any, name: str, *, required: bool = True) -> Any:
    if not isinstance(data, dict):
        raise AdminError("body must be a JSON object")
    if required and data.get(name) is None:
        raise AdminError(f"{name} is required")
    return data.get(name)


def _decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise AdminError(f"{name} must be a number or a decimal string")
    result = Decimal(str(value))
    if not result.is_finite():
        raise AdminError(f"{name} must be finite")
    return result


def _position_row(engine: Engine, position: eng.Position) -> Json:
    spec = engine.spec(position.symbol)
    return {
        "symbol": position.symbol,
        "positionSide": position.position_side,
        "positionAmt": spec.qty(position.amt),
        "entryPrice": eng.plain(position.entry_price),
        "markPrice": spec.price(engine.mark_price(position.symbol)),
        "unRealizedProfit": eng.fmt(engine.unrealized_pnl(position), 8),
        "updateTime": position.update_ms,
    }


def admin_state(state: SimState, request: Request, data: Any) -> Json:
    engine = state.engine
    margin = engine.margin_summary()
    return {
        "serverTime": engine.now_ms(),
        "dualSidePosition": engine.dual,
        "wallet": {
            "asset": eng.QUOTE_ASSET,
            "balance": eng.fmt(margin["wallet"], 8),
            "unrealizedProfit": eng.fmt(margin["unrealized"], 8),
            "availableBalance": eng.fmt(margin["available"], 8),
        },
        "positions": [_position_row(engine, p) for p in engine.positions(include_flat=False)],
        "prices": {symbol: engine.specs[symbol].price(price) for symbol, price in engine.prices().items()},
        "orders": {"total": len(engine.orders()), "open": engine.open_order_count()},
        "rateLimits": state.limiter.state(),
        "faults": state.faults.list(),
    }


def admin_orders(state: SimState, request: Request, data: Any) -> list[Json]:
    """Every order, oldest first; ``symbol`` and ``from_id`` (orderId at least) narrow it for long runs."""
    symbol = request.query_params.get("symbol")
    engine = state.engine
    if symbol:
        engine.spec(symbol)
    try:
        from_id = int(request.query_params.get("from_id", "0"))
    except ValueError:
        raise EngineError(-1102, "Parameter 'from_id' was not a valid integer.") from None
    orders = [o for o in engine.orders(symbol) if o.order_id >= from_id]
    return [shapes.order_json(engine, order, query=True) for order in orders]


def admin_reset(state: SimState, request: Request, data: Any) -> Json:
    state.reset()
    return {"ok": True}


def admin_position(state: SimState, request: Request, data: Any) -> Json:
    engine = state.engine
    spec = engine.spec(str(_field(data, "symbol")))
    amt = _decimal(_field(data, "amt"), "amt")
    if amt % spec.step_size:
        raise AdminError(f"amt must be a multiple of {spec.step_size}")
    entry = _field(data, "entry_price", required=False)
    side = _field(data, "position_side", required=False)
    position = engine.set_position(
        spec.symbol, amt, _decimal(entry, "entry_price") if entry is not None else None, side
    )
    return _position_row(engine, position)


def admin_price(state: SimState, request: Request, data: Any) -> Json:
    engine = state.engine
    spec = engine.spec(str(_field(data, "symbol")))
    engine.set_mark_price(spec.symbol, _decimal(_field(data, "price"), "price"))
    return {"symbol": spec.symbol, "markPrice": spec.price(engine.mark_price(spec.symbol))}


def admin_position_mode(state: SimState, request: Request, data: Any) -> Json:
    dual = _field(data, "dual")
    if not isinstance(dual, bool):
        raise AdminError("dual must be true or false")
    state.engine.set_dual(dual)
    return {"dualSidePosition": dual}


def admin_wallet(state: SimState, request: Request, data: Any) -> Json:
    state.engine.set_wallet(_decimal(_field(data, "balance"), "balance"))
    return {"asset": eng.QUOTE_ASSET, "balance": eng.fmt(state.engine.wallet, 8)}


def admin_clock(state: SimState, request: Request, data: Any) -> Json:
    offset = _field(data, "offset_ms")
    if not isinstance(offset, int) or isinstance(offset, bool) or abs(offset) > 86_400_000:
        raise AdminError("offset_ms must be an integer number of milliseconds within a day")
    state.engine.clock_offset_ms = offset
    return {"offset_ms": offset, "serverTime": state.engine.now_ms()}


def admin_add_fault(state: SimState, request: Request, data: Any) -> Json:
    rule = FaultRule.from_json(data)
    state.faults.add(rule)
    return rule.to_json()


def admin_list_faults(state: SimState, request: Request, data: Any) -> list[Json]:
    return state.faults.list()


def admin_clear_faults(state: SimState, request: Request, data: Any) -> Json:
    state.faults.clear()
    return {"ok": True}


def admin_late_executions(state: SimState, request: Request, data: Any) -> list[Json]:
    return [late.to_json() for late in state.late]


AdminHandler = Callable[[SimState, Request, Any], Any]
ADMIN_ROUTES: Final[dict[tuple[str, str], AdminHandler]] = {
    ("GET", "/_sim/state"): admin_state,
    ("GET", "/_sim/orders"): admin_orders,
    ("POST", "/_sim/reset"): admin_reset,
    ("POST", "/_sim/position"): admin_position,
    ("POST", "/_sim/price"): admin_price,
    ("POST", "/_sim/position-mode"): admin_position_mode,
    ("POST", "/_sim/wallet"): admin_wallet,
    ("POST", "/_sim/clock"): admin_clock,
    ("POST", "/_sim/faults"): admin_add_fault,
    ("GET", "/_sim/faults"): admin_list_faults,
    ("DELETE", "/_sim/faults"): admin_clear_faults,
    ("GET", "/_sim/late"): admin_late_executions,
}


def build_engine(config: SimConfig) -> Engine:
    return Engine(
        config.symbols,
        seed=config.seed,
        price_step_ms=config.price_step_ms,
        price_sigma=config.price_sigma,
        wallet=config.wallet_usdt,
        leverage=config.leverage,
        fee_rate=config.fee_rate,
    )


def create_app(config: SimConfig, engine: Engine | None = None) -> Starlette:
    """The simulator as an ASGI app; ``app.state.sim`` is its :class:`SimState` (engine, limiter, faults)."""
    state = SimState(config, engine if engine is not None else build_engine(config))
    dispatch = SimApp(state)
    methods = ["GET", "POST", "PUT", "DELETE"]
    app = Starlette(routes=[Route("/{path:path}", dispatch.handle, methods=methods)])
    app.state.sim = state
    return app
