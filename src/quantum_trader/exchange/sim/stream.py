"""The simulator's WebSockets, as Binance serves them for USD-M futures. The mark price streams
(``/ws/<symbol>@markPrice@1s``, ``/stream?streams=…``), and the user-data stream: ``/ws/<listenKey>`` and
``/private/ws?listenKey=<key>&events=ORDER_TRADE_UPDATE/ACCOUNT_UPDATE``. A connection with the account's live
key gets every event the engine records from then on (exchange/sim/userdata.py), in order, as JSON text frames,
filtered by ``events`` when given. When its key stops being live (it expired, was closed, or another was made),
the connection gets ``listenKeyExpired`` and is closed, and nothing more arrives: a client must POST a key and
connect again, then resync from REST. A connection with any other key is refused (closed, 1008); one open for
``max_connection_s`` (24 hours) is cut (1001). Pings are answered by the WebSocket server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Final

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from quantum_trader.exchange.sim.engine import Engine
from quantum_trader.exchange.sim.params import Json
from quantum_trader.exchange.sim.userdata import listen_key_expired, mark_price_update

KEY_CHECK_S: Final = 0.2  # how soon a connection learns its key is gone
MARK_PRICE: Final = re.compile(r"([a-z0-9]+)@markPrice(@1s)?")
POLICY_VIOLATION: Final = 1008
GOING_AWAY: Final = 1001

_encode = msgspec.json.encode


class UserStreams:
    """Every open user-data connection of one simulator; the engine's events fan out to them."""

    def __init__(self, engine: Engine, max_connection_s: float = 86400.0) -> None:
        self.engine = engine
        self.max_connection_s = max_connection_s  # Binance cuts a connection after 24 hours
        self._queues: set[asyncio.Queue[Json]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        engine.add_user_event_listener(self._publish)

    def _publish(self, number: int, event: Json) -> None:
        """Called by the engine, under its lock, in whatever thread made the event."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for queue in list(self._queues):
            loop.call_soon_threadsafe(queue.put_nowait, event)

    def _live(self) -> str | None:
        with self.engine.lock:
            return self.engine.listen_keys.live(self.engine.now_ms())

    async def serve(self, websocket: WebSocket) -> None:
        key = websocket.path_params.get("listen_key") or websocket.query_params.get("listenKey") or ""
        if "@" in key:  # /ws/<symbol>@markPrice@1s: a market stream, not a listen key
            await self.serve_market(websocket, [key], combined=False)
            return
        chosen = websocket.query_params.get("events")
        wanted = frozenset(name for name in re.split(r"[/,]", chosen) if name) if chosen else None
        if not key or key != self._live():
            await websocket.close(code=POLICY_VIOLATION, reason="invalid listenKey")
            return
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Json] = asyncio.Queue()
        self._queues.add(queue)
        await websocket.accept()
        closed = asyncio.ensure_future(_until_closed(websocket))
        cut_at = asyncio.get_running_loop().time() + self.max_connection_s
        try:
            while not closed.done():
                if asyncio.get_running_loop().time() >= cut_at:
                    await websocket.close(code=GOING_AWAY, reason="connection lifetime reached")
                    return
                getting = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getting, closed}, timeout=KEY_CHECK_S, return_when="FIRST_COMPLETED")
                if getting not in done:
                    getting.cancel()
                if key != self._live():
                    await websocket.send_text(_encode(listen_key_expired(key, self.engine.now_ms())).decode())
                    await websocket.close()
                    return
                if getting in done:
                    event = getting.result()
                    if wanted is None or event.get("e") in wanted:
                        await websocket.send_text(_encode(event).decode())
        except (WebSocketDisconnect, RuntimeError):  # the client went away mid-send
            return
        finally:
            self._queues.discard(queue)
            closed.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await closed

    async def serve_combined(self, websocket: WebSocket) -> None:
        """``/stream?streams=a/b``: each message ``{"stream": name, "data": event}``."""
        names = [name for name in websocket.query_params.get("streams", "").split("/") if name]
        await self.serve_market(websocket, names, combined=True)

    async def serve_market(self, websocket: WebSocket, names: list[str], *, combined: bool) -> None:
        """Mark price streams: ``<symbol>@markPrice`` every 3 s, ``<symbol>@markPrice@1s`` every second; any
        other stream name (or an unknown symbol) is refused."""
        streams: list[tuple[str, str, float]] = []
        for name in names:
            match = MARK_PRICE.fullmatch(name)
            if match is None or match.group(1).upper() not in self.engine.specs:
                await websocket.close(code=POLICY_VIOLATION, reason=f"unknown stream {name[:64]}")
                return
            streams.append((name, match.group(1).upper(), 1.0 if match.group(2) else 3.0))
        if not streams:
            await websocket.close(code=POLICY_VIOLATION, reason="no stream")
            return
        await websocket.accept()
        closed = asyncio.ensure_future(_until_closed(websocket))
        loop = asyncio.get_running_loop()
        due = {name: loop.time() for name, _, _ in streams}
        try:
            while not closed.done():
                now = loop.time()
                for name, symbol, every_s in streams:
                    if due[name] <= now:
                        due[name] = now + every_s
                        mark = self.engine.spec(symbol).price(self.engine.mark_price(symbol))
                        event = mark_price_update(symbol, mark, self.engine.now_ms())
                        message = {"stream": name, "data": event} if combined else event
                        await websocket.send_text(_encode(message).decode())
                await asyncio.wait({closed}, timeout=max(0.0, min(due.values()) - loop.time()))
        except (WebSocketDisconnect, RuntimeError):
            return
        finally:
            closed.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await closed


async def _until_closed(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends until it goes away."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
