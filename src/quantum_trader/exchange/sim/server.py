"""Running the simulated Binance USD-M futures exchange: ``serve`` (the CLI) and ``SimServer`` (``SimConfig`` in
``config.py``).

``SimServer`` runs the app with uvicorn in a background thread for tests and the demo::

    with SimServer(SimConfig(admin_token="t")) as sim:
        sim.url        # "http://127.0.0.1:54321" (port 0 picks a free port: the socket is bound first)
        sim.engine     # the Engine, for direct assertions and set-up

Admin API (only when ``admin_token`` is set; otherwise 404; a wrong ``X-Sim-Admin-Token`` is 401):

==========================  ===============================================================================
GET    /_sim/state          {"serverTime", "dualSidePosition", "wallet": {"asset", "balance",
                            "unrealizedProfit", "availableBalance"}, "positions": [{"symbol", "positionSide",
                            "positionAmt", "entryPrice", "markPrice", "unRealizedProfit", "updateTime"}]
                            (non-zero only), "prices": {symbol: price}, "orders": {"total", "open"},
                            "rateLimits": {"usedWeight1m", "orderCount10s", "orderCount1m", "bannedUntil"},
                            "faults": [rule...]}
GET    /_sim/orders         [order...] every order, oldest first, shaped like GET /fapi/v1/order
                            (``?symbol=`` filters)
GET    /_sim/user-events    {"events": [{"n", "event"}...], "last"}: the user-data events numbered above
                            ``?after=N`` (the newest 2,000 are kept), as the stream at /ws/<listenKey> pushes them
POST   /_sim/reset          {} -> {"ok": true}: wallet, positions, orders, prices, position mode, rate limits
                            and faults back to the start (order ids keep increasing); pending late
                            executions are cancelled
POST   /_sim/position       {"symbol", "amt": "0.5", "entry_price"?: "…", "position_side"?: "LONG"} -> the
                            position row; a change made outside the trading system (no wallet effect)
POST   /_sim/price          {"symbol", "price"} -> {"symbol", "markPrice"}
POST   /_sim/force-close    {"symbol", "qty"?, "adl"?: true} -> the order: the exchange closes the position
                            itself (liquidation ``autoclose-<ms>``, or ADL ``adl_autoclose``), with its events
POST   /_sim/position-mode  {"dual": true|false} -> {"dualSidePosition"}
POST   /_sim/wallet         {"balance": "…"} -> {"asset", "balance"}
POST   /_sim/clock          {"offset_ms": 5000} -> {"offset_ms", "serverTime"}: the exchange's clock runs
                            that far ahead of the host's (negative: behind); reset sets it back to 0
POST   /_sim/faults         a rule (see ``faults.py``) -> the rule;  GET lists them;  DELETE clears them
POST   /_sim/stream-faults  {"kind": drop|silence|delay|duplicate|reorder, "count"?, "ms"?} -> the fault of the
                            user-data stream (see ``stream.py``);  GET lists them;  DELETE clears them
GET    /_sim/late           [{"method", "path", "symbol", "clientOrderId", "receivedAt", "dueAt", "windowEnd",
                            "outcome": "pending"|"executed"|"refused", "executedAt", "httpStatus", "reply"}...]
                            the requests ``late_execution`` rules deferred since the last reset, oldest
                            first; "reply" is the engine's answer when it executed (-5028: past the ME
                            recvWindow, nothing executed)
==========================  ===============================================================================

Errors of the admin API are ``{"error": "..."}`` with HTTP 400.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import uvicorn

from quantum_trader.exchange.sim.app import build_engine, create_app
from quantum_trader.exchange.sim.config import SimConfig
from quantum_trader.exchange.sim.engine import Engine
from quantum_trader.exchange.sim.state import SimState

# SimConfig is imported from here by the CLI and the tests.
__all__ = ["SimConfig", "SimServer", "serve"]


def _bind(config: SimConfig) -> socket.socket:
    """Bind (and listen) before uvicorn starts, so port 0 is resolved and connections queue from now on."""
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _url(config: SimConfig, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{port}"


def _uvicorn_config(app: Any, *, log_config: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        log_level="warning",
        log_config=log_config,
        access_log=False,
        http="h11",
        lifespan="off",
        timeout_graceful_shutdown=1,
        timeout_keep_alive=30,
    )


def serve(config: SimConfig, *, engine: Engine | None = None, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted (``qt sim-exchange``). ``on_ready`` gets the URL once the port is bound."""
    sock = _bind(config)
    app = create_app(config, engine)
    server = uvicorn.Server(_uvicorn_config(app, log_config=uvicorn.config.LOGGING_CONFIG))
    if on_ready is not None:
        on_ready(_url(config, sock))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class SimServer:
    """The simulator on a background thread; ``start()`` returns once it accepts connections."""

    def __init__(self, config: SimConfig | None = None, engine: Engine | None = None) -> None:
        self.config = config if config is not None else SimConfig()
        self.engine = engine if engine is not None else build_engine(self.config)
        self.app = create_app(self.config, self.engine)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._url: str | None = None

    @property
    def state(self) -> SimState:
        state: SimState = self.app.state.sim
        return state

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("SimServer is not started")
        return self._url

    def start(self, timeout: float = 10.0) -> SimServer:
        if self._thread is not None:
            raise RuntimeError("SimServer already started")
        sock = _bind(self.config)
        # log_config=None: leave the host process's logging configuration alone.
        server = uvicorn.Server(_uvicorn_config(self.app, log_config=None))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="sim-exchange", daemon=True)
        self._sock, self._server, self._thread = sock, server, thread
        self._url = _url(self.config, sock)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the simulated exchange did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        server, thread, sock = self._server, self._thread, self._sock
        self._server = self._thread = self._sock = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=10)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
