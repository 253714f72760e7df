"""The user-data stream's WebSocket, as Binance serves it for USD-M futures: ``/ws/<listenKey>`` and
``/private/ws?listenKey=<key>&events=ORDER_TRADE_UPDATE/ACCOUNT_UPDATE``. A connection with the account's live
key gets every event the engine records from then on (exchange/sim/userdata.py), in order, as JSON text frames,
filtered by ``events`` when given. When its key stops being live (it expired, was closed, or another was made),
the connection gets ``listenKeyExpired`` and is closed, and nothing more arrives: a client must POST a key and
connect again, then resync from REST. A connection with any other key is refused (closed, 1008). Pings are
answered by the WebSocket server itself.
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
from quantum_trader.exchange.sim.userdata import listen_key_expired

KEY_CHECK_S: Final = 0.2  # how soon a connection learns its key is gone
POLICY_VIOLATION: Final = 1008

_encode = msgspec.json.encode


class UserStreams:
    """Every open user-data connection of one simulator; the engine's events fan out to them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
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
        try:
            while not closed.done():
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


async def _until_closed(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends until it goes away."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
