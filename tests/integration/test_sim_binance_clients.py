"""Binance's own Python clients against the simulator (issue 22, item 1): the futures connector
(``binance-futures-connector``: REST listen key, WebSocket with live ``SUBSCRIBE`` on ``/ws``) and its
successor SDK (``binance-sdk-derivatives-trading-usds-futures``: subscribes on ``/private/stream`` and parses
every event into its own pydantic models, so a field we name or type differently from Binance fails there).
Also the live-subscription protocol itself, spoken by hand: ``LIST_SUBSCRIPTIONS``, ``UNSUBSCRIBE``, and the
error replies to a bad request."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from binance.um_futures import UMFutures
from binance.websocket.um_futures.websocket_client import UMFuturesWebsocketClient
from binance_common.configuration import ConfigurationRestAPI, ConfigurationWebSocketStreams
from binance_sdk_derivatives_trading_usds_futures.derivatives_trading_usds_futures import (
    DerivativesTradingUsdsFutures,
)
from sim_fixtures import BinanceClient, client, sim
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from quantum_trader.exchange.sim import SimServer

pytestmark = pytest.mark.integration
__all__ = ["client", "sim"]  # fixtures, imported for pytest

SYMBOL = "BTCUSDT"


def _ws(url: str) -> str:
    return url.replace("http://", "ws://")


def _until(found: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not found():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def _open(client: BinanceClient, amt: str = "0.100") -> None:
    assert client.admin("POST", "/_sim/position", {"symbol": SYMBOL, "amt": amt}).status_code == 200


def test_the_futures_connector_follows_a_close_and_the_mark_price(sim: SimServer, client: BinanceClient) -> None:
    """The connector's REST client gets and renews the key; its WebSocket client subscribes to the key and to
    the mark price on the bare ``/ws`` (Binance's live subscription), and receives the close it placed as
    NEW, TRADE and ACCOUNT_UPDATE, between mark price ticks."""
    _open(client)
    rest = UMFutures(key=sim.config.api_key, secret=sim.config.api_secret, base_url=sim.url)
    key = rest.new_listen_key()["listenKey"]
    assert rest.renew_listen_key(key) == {"listenKey": key}
    got: list[dict[str, Any]] = []
    ws = UMFuturesWebsocketClient(stream_url=_ws(sim.url), on_message=lambda _, text: got.append(json.loads(text)))
    try:
        ws.user_data(listen_key=key, id=1)
        ws.mark_price(SYMBOL.lower(), 1, id=2)
        _until(lambda: {"result": None, "id": 2} in got, "the subscriptions were acknowledged")
        placed = rest.new_order(
            symbol=SYMBOL, side="SELL", type="MARKET", quantity=0.01, reduceOnly="true", newClientOrderId="qt-fc"
        )
        assert placed["clientOrderId"] == "qt-fc"
        _until(lambda: any(m.get("e") == "ACCOUNT_UPDATE" for m in got), "the close's ACCOUNT_UPDATE")
        _until(lambda: sum(m.get("e") == "markPriceUpdate" for m in got) >= 2, "two mark price ticks")
    finally:
        ws.stop()
    assert got[:2] == [{"result": None, "id": 1}, {"result": None, "id": 2}]
    user = [m for m in got if m.get("e") in ("ORDER_TRADE_UPDATE", "ACCOUNT_UPDATE")]
    assert [(m["e"], m.get("o", {}).get("x"), m.get("o", {}).get("c")) for m in user] == [
        ("ORDER_TRADE_UPDATE", "NEW", "qt-fc"), ("ORDER_TRADE_UPDATE", "TRADE", "qt-fc"), ("ACCOUNT_UPDATE", None, None)
    ]  # fmt: skip
    assert user[-1]["a"]["P"][0]["pa"] == "0.090"
    assert {m["s"] for m in got if m.get("e") == "markPriceUpdate"} == {SYMBOL}


def test_binances_sdk_parses_every_event_into_its_own_models(sim: SimServer, client: BinanceClient) -> None:
    """The SDK subscribes on ``/private/stream`` and validates each event against Binance's schema: a position
    set outside the order flow (ADJUSTMENT), then a close (NEW, TRADE, ORDER), each parsed with nothing left
    over (``additional_properties`` empty: no field the schema does not know)."""
    _open(client)
    sdk = DerivativesTradingUsdsFutures(
        config_rest_api=ConfigurationRestAPI(
            api_key=sim.config.api_key, api_secret=sim.config.api_secret, base_path=sim.url
        ),
        config_ws_streams=ConfigurationWebSocketStreams(stream_url=_ws(sim.url)),
    )
    key = sdk.rest_api.start_user_data_stream().data().listen_key
    assert sdk.rest_api.start_user_data_stream().data().listen_key == key  # the account's one active key

    async def follow() -> tuple[list[Any], list[Any]]:
        user: list[Any] = []
        marks: list[Any] = []
        connection = await sdk.websocket_streams.create_connection()
        try:
            (await connection.user_data(key)).on("message", user.append)
            (await connection.mark_price_stream(symbol=SYMBOL.lower(), update_speed="1s")).on("message", marks.append)
            await asyncio.sleep(0.5)  # the SDK sends its SUBSCRIBE after a short delay of its own
            await asyncio.to_thread(_open, client, "0.090")
            await asyncio.to_thread(
                client.order, symbol=SYMBOL, side="SELL", quantity="0.010", reduceOnly="true", newClientOrderId="qt-sdk"
            )
            deadline = time.monotonic() + 10
            while len(user) < 4 or not marks:
                assert time.monotonic() < deadline, f"events: {user}, marks: {marks}"
                await asyncio.sleep(0.05)
        finally:
            await connection.close_connection(close_session=True)
        return user, marks

    user, marks = asyncio.run(follow())
    parsed = [next(v for v in vars(event).values() if v is not None) for event in user]
    kinds = [type(p).__name__ for p in parsed]
    assert kinds == ["AccountUpdate", "OrderTradeUpdate", "OrderTradeUpdate", "AccountUpdate"]
    adjustment, new, trade, fill = parsed
    assert (adjustment.a.m, adjustment.a.P[0].s, adjustment.a.P[0].pa) == ("ADJUSTMENT", SYMBOL, "0.090")
    assert (new.o.c, new.o.x, new.o.X, trade.o.x, trade.o.X) == ("qt-sdk", "NEW", "NEW", "TRADE", "FILLED")
    assert (trade.o.l, trade.o.z, trade.o.R) == ("0.010", "0.010", True)
    assert (fill.a.m, fill.a.P[0].pa) == ("ORDER", "0.080")
    for model in [*parsed, new.o, trade.o, fill.a, *fill.a.P, marks[0]]:
        assert model.additional_properties == {}, f"{type(model).__name__} has fields Binance's schema lacks"
    assert (marks[0].e, marks[0].s) == ("markPriceUpdate", SYMBOL)


def test_the_live_subscription_protocol(client: BinanceClient) -> None:
    """By hand: a subscription is listed, a bad request gets an error reply with its id (the connection stays),
    a key that is not live is refused, and after UNSUBSCRIBE nothing more arrives for that key."""
    key = client.signed("POST", "/fapi/v1/listenKey").json()["listenKey"]
    _open(client)
    with connect(_ws(client.url) + "/ws") as ws:

        def ask(request: Any) -> dict[str, Any]:
            ws.send(request if isinstance(request, str) else json.dumps(request))
            return dict(json.loads(ws.recv(timeout=5)))

        assert ask({"method": "SUBSCRIBE", "params": [key], "id": 7}) == {"result": None, "id": 7}
        assert ask({"method": "LIST_SUBSCRIPTIONS", "id": 8}) == {"result": [key], "id": 8}
        assert ask("{not json") == {"code": 3, "msg": "Invalid JSON", "id": None}
        assert ask({"method": "SUBSCRIBE", "params": ["x" * 64], "id": 9}) == {
            "code": 2, "msg": "Invalid request: invalid listenKey", "id": 9
        }  # fmt: skip
        assert ask({"method": "FLY", "id": 10})["code"] == 2
        assert ask({"method": "SUBSCRIBE", "params": "btcusdt@markPrice", "id": 11})["code"] == 2
        assert ask({"method": "UNSUBSCRIBE", "params": [key], "id": 12}) == {"result": None, "id": 12}
        assert ask({"method": "LIST_SUBSCRIPTIONS", "id": 13}) == {"result": [], "id": 13}
        placed = client.order(symbol=SYMBOL, side="SELL", quantity="0.010", reduceOnly="true")
        assert placed.status_code == 200
        # the next thing on the wire is the answer to this request, not an event of the key left
        assert ask({"method": "LIST_SUBSCRIPTIONS", "id": 14}) == {"result": [], "id": 14}


def test_the_private_paths_need_a_live_key(client: BinanceClient) -> None:
    """Without a listen key (or with one that is not live) the private URL refuses the handshake."""
    for path in ("/private/ws", "/private/ws?listenKey=" + "x" * 64):
        with pytest.raises(InvalidStatus, match="403"), connect(_ws(client.url) + path):
            pass
