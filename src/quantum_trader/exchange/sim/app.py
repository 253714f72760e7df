"""The simulated exchange over HTTP: request dispatch to the REST endpoints (``endpoints.py``) through the rate
limits (``ratelimit.py``), the faults (``faults.py``) and the SIGNED checks (``auth.py``), and to the admin API
(``admin.py``). ``create_app`` builds the ASGI app; ``server.py`` runs it.

Errors are ``{"code", "msg"}`` with Binance's HTTP status; unknown paths are HTTP 404 with -5000.
The admin API and the fault kinds are described in ``server.py`` and ``faults.py``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from quantum_trader.exchange.sim.admin import ADMIN_HEADER, ADMIN_ROUTES, AdminError
from quantum_trader.exchange.sim.auth import authenticate, check_me_window
from quantum_trader.exchange.sim.config import SimConfig
from quantum_trader.exchange.sim.endpoints import ENDPOINTS, Call, Endpoint
from quantum_trader.exchange.sim.engine import Engine
from quantum_trader.exchange.sim.faults import FaultError, Reply, apply_fault
from quantum_trader.exchange.sim.late import LateExecution
from quantum_trader.exchange.sim.params import EngineError
from quantum_trader.exchange.sim.state import SimState
from quantum_trader.exchange.sim.stream import COMBINED_PATHS

# SimState and check_me_window are imported from here by server.py and the tests.
__all__ = ["SimApp", "SimState", "build_engine", "check_me_window", "create_app", "error_reply"]

log = logging.getLogger(__name__)

_encode = msgspec.json.encode


def error_reply(error: EngineError) -> Reply:
    return Reply(error.http_status, error.body())


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
        refused = state.limiter.admit(now, endpoint.weigh(params), endpoint.orders, f"{method} {path}")
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
        """The gateway's checks of a SIGNED (or USER_STREAM: API key only) request received at ``now``; the
        refusal, or None."""
        if endpoint.key_only:
            api_key = request.headers.get("x-mbx-apikey") or ""
            if not hmac.compare_digest(api_key.encode(), self.state.config.api_key.encode()):
                return error_reply(EngineError(-2015, "Invalid API-key, IP, or permissions for action.", 401))
            return None
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
    streams = state.streams
    methods = ["GET", "POST", "PUT", "DELETE"]
    routes = [
        WebSocketRoute("/ws", streams.serve),
        WebSocketRoute("/ws/{listen_key}", streams.serve),
        WebSocketRoute("/private/ws", streams.serve),
        *(WebSocketRoute(path, streams.serve_combined) for path in COMBINED_PATHS),
        Route("/{path:path}", dispatch.handle, methods=methods),
    ]
    app = Starlette(routes=routes)
    app.state.sim = state
    return app
