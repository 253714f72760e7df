"""The simulator's user-data stream (issue 22, first steps): the listen key's REST endpoints with Binance's
rules, asked by a client written from Binance's docs and by ccxt; the events the engine records as it works
(``ORDER_TRADE_UPDATE``, ``ACCOUNT_UPDATE``), read through the admin API; and the WebSocket that pushes them,
read with the ``websockets`` client: both URL forms, the event filter, the end of a key."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from decimal import Decimal
from typing import Any

import ccxt.pro as ccxtpro
import httpx
import pytest
from sim_fixtures import ADMIN_TOKEN, CCXT_SECTIONS, BinanceClient, client, make_ccxt, make_client, sim
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from quantum_trader.domain.oracle import plan_of_order
from quantum_trader.exchange.sim import SimConfig, SimServer

pytestmark = pytest.mark.integration
__all__ = ["client", "sim"]  # fixtures, imported for pytest

SYMBOL = "BTCUSDT"
# Every field of Binance's USD-M ORDER_TRADE_UPDATE order object and ACCOUNT_UPDATE position (its docs' examples)
ORDER_FIELDS = {"s", "c", "S", "o", "f", "q", "p", "ap", "sp", "x", "X", "i", "l", "z", "L", "N", "n", "T", "t", "b",
                "a", "m", "R", "wt", "ot", "ps", "cp", "rp", "pP", "si", "ss", "V", "pm", "gtd"}  # fmt: skip
POSITION_FIELDS = {"s", "pa", "ep", "bep", "cr", "up", "mt", "iw", "ps"}


def _key_call(client: BinanceClient, method: str, params: dict[str, str] | None = None, key: str | None = None) -> Any:
    headers = {"X-MBX-APIKEY": client.api_key if key is None else key}
    return client.http.request(method, f"{client.url}/fapi/v1/listenKey", params=params, headers=headers)


def _events(client: BinanceClient, after: int = 0) -> list[dict[str, Any]]:
    reply = client.admin("GET", f"/_sim/user-events?after={after}")
    assert reply.status_code == 200, reply.text
    return [row["event"] for row in reply.json()["events"]]


def test_one_active_key_post_extends_put_keeps_alive_delete_closes(client: BinanceClient) -> None:
    first = _key_call(client, "POST")
    assert first.status_code == 200 and len(first.json()["listenKey"]) == 64
    key = first.json()["listenKey"]
    assert _key_call(client, "POST").json() == {"listenKey": key}  # the account's active key, not a new one
    assert _key_call(client, "PUT").json() == {"listenKey": key}
    assert _key_call(client, "PUT", {"listenKey": key}).status_code == 200
    wrong = _key_call(client, "PUT", {"listenKey": "x" * 64})
    assert (wrong.status_code, wrong.json()) == (400, {"code": -1125, "msg": "This listenKey does not exist."})
    assert _key_call(client, "DELETE").json() == {}
    gone = _key_call(client, "PUT")
    assert gone.status_code == 400 and gone.json()["code"] == -1125
    assert _key_call(client, "POST").json()["listenKey"] != key  # a new key after the close


def test_the_listen_key_needs_the_api_key_but_no_signature(client: BinanceClient) -> None:
    refused = _key_call(client, "POST", key="not-the-key")
    assert refused.status_code == 401 and refused.json()["code"] == -2015


def test_a_key_not_kept_alive_expires() -> None:
    config = SimConfig(admin_token=ADMIN_TOKEN, price_sigma=0.0, listen_key_lifetime_s=0.3)
    with SimServer(config) as server, httpx.Client(timeout=5.0) as http:
        binance = make_client(server, http)
        key = _key_call(binance, "POST").json()["listenKey"]
        assert _key_call(binance, "PUT").status_code == 200
        time.sleep(0.5)
        assert _key_call(binance, "PUT").json()["code"] == -1125
        assert _key_call(binance, "POST").json()["listenKey"] != key


def test_ccxt_asks_for_and_keeps_alive_the_key(sim: SimServer, client: BinanceClient) -> None:
    async def go() -> tuple[str, Any]:
        exchange = make_ccxt(sim)
        try:
            created = await exchange.fapiPrivatePostListenKey()
            kept = await exchange.fapiPrivatePutListenKey({"listenKey": created["listenKey"]})
            return created["listenKey"], kept
        finally:
            await exchange.close()

    key, kept = asyncio.run(go())
    assert len(key) == 64 and kept == {"listenKey": key}


def test_a_reduce_only_close_is_a_new_order_a_trade_and_an_account_update_of_that_symbol_only(
    client: BinanceClient,
) -> None:
    assert client.admin("POST", "/_sim/position", {"symbol": SYMBOL, "amt": "0.100"}).status_code == 200
    assert client.admin("POST", "/_sim/position", {"symbol": "ETHUSDT", "amt": "1.000"}).status_code == 200
    before = client.admin("GET", "/_sim/user-events").json()["last"]
    placed = client.order(symbol=SYMBOL, side="SELL", quantity="0.010", reduceOnly="true", newClientOrderId="qt-p1")
    assert placed.status_code == 200, placed.text
    new, trade, account = _events(client, before)
    assert [e["e"] for e in (new, trade, account)] == ["ORDER_TRADE_UPDATE", "ORDER_TRADE_UPDATE", "ACCOUNT_UPDATE"]
    assert set(new["o"]) == set(trade["o"]) == ORDER_FIELDS
    assert (new["o"]["x"], new["o"]["X"], new["o"]["l"], new["o"]["z"]) == ("NEW", "NEW", "0.000", "0.000")
    o = trade["o"]
    assert (o["s"], o["c"], o["S"], o["o"], o["R"], o["ps"]) == (SYMBOL, "qt-p1", "SELL", "MARKET", True, "BOTH")
    assert (o["x"], o["X"], o["l"], o["z"], o["i"]) == ("TRADE", "FILLED", "0.010", "0.010", placed.json()["orderId"])
    assert Decimal(o["L"]) == Decimal(o["ap"]) > 0 and o["t"] > 0  # one fill: its price is the average
    assert account["a"]["m"] == "ORDER"
    [position] = account["a"]["P"]  # the symbol the fill moved, not ETHUSDT
    assert set(position) == POSITION_FIELDS and (position["s"], position["pa"]) == (SYMBOL, "0.090")
    assert new["E"] <= trade["E"] <= account["E"] and trade["T"] == o["T"]


def test_a_cancelled_resting_order_and_an_unfillable_ioc_are_their_own_events(client: BinanceClient) -> None:
    assert client.admin("POST", "/_sim/position", {"symbol": SYMBOL, "amt": "0.100"}).status_code == 200
    mark = Decimal(client.public("GET", "/fapi/v1/premiumIndex", {"symbol": SYMBOL}).json()["markPrice"])
    far = str((mark * Decimal("1.04")).quantize(Decimal("0.1")))
    before = client.admin("GET", "/_sim/user-events").json()["last"]
    rest = client.order(symbol=SYMBOL, side="SELL", type="LIMIT", quantity="0.010", price=far, timeInForce="GTC")
    assert rest.status_code == 200, rest.text
    cancel = client.signed("DELETE", "/fapi/v1/order", {"symbol": SYMBOL, "orderId": rest.json()["orderId"]})
    assert cancel.status_code == 200, cancel.text
    ioc = client.order(symbol=SYMBOL, side="SELL", type="LIMIT", quantity="0.010", price=far, timeInForce="IOC")
    assert ioc.status_code == 200, ioc.text
    seen = [(e["o"]["i"], e["o"]["x"], e["o"]["X"]) for e in _events(client, before)]
    assert seen == [
        (rest.json()["orderId"], "NEW", "NEW"),
        (rest.json()["orderId"], "CANCELED", "CANCELED"),
        (ioc.json()["orderId"], "NEW", "NEW"),
        (ioc.json()["orderId"], "EXPIRED", "EXPIRED"),
    ]


# --- the WebSocket --------------------------------------------------------------------------------------------


def _ws_url(server_url: str, path: str) -> str:
    return server_url.replace("http://", "ws://") + path


def _next(ws: Any, timeout_s: float = 5.0) -> dict[str, Any]:
    return dict(json.loads(ws.recv(timeout=timeout_s)))


@pytest.mark.parametrize("path", ["/ws/{key}", "/private/ws?listenKey={key}"])
def test_the_stream_pushes_each_order_event_and_account_update_in_order(client: BinanceClient, path: str) -> None:
    """Connected with the live key (both URL forms), a close placed over REST arrives as NEW, TRADE and the
    position's ACCOUNT_UPDATE, in that order, the same events the engine recorded."""
    assert client.admin("POST", "/_sim/position", {"symbol": SYMBOL, "amt": "0.100"}).status_code == 200
    key = _key_call(client, "POST").json()["listenKey"]
    with connect(_ws_url(client.url, path.format(key=key))) as ws:
        before = client.admin("GET", "/_sim/user-events").json()["last"]
        placed = client.order(symbol=SYMBOL, side="SELL", quantity="0.010", reduceOnly="true", newClientOrderId="qt-w")
        assert placed.status_code == 200, placed.text
        pushed = [_next(ws) for _ in range(3)]
    assert pushed == _events(client, before)
    assert [(e["e"], e.get("o", {}).get("x")) for e in pushed] == [
        ("ORDER_TRADE_UPDATE", "NEW"), ("ORDER_TRADE_UPDATE", "TRADE"), ("ACCOUNT_UPDATE", None)
    ]  # fmt: skip


