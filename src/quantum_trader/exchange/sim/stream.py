"""The simulator's WebSockets, as Binance serves them for USD-M futures. The mark price streams
(``/ws/<symbol>@markPrice@1s``, ``/stream?streams=…``), and the user-data stream: ``/ws/<listenKey>`` and
``/private/ws?listenKey=<key>&events=ORDER_TRADE_UPDATE/ACCOUNT_UPDATE``. A connection with the account's live
key gets every event the engine records from then on (exchange/sim/userdata.py), in order, as JSON text frames,
filtered by ``events`` when given. When its key stops being live (it expired, was closed, or another was made),
the connection gets ``listenKeyExpired`` and is closed, and nothing more arrives: a client must POST a key and
connect again, then resync from REST. A connection with any other key is refused (closed, 1008); one open for
``max_connection_s`` (24 hours) is cut (1001). Pings are answered by the WebSocket server itself. Any
connection, including the bare ``/ws`` and ``/stream`` (and ``/private/stream`` …), takes Binance's live
``SUBSCRIBE`` / ``UNSUBSCRIBE`` / ``LIST_SUBSCRIPTIONS`` requests, as Binance's own clients send them.
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


# the combined form (``{"stream", "data"}``): the classic path and the newer split ones Binance's SDK uses
COMBINED_PATHS: Final = ("/stream", "/private/stream", "/public/stream", "/market/stream")
FAULT_KINDS: Final = ("drop", "cut", "expire", "silence", "delay", "duplicate", "reorder", "garbage")
# what ``garbage`` sends: bytes that are not UTF-8, a truncated JSON text, an event that breaks its schema
GARBAGE: Final = (
    b"\xff\xfe\x80 not utf-8",
    '{"e": "ORDER_TRADE_UPDATE", "E": ',
    '{"e": "ACCOUNT_UPDATE", "E": "soon"}',
)


@dataclass
class StreamFault:
    """A fault of the user-data stream, for every open connection: ``drop`` closes them all now (1011); ``cut``
    closes them as Binance does at a connection's 24 hours (1001); ``expire`` ends the account's listen key
    now, as if nobody had kept it alive (every connection gets ``listenKeyExpired`` and is closed, a PUT
    answers -1125, a POST makes a new key); ``silence`` loses every event for ``ms`` while the connections stay
    open (the server still answers pings: a client finds out by the exchange's REST state, not by the
    connection); ``delay`` delivers each of the next ``count`` events ``ms`` late (later events overtake it);
    ``duplicate`` delivers each of the next ``count`` twice; ``reorder`` swaps each of the next ``count`` pairs;
    ``garbage`` sends ``count`` rounds of frames that are no event (bytes that are not UTF-8, truncated JSON, a
    schema broken) to every connection now. While a silence lasts, the mark price ticks of a connection with a
    listen key are lost too: the whole connection is quiet, as a half-open one is."""

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
        """Arm a fault (``drop``, ``cut``, ``expire`` and ``garbage`` act at once), from the server's loop.
        ValueError for a kind or value that makes no sense."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}")
        if count < 1 or ms < 0 or (kind in ("silence", "delay") and ms == 0):
            raise ValueError("count must be at least 1, and silence and delay need ms > 0")
        fault = StreamFault(kind, count, ms)
        loop = self._loop = asyncio.get_running_loop()  # the admin API's request, on the server's loop
        if kind == "expire":
            with self.engine.lock:
                self.engine.listen_keys.expire()  # each connection finds out within KEY_CHECK_S
            return fault
        if kind in ("drop", "cut", "garbage"):
            for websocket in list(self._sockets):
                work = _garbage(websocket, count) if kind == "garbage" else _drop(websocket, cut=kind == "cut")
                task = loop.create_task(work)
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
        """``/ws/<listenKey>``, ``/ws/<symbol>@markPrice@1s``, ``/private/ws?listenKey=&events=``, and the bare
        ``/ws`` a client subscribes on with ``SUBSCRIBE`` (Binance's futures connector does)."""
        key = websocket.path_params.get("listen_key") or websocket.query_params.get("listenKey") or ""
        if not key and websocket.url.path.startswith("/private/"):
            await websocket.close(code=POLICY_VIOLATION, reason="listenKey required")
            return
        chosen = websocket.query_params.get("events")
        wanted = frozenset(name for name in re.split(r"[/,]", chosen) if name) if chosen else None
        await self._serve(websocket, [key] if key else [], combined=False, wanted=wanted)

    async def serve_combined(self, websocket: WebSocket) -> None:
        """``/stream?streams=a/b`` and the bare ``/stream``, ``/private/stream``, ``/public/stream``,
        ``/market/stream`` (Binance's newer SDK subscribes there): each message ``{"stream": name, "data": event}``."""
        names = [name for name in websocket.query_params.get("streams", "").split("/") if name]
        await self._serve(websocket, names, combined=True, wanted=None)

    async def _serve(
        self, websocket: WebSocket, names: list[str], *, combined: bool, wanted: frozenset[str] | None
    ) -> None:
        """One connection: the streams named in its URL, then whatever it subscribes to or leaves with
        ``SUBSCRIBE`` / ``UNSUBSCRIBE`` (``LIST_SUBSCRIPTIONS`` lists them). A user-data stream (a listen key)
        gets the engine's events from the moment it is subscribed; a mark price stream ticks every 1 or 3 s.
        Names in the URL that are neither (or a key that is not live) refuse the connection (1008); in a
        SUBSCRIBE they get an error reply and the connection goes on."""
        connection = _Connection(websocket, combined, wanted)
        for name in names:
            problem = self._subscribe(connection, name)
            if problem:
                await websocket.close(code=POLICY_VIOLATION, reason=problem[:120])
                return
        self._loop = asyncio.get_running_loop()
        self._sockets.add(websocket)
        await websocket.accept()
        self.accepted += 1
        inbox: asyncio.Queue[str | None] = asyncio.Queue()
        reading = asyncio.ensure_future(_read_into(websocket, inbox))
        loop = asyncio.get_running_loop()
        cut_at = loop.time() + self.max_connection_s
        try:
            while True:
                now = loop.time()
                if now >= cut_at:
                    await websocket.close(code=GOING_AWAY, reason="connection lifetime reached")
                    return
                await self._tick_markets(connection, now)
                waiting: set[asyncio.Future[object]] = {asyncio.ensure_future(inbox.get())}
                if connection.keys:
                    waiting.add(asyncio.ensure_future(connection.queue.get()))
                timeout = min([KEY_CHECK_S, *(due - now for due in connection.due.values())])
                try:
                    done, _ = await asyncio.wait(waiting, timeout=max(0.0, timeout), return_when="FIRST_COMPLETED")
                finally:
                    for future in waiting:  # the gets not done (also when the server stops): none left pending
                        if not future.done():
                            future.cancel()
                for future in done:
                    item = future.result()
                    if item is None:  # the client went away
                        return
                    if isinstance(item, str):
                        await self._answer(connection, item)
                    elif isinstance(item, dict):
                        await connection.send_event(item)
                expired = next((key for key in connection.keys if key != self._live()), None)
                if expired is not None:
                    event = listen_key_expired(expired, self.engine.now_ms())
                    await connection.send(event, expired)
                    await websocket.close()
                    return
        except (WebSocketDisconnect, RuntimeError):  # the client went away mid-send
            return
        finally:
            self._queues.discard(connection.queue)
            self._sockets.discard(websocket)
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await reading

    def _subscribe(self, connection: _Connection, name: str) -> str | None:
        """Add one stream to ``connection``; what is wrong with it, or None."""
        match = MARK_PRICE.fullmatch(name)
        if match is not None:
            if match.group(1).upper() not in self.engine.specs:
                return f"unknown symbol in stream {name[:64]}"
            connection.markets[name] = (match.group(1).upper(), 1.0 if match.group(2) else 3.0)
            connection.due.setdefault(name, 0.0)
            return None
        if "@" in name or not name:
            return f"unknown stream {name[:64]}"
        if name != self._live():
            return "invalid listenKey"
        if not connection.keys:
            self._queues.add(connection.queue)
        connection.keys.add(name)
        return None

    def _unsubscribe(self, connection: _Connection, name: str) -> None:
        connection.markets.pop(name, None)
        connection.due.pop(name, None)
        connection.keys.discard(name)
        if not connection.keys:
            self._queues.discard(connection.queue)

    async def _answer(self, connection: _Connection, text: str) -> None:
        """A request of Binance's live-subscription protocol: ``{"method": …, "params": […], "id": …}``; the
        reply carries the same id, ``{"result": null}`` or an error ``{"code", "msg"}`` (Binance's codes: 2 an
        invalid request, 3 invalid JSON)."""
        try:
            request = msgspec.json.decode(text)
        except msgspec.DecodeError:
            await connection.reply({"code": 3, "msg": "Invalid JSON"}, None)
            return
        if not isinstance(request, dict):
            await connection.reply({"code": 2, "msg": "Invalid request: not an object"}, None)
            return
        ident = request.get("id")
        method, params = request.get("method"), request.get("params", [])
        if not isinstance(params, list) or not all(isinstance(name, str) for name in params):
            await connection.reply({"code": 2, "msg": "Invalid request: params must be a list of names"}, ident)
            return
        if method == "LIST_SUBSCRIPTIONS":
            await connection.reply({"result": sorted([*connection.keys, *connection.markets])}, ident)
        elif method == "SUBSCRIBE":
            problems = [problem for name in params if (problem := self._subscribe(connection, name))]
            reply: Json = {"code": 2, "msg": f"Invalid request: {problems[0]}"} if problems else {"result": None}
            await connection.reply(reply, ident)
        elif method == "UNSUBSCRIBE":
            for name in params:
                self._unsubscribe(connection, name)
            await connection.reply({"result": None}, ident)
        else:
            await connection.reply({"code": 2, "msg": f"Invalid request: unknown method {str(method)[:32]}"}, ident)

    def _silent(self, now: float) -> bool:
        fault = self.faults[0] if self.faults else None
        return fault is not None and fault.kind == "silence" and now < fault.ends_at

    async def _tick_markets(self, connection: _Connection, now: float) -> None:
        """Mark price streams: ``<symbol>@markPrice`` every 3 s, ``<symbol>@markPrice@1s`` every second."""
        for name, (symbol, every_s) in list(connection.markets.items()):
            if connection.due[name] <= now:
                connection.due[name] = now + every_s
                if connection.keys and self._silent(now):
                    continue  # a silent user-data connection is silent through and through
                mark = self.engine.spec(symbol).price(self.engine.mark_price(symbol))
                await connection.send(mark_price_update(symbol, mark, self.engine.now_ms()), name)


