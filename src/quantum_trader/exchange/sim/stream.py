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
from dataclasses import dataclass
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
INTERNAL_ERROR: Final = 1011

_encode = msgspec.json.encode


FAULT_KINDS: Final = ("drop", "silence", "delay", "duplicate", "reorder")


@dataclass
class StreamFault:
    """A fault of the user-data stream, for every open connection: ``drop`` closes them all now (1011);
    ``silence`` loses every event for ``ms`` while the connections stay open (the server still answers pings: a
    client finds out by the exchange's REST state, not by the connection); ``delay`` delivers each of the next
    ``count`` events ``ms`` late (later events overtake it); ``duplicate`` delivers each of the next ``count``
    twice; ``reorder`` swaps each of the next ``count`` pairs."""

    kind: str
    count: int = 1
    ms: int = 0
    ends_at: float = 0.0  # silence: the loop time it ends

    def describe(self) -> Json:
        return {"kind": self.kind, "count": self.count, "ms": self.ms}


class UserStreams:
    """Every open user-data connection of one simulator; the engine's events fan out to them, through the
    stream faults a test armed."""

    def __init__(self, engine: Engine, max_connection_s: float = 86400.0) -> None:
        self.engine = engine
        self.max_connection_s = max_connection_s  # Binance cuts a connection after 24 hours
        self._queues: set[asyncio.Queue[Json]] = set()
        self._sockets: set[WebSocket] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.faults: list[StreamFault] = []
        self._held: Json | None = None  # reorder: the first of a pair, until the second comes
        self._dropping: set[asyncio.Task[None]] = set()
        self.accepted = 0  # user-data connections accepted so far
        engine.add_user_event_listener(self._publish)

    @property
    def connections(self) -> int:
        """User-data connections open now."""
        return len(self._sockets)

    def _publish(self, number: int, event: Json) -> None:
        """Called by the engine, under its lock, in whatever thread made the event."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver, event)

    def _put(self, event: Json) -> None:
        for queue in list(self._queues):
            queue.put_nowait(event)

    def _deliver(self, event: Json) -> None:
        """On the loop: one event to every connection, through the first armed fault."""
        fault = self.faults[0] if self.faults else None
        if fault is None:
            self._put(event)
            return
        loop = asyncio.get_running_loop()
        if fault.kind == "silence":
            if loop.time() < fault.ends_at:
                return  # lost, as on a connection that went quiet
            self.faults.pop(0)
            self._deliver(event)
            return
        if fault.kind == "delay":
            loop.call_later(fault.ms / 1000, self._put, event)
        elif fault.kind == "duplicate":
            self._put(event)
            self._put(event)
        elif fault.kind == "reorder":
            if self._held is None:
                self._held = event
                return
            self._put(event)
            self._put(self._held)
            self._held = None
        fault.count -= 1
        if fault.count <= 0:
            self.faults.pop(0)

    def arm(self, kind: str, count: int = 1, ms: int = 0) -> StreamFault:
        """Arm a fault (``drop`` acts at once), from the server's loop. ValueError for a kind or value that makes
        no sense."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}")
        if count < 1 or ms < 0 or (kind in ("silence", "delay") and ms == 0):
            raise ValueError("count must be at least 1, and silence and delay need ms > 0")
        fault = StreamFault(kind, count, ms)
        loop = self._loop = asyncio.get_running_loop()  # the admin API's request, on the server's loop
        if kind == "drop":
            for websocket in list(self._sockets):
                task = loop.create_task(_drop(websocket))
                self._dropping.add(task)  # kept until done (a task nobody holds may be collected)
                task.add_done_callback(self._dropping.discard)
            return fault
        if kind == "silence":
            fault.ends_at = loop.time() + ms / 1000
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()
        self._held = None

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
        self._sockets.add(websocket)
        await websocket.accept()
        self.accepted += 1
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
            self._sockets.discard(websocket)
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


async def _drop(websocket: WebSocket) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close(code=INTERNAL_ERROR, reason="dropped (a fault of the simulator)")


async def _until_closed(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends until it goes away."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