def test_the_private_url_filters_by_event_type(client: BinanceClient) -> None:
    assert client.admin("POST", "/_sim/position", {"symbol": SYMBOL, "amt": "0.100"}).status_code == 200
    key = _key_call(client, "POST").json()["listenKey"]
    with connect(_ws_url(client.url, f"/private/ws?listenKey={key}&events=ACCOUNT_UPDATE")) as ws:
        for _ in range(2):
            placed = client.order(symbol=SYMBOL, side="SELL", quantity="0.010", reduceOnly="true")
            assert placed.status_code == 200, placed.text
        pushed = [_next(ws) for _ in range(2)]
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.5)  # nothing else: the order events were filtered out
    assert [(e["e"], e["a"]["P"][0]["pa"]) for e in pushed] == [
        ("ACCOUNT_UPDATE", "0.090"),
        ("ACCOUNT_UPDATE", "0.080"),
    ]


def test_an_expired_key_ends_the_stream_with_listen_key_expired() -> None:
    config = SimConfig(admin_token=ADMIN_TOKEN, price_sigma=0.0, listen_key_lifetime_s=0.5)
    with SimServer(config) as server, httpx.Client(timeout=5.0) as http:
        binance = make_client(server, http)
        key = _key_call(binance, "POST").json()["listenKey"]
        with connect(_ws_url(server.url, f"/ws/{key}")) as ws:
            expired = _next(ws, timeout_s=3.0)
            assert (expired["e"], expired["listenKey"]) == ("listenKeyExpired", key) and expired["E"] > 0
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=2.0)