class _Connection:
    """What one client is subscribed to, and how its messages are framed."""

    def __init__(self, websocket: WebSocket, combined: bool, wanted: frozenset[str] | None) -> None:
        self.websocket = websocket
        self.combined = combined
        self.wanted = wanted  # /private/ws?events=: the event types it asked for (None: all)
        self.keys: set[str] = set()
        self.markets: dict[str, tuple[str, float]] = {}  # stream name -> (symbol, seconds between ticks)
        self.due: dict[str, float] = {}  # stream name -> loop time of its next tick
        self.queue: asyncio.Queue[Json] = asyncio.Queue()

    async def send(self, event: Json, stream: str) -> None:
        message = {"stream": stream, "data": event} if self.combined else event
        await self.websocket.send_text(_encode(message).decode())

    async def send_event(self, event: Json) -> None:
        if self.keys and (self.wanted is None or event.get("e") in self.wanted):
            await self.send(event, next(iter(self.keys)))

    async def reply(self, body: Json, ident: object) -> None:
        await self.websocket.send_text(_encode({**body, "id": ident}).decode())


async def _drop(websocket: WebSocket, *, cut: bool) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        if cut:
            await websocket.close(code=GOING_AWAY, reason="connection lifetime reached")
        else:
            await websocket.close(code=INTERNAL_ERROR, reason="dropped (a fault of the simulator)")


async def _garbage(websocket: WebSocket, rounds: int) -> None:
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        for _ in range(rounds):
            for frame in GARBAGE:
                if isinstance(frame, bytes):
                    await websocket.send_bytes(frame)
                else:
                    await websocket.send_text(frame)


async def _read_into(websocket: WebSocket, inbox: asyncio.Queue[str | None]) -> None:
    """Put each text the client sends into ``inbox``, then None when it goes away."""
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None and message.get("bytes") is not None:
                text = message["bytes"].decode("utf-8", "replace")
            if text is not None:
                inbox.put_nowait(text)
    finally:
        inbox.put_nowait(None)
