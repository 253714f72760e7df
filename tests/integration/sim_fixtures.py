"""Driving the simulated exchange over real HTTP: hand-written Binance HMAC signing, admin calls, a ccxt client.

Import the fixtures into a test module (``from sim_fixtures import sim, client``) to use them.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import ccxt.async_support as ccxt
import httpx
import pytest

from quantum_trader.exchange.sim import SimConfig, SimServer

ADMIN_TOKEN = "test-admin-token"
CCXT_SECTIONS = {
    "fapiPublic": "v1",
    "fapiPublicV2": "v2",
    "fapiPublicV3": "v3",
    "fapiPrivate": "v1",
    "fapiPrivateV2": "v2",
    "fapiPrivateV3": "v3",
}


def sign(secret: str, payload: str) -> str:
    """Binance: hex HMAC-SHA256 of totalParams with the secret key."""
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class BinanceClient:
    """A minimal Binance REST client written from the docs (not ccxt)."""

    url: str
    api_key: str
    api_secret: str
    http: httpx.Client
    now_ms: Callable[[], int] = field(default=wall_clock_ms)

    def public(self, method: str, path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        return self.http.request(method, self.url + path, params=params)

    def signed(
        self,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        *,
        timestamp: int | None = None,
        recv_window: int | None = None,
        api_key: str | None = None,
        secret: str | None = None,
        in_body: bool | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        query_params = dict(params or {})
        query_params["timestamp"] = self.now_ms() if timestamp is None else timestamp
        if recv_window is not None:
            query_params["recvWindow"] = recv_window
        query = urlencode(query_params)
        signed = f"{query}&signature={sign(self.api_secret if secret is None else secret, query)}"
        headers = {"X-MBX-APIKEY": self.api_key if api_key is None else api_key}
        in_body = method in ("POST", "PUT") if in_body is None else in_body
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        if in_body:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            return self.http.request(method, self.url + path, content=signed, headers=headers, **extra)
        return self.http.request(method, f"{self.url}{path}?{signed}", headers=headers, **extra)

    def order(self, **params: Any) -> httpx.Response:
        params.setdefault("type", "MARKET")
        return self.signed("POST", "/fapi/v1/order", params)

    def admin(self, method: str, path: str, json: Any = None, *, token: str = ADMIN_TOKEN) -> httpx.Response:
        return self.http.request(method, self.url + path, json=json, headers={"X-Sim-Admin-Token": token})


def make_client(server: SimServer, http: httpx.Client, now_ms: Callable[[], int] | None = None) -> BinanceClient:
    return BinanceClient(server.url, server.config.api_key, server.config.api_secret, http, now_ms or wall_clock_ms)


def make_ccxt(server: SimServer, *, secret: str | None = None, timeout_ms: int = 10_000) -> Any:
    """ccxt's binanceusdm, configured exactly as the trading system points it at the simulator."""
    exchange = ccxt.binanceusdm(
        {
            "apiKey": server.config.api_key,
            "secret": server.config.api_secret if secret is None else secret,
            "enableRateLimit": False,
            "timeout": timeout_ms,
            "options": {"fetchCurrencies": False, "defaultType": "future", "fetchMarkets": {"types": ["linear"]}},
        }
    )
    for section, version in CCXT_SECTIONS.items():
        exchange.urls["api"][section] = f"{server.url}/fapi/{version}"
    return exchange


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    """One simulator per test module; still prices (sigma 0) so notional checks are exact."""
    with SimServer(SimConfig(admin_token=ADMIN_TOKEN, price_sigma=0.0)) as server:
        yield server


@pytest.fixture
def client(sim: SimServer) -> Iterator[BinanceClient]:
    """A client on a freshly reset simulator."""
    with httpx.Client(timeout=5.0) as http:
        binance = make_client(sim, http)
        assert binance.admin("POST", "/_sim/reset").status_code == 200
        yield binance