def test_a_deleted_key_ends_the_stream_and_another_key_is_refused(client: BinanceClient) -> None:
    key = _key_call(client, "POST").json()["listenKey"]
    with connect(_ws_url(client.url, f"/ws/{key}")) as ws:
        assert _key_call(client, "DELETE").status_code == 200
        assert _next(ws)["e"] == "listenKeyExpired"
    with pytest.raises(InvalidStatus), connect(_ws_url(client.url, "/ws/" + "x" * 64)):
        pass  # refused before the handshake completes


@pytest.mark.parametrize(("adl", "client_id"), [(False, "autoclose-"), (True, "adl_autoclose")])
def test_a_liquidation_or_adl_is_a_close_the_chain_did_not_make_on_the_stream(
    client: BinanceClient, adl: bool, client_id: str
) -> None:
    assert client.admin("POST", "/_sim/position", {"symbol": SYMBOL, "amt": "-0.050"}).status_code == 200
    key = _key_call(client, "POST").json()["listenKey"]
    with connect(_ws_url(client.url, f"/ws/{key}")) as ws:
        closed = client.admin("POST", "/_sim/force-close", {"symbol": SYMBOL, "qty": "0.020", "adl": adl})
        assert closed.status_code == 200, closed.text
        new, trade, account = (_next(ws) for _ in range(3))
    assert new["o"]["c"].startswith(client_id) and trade["o"]["c"] == new["o"]["c"]
    assert (trade["o"]["S"], trade["o"]["o"], trade["o"]["R"], trade["o"]["X"]) == (
        "BUY",
        "LIQUIDATION",
        True,
        "FILLED",
    )
    assert (account["a"]["m"], account["a"]["P"][0]["pa"]) == ("ORDER", "-0.030")
    assert plan_of_order(trade["o"]["c"]) is None  # never one of the chain's orders


def test_a_position_changed_outside_the_exchanges_order_flow_is_an_account_update(client: BinanceClient) -> None:
    key = _key_call(client, "POST").json()["listenKey"]
    with connect(_ws_url(client.url, f"/ws/{key}")) as ws:
        assert client.admin("POST", "/_sim/position", {"symbol": "ETHUSDT", "amt": "2.000"}).status_code == 200
        update = _next(ws)
    assert (update["e"], update["a"]["m"]) == ("ACCOUNT_UPDATE", "ADJUSTMENT")
    assert [(p["s"], p["pa"]) for p in update["a"]["P"]] == [("ETHUSDT", "2.000")]


def test_the_mark_price_streams_push_every_second_and_follow_the_price(client: BinanceClient) -> None:
    with connect(_ws_url(client.url, "/ws/btcusdt@markPrice@1s")) as ws:
        first = _next(ws)
        assert client.admin("POST", "/_sim/price", {"symbol": SYMBOL, "price": "61000"}).status_code == 200
        second = _next(ws, timeout_s=3.0)
    assert (first["e"], first["s"]) == ("markPriceUpdate", SYMBOL) and second["E"] > first["E"]
    assert Decimal(second["p"]) == Decimal(61000) and second["T"] > second["E"]
    with connect(_ws_url(client.url, "/stream?streams=ethusdt@markPrice@1s/btcusdt@markPrice@1s")) as ws:
        names = {_next(ws)["stream"] for _ in range(2)}
    assert names == {"ethusdt@markPrice@1s", "btcusdt@markPrice@1s"}
    with pytest.raises(InvalidStatus), connect(_ws_url(client.url, "/ws/nosuchusdt@markPrice@1s")):
        pass


def test_a_connection_is_cut_after_its_lifetime() -> None:
    config = SimConfig(admin_token=ADMIN_TOKEN, price_sigma=0.0, stream_max_connection_s=0.5)
    with SimServer(config) as server, httpx.Client(timeout=5.0) as http:
        key = _key_call(make_client(server, http), "POST").json()["listenKey"]
        with connect(_ws_url(server.url, f"/ws/{key}")) as ws, pytest.raises(ConnectionClosed) as cut:
            ws.recv(timeout=3.0)
    assert cut.value.rcvd is not None and cut.value.rcvd.code == 1001


# --- stream faults ---------------------------------------------------------------------------------------------


def _fault(client: BinanceClient, **rule: Any) -> Any:
    return client.admin("POST", "/_sim/stream-faults", rule)


def _closes(client: BinanceClient, n: int) -> None:
    for _ in range(n):
        placed = client.order(symbol=SYMBOL, side="SELL", quantity="0.010", reduceOnly="true")
        assert placed.status_code == 200, placed.text


def _stream(client: BinanceClient) -> Any:
    """A connection to the whole stream (every event: the faults act on the stream, before any filter)."""
    assert client.admin("POST", "/_sim/position", {"symbol": SYMBOL, "amt": "0.100"}).status_code == 200
    key = _key_call(client, "POST").json()["listenKey"]
    return connect(_ws_url(client.url, f"/ws/{key}"))


def _sig(event: dict[str, Any]) -> str:
    if event["e"] == "ORDER_TRADE_UPDATE":
        return f"{event['o']['x']}:{event['o']['i']}"
    return f"ACCOUNT:{event['a']['P'][0]['pa']}"


def _recorded(client: BinanceClient, after: int) -> list[str]:
    return [_sig(e) for e in _events(client, after)]


def _last(client: BinanceClient) -> int:
    return int(client.admin("GET", "/_sim/user-events").json()["last"])


def test_a_dropped_connection_is_closed_by_the_exchange(client: BinanceClient) -> None:
    with _stream(client) as ws:
        assert _fault(client, kind="drop").status_code == 200
        with pytest.raises(ConnectionClosed) as dropped:
            ws.recv(timeout=3.0)
    assert dropped.value.rcvd is not None and dropped.value.rcvd.code == 1011


def test_a_cut_connection_is_closed_as_at_its_24_hours(client: BinanceClient) -> None:
    with _stream(client) as ws:
        assert _fault(client, kind="cut").status_code == 200
        with pytest.raises(ConnectionClosed) as cut:
            ws.recv(timeout=3.0)
    assert cut.value.rcvd is not None and (cut.value.rcvd.code, cut.value.rcvd.reason) == (
        1001,
        "connection lifetime reached",
    )


def test_an_expired_key_ends_every_connection_with_listen_key_expired_and_is_unknown_to_put(
    client: BinanceClient,
) -> None:
    """The ``expire`` fault: the key's lifetime ends now, as when nobody kept it alive for 60 minutes."""
    with _stream(client) as ws:
        key = _key_call(client, "POST").json()["listenKey"]
        assert _fault(client, kind="expire").status_code == 200
        event = _next(ws, timeout_s=3.0)
        assert (event["e"], event["listenKey"]) == ("listenKeyExpired", key)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=3.0)
    assert _key_call(client, "PUT").json()["code"] == -1125
    fresh = _key_call(client, "POST").json()["listenKey"]
    assert fresh != key and _key_call(client, "PUT").status_code == 200


def test_duplicated_and_reordered_events(client: BinanceClient) -> None:
    """Each close is NEW, TRADE, ACCOUNT_UPDATE: the first event duplicated, then the first pair swapped."""
    with _stream(client) as ws:
        before = _last(client)
        assert _fault(client, kind="duplicate", count=1).status_code == 200
        _closes(client, 1)
        new, trade, account = _recorded(client, before)
        assert [_sig(_next(ws)) for _ in range(4)] == [new, new, trade, account]
        before = _last(client)
        assert _fault(client, kind="reorder", count=1).status_code == 200
        _closes(client, 1)
        new, trade, account = _recorded(client, before)
        assert [_sig(_next(ws)) for _ in range(3)] == [trade, new, account]
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.3)  # nothing more: the faults are spent


def test_a_silence_loses_events_without_closing_and_a_delay_lets_later_ones_overtake(client: BinanceClient) -> None:
    with _stream(client) as ws:
        armed = time.monotonic()
        assert _fault(client, kind="silence", ms=1500).status_code == 200
        _closes(client, 1)
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.3)  # lost, and the connection is still open
        time.sleep(max(0.0, armed + 1.6 - time.monotonic()))
        before = _last(client)
        _closes(client, 1)
        assert [_sig(_next(ws)) for _ in range(3)] == _recorded(client, before)  # after the silence: all of them
        before = _last(client)
        assert _fault(client, kind="delay", count=1, ms=700).status_code == 200
        _closes(client, 1)
        new, trade, account = _recorded(client, before)
        assert [_sig(_next(ws, timeout_s=3.0)) for _ in range(3)] == [trade, account, new]  # the late one last


def test_a_fault_that_makes_no_sense_is_refused_by_name(client: BinanceClient) -> None:
    refused = _fault(client, kind="meteor")
    assert refused.status_code == 400 and "kind must be one of" in refused.json()["error"]
    assert _fault(client, kind="delay").status_code == 400  # no ms
    assert _fault(client, kind="duplicate", count=2).status_code == 200
    assert client.admin("GET", "/_sim/stream-faults").json() == {"faults": [{"kind": "duplicate", "count": 2, "ms": 0}]}
    assert client.admin("DELETE", "/_sim/stream-faults").status_code == 200
    assert client.admin("GET", "/_sim/stream-faults").json() == {"faults": []}


def test_ccxt_pro_watches_an_order_fill_on_the_simulators_stream(sim: SimServer, client: BinanceClient) -> None:
    """ccxt's pro client (the one most Binance bots use) gets its listen key over REST and the order's fill
    from the stream, as it would from Binance."""
    assert client.admin("POST", "/_sim/position", {"symbol": SYMBOL, "amt": "0.100"}).status_code == 200

    async def watch() -> list[Any]:
        exchange = ccxtpro.binanceusdm(
            {
                "apiKey": sim.config.api_key,
                "secret": sim.config.api_secret,
                "options": {"fetchCurrencies": False, "defaultType": "future", "fetchMarkets": {"types": ["linear"]}},
            }
        )
        for section, version in CCXT_SECTIONS.items():
            exchange.urls["api"][section] = f"{sim.url}/fapi/{version}"
        exchange.urls["api"]["ws"]["linear"] = _ws_url(sim.url, "/ws")
        try:
            await exchange.load_markets()
            streams = sim.app.state.sim.streams
            before = streams.accepted
            watching = asyncio.ensure_future(exchange.watch_orders("BTC/USDT:USDT"))
            deadline = time.monotonic() + 10
            while streams.accepted == before:  # ccxt asked for a key and connected with it
                assert time.monotonic() < deadline, "ccxt never connected to the user-data stream"
                await asyncio.sleep(0.05)
            placed = await asyncio.to_thread(
                client.order, symbol=SYMBOL, side="SELL", quantity="0.010", reduceOnly="true", newClientOrderId="qt-px"
            )
            assert placed.status_code == 200, placed.text
            await asyncio.wait_for(watching, 10)  # the first update (NEW) reached ccxt
            deadline = time.monotonic() + 20
            # ccxt resolves a watch only if one is pending when an update comes (its Client.resolve), so the fill
            # may have come between two watches: its order cache is what it knows, and a watch waits for more
            while not (orders := [dict(o) for o in exchange.orders or []]) or orders[-1]["status"] != "closed":
                assert time.monotonic() < deadline, f"ccxt never saw the fill: {orders}"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(exchange.watch_orders("BTC/USDT:USDT"), 0.5)
            return orders
        finally:
            await exchange.close()

    orders = asyncio.run(watch())
    assert [(o["clientOrderId"], o["status"], o["filled"]) for o in orders][-1] == ("qt-px", "closed", 0.01)
    assert {o["clientOrderId"] for o in orders} == {"qt-px"}
