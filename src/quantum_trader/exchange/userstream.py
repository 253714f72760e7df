"""The one exchange-stream component: Binance's user-data stream (and the mark prices) for P3.3 and Apply.

A session: POST the listen key (the account's active one, shared by every process: none ever DELETEs it),
connect to ``<base>/stream?streams=<key>/<symbol>@markPrice@1s/…``, re-read the REST state through the
owner's ``resync`` *before* any event is trusted (events that arrive meanwhile wait, then pass the same order
rule), and hand each event to the owner at most once and never older than what it has
(domain/stream_sequence.py). The session ends, and another begins after a backoff, on:

- ``listenKeyExpired`` on the stream, or a PUT answered ``-1125`` (the key is gone: POST again);
- silence: no frame for ``silence_s`` while mark prices tick every second (a half-open connection);
- no pong to a ping within ``ping_s`` (the WebSocket library's own keepalive);
- the exchange closing it (the 24-hour cut, 1001; a drop) or any network failure.

Nothing is decided from the stream while a session is not resynced: ``healthy`` is False, and the owner keeps
polling as before. Built on the ``websockets`` client rather than ccxt's pro client: ccxt 4.5 ignores
``listenKeyExpired`` (a dead key is then never replaced), hides reconnects and resyncs from the caller, and
its import alone costs ~94 MB of RSS; this is a few hundred lines we can test against every fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from quantum_trader import logs
from quantum_trader.domain.stream_sequence import Sequence
from quantum_trader.exchange.base import ExchangeError
from quantum_trader.exchange.stream_events import (
    MAX_FRAME,
    AccountUpdate,
    BadStreamEvent,
    ListenKeyExpired,
    MarkPriceUpdate,
    OrderTradeUpdate,
    StreamEvent,
    decode_event,
)
from quantum_trader.settings import StreamSettings

log = logs.get("userstream")  # the project's logger: a log call that fails never ends the stream

LISTEN_KEY_UNKNOWN: Final = -1125
OPEN_TIMEOUT_S: Final = 10.0
KEEPALIVE_RETRY_S: Final = 60.0  # a failed PUT (other than -1125) is tried again this soon


@runtime_checkable
class ListenKeys(Protocol):
    """The REST side of the stream (exchange/binance.py BinanceFutures)."""

    async def create_listen_key(self) -> str: ...

    async def keep_alive_listen_key(self, key: str) -> None: ...


class StreamOwner(Protocol):
    """What P3.3 or Apply does with the stream."""

    async def resync(self) -> Mapping[str, int]:
        """Re-read the REST state after a (re)connect; return each position's ``updateTime`` (ms) read."""
        ...

    async def on_event(self, event: StreamEvent, received_at: float) -> None:
        """An event that is new (an ``ACCOUNT_UPDATE`` carries only the positions that are), with the wall
        time its frame was received (not handled: events can wait in the queue)."""
        ...

    async def on_bad_frame(self, reason: str) -> None:
        """A frame that is not a valid event (audited by the owner; the stream goes on)."""
        ...


class SessionEnded(Exception):
    """Why a session ended on our side (the message is the reason shown in status and logs)."""


@dataclass
class StreamHealth:
    """What status, metrics and the dashboard show; times are the wall clock (s), counts since start."""

    connected: bool = False
    resynced: bool = False  # this session's REST state was read: events may be trusted
    connected_at: float = 0.0
    last_frame_at: float = 0.0
    last_event_at: float = 0.0
    sessions: int = 0
    reconnects: int = 0
    renewals: int = 0
    resyncs: int = 0
    key_expiries: int = 0
    bad_frames: int = 0
    events: int = 0
    stale_events: int = 0  # duplicates and late ones, passed over
    last_error: str = ""

    @property
    def healthy(self) -> bool:
        return self.connected and self.resynced


class UserDataStream:
    def __init__(
        self,
        keys: ListenKeys,
        base_url: str,
        owner: StreamOwner,
        settings: StreamSettings,
        symbols: list[str],
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._base = base_url.rstrip("/")
        self._owner = owner
        self._settings = settings
        self._symbols = sorted(symbols)
        self._now = now
        self.health = StreamHealth()
        self.sequence = Sequence()
        self._ws: ClientConnection | None = None
        self._closing: set[asyncio.Future[None]] = set()  # closes asked for by restart(), held until done

    def url(self, key: str) -> str:
        streams = [key, *(f"{symbol.lower()}@markPrice@1s" for symbol in self._symbols)]
        return f"{self._base}/stream?streams={'/'.join(streams)}"

    async def run(self) -> None:
        """Sessions, one after another, until cancelled. Never raises but CancelledError."""
        backoff = self._settings.backoff_min_s
        while True:
            started = time.monotonic()
            try:
                await self._session()
                reason = "closed"
            except (SessionEnded, ExchangeError, ConnectionClosed, InvalidHandshake, InvalidURI, OSError) as exc:
                reason = _describe(exc)
            except Exception as exc:  # the owner's own failure (a store error in resync, ...): start over
                reason = f"{type(exc).__name__}: {exc}"
                log.error("user-data stream session failed", error=reason)
            self.health.connected = self.health.resynced = False
            self.health.last_error = reason
            self.health.reconnects += 1
            log.warning("user-data stream ended; reconnecting", reason=reason, in_s=round(backoff, 2))
            if time.monotonic() - started > 60:  # a session that lasted is not a failure streak
                backoff = self._settings.backoff_min_s
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, self._settings.backoff_max_s)

    async def _session(self) -> None:
        key = await self._keys.create_listen_key()
        async with connect(
            self.url(key),
            open_timeout=OPEN_TIMEOUT_S,
            ping_interval=self._settings.ping_s,
            ping_timeout=self._settings.ping_s,
            max_size=MAX_FRAME,
            close_timeout=2,
        ) as ws:
            self._ws = ws
            health = self.health
            health.connected, health.connected_at = True, self._now()
            health.last_frame_at = health.connected_at
            health.sessions += 1
            log.info("user-data stream connected", session=health.sessions, symbols=len(self._symbols))
            frames: asyncio.Queue[tuple[float, str | bytes]] = asyncio.Queue()
            reader = asyncio.ensure_future(self._read(ws, frames))
            keeper = asyncio.ensure_future(self._keep_alive(key))
            try:
                # the REST state first; what arrived meanwhile is in the queue and passes the same rule after
                versions = await self._owner.resync()
                for symbol, update_time in versions.items():
                    self.sequence.resynced(symbol, update_time)
                health.resyncs += 1
                health.resynced = True
                await self._consume(frames, reader, keeper)
            finally:
                self._ws = None
                for task in (reader, keeper):
                    task.cancel()
                for task in (reader, keeper):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _read(self, ws: ClientConnection, frames: asyncio.Queue[tuple[float, str | bytes]]) -> None:
        async for frame in ws:
            self.health.last_frame_at = received = self._now()
            frames.put_nowait((received, frame))

    async def _keep_alive(self, key: str) -> None:
        """PUT the key every ``keepalive_s``; -1125 ends the session (the key is gone)."""
        wait = self._settings.keepalive_s
        while True:
            await asyncio.sleep(wait)
            try:
                await self._keys.keep_alive_listen_key(key)
            except ExchangeError as exc:
                if exc.code == LISTEN_KEY_UNKNOWN:
                    self.health.key_expiries += 1
                    raise SessionEnded("the exchange no longer knows the listen key (-1125)") from None
                log.warning("listen key keep-alive failed; trying again", error=exc.message)
                wait = min(KEEPALIVE_RETRY_S, self._settings.keepalive_s)
                continue
            self.health.renewals += 1
            wait = self._settings.keepalive_s

    async def _consume(
        self,
        frames: asyncio.Queue[tuple[float, str | bytes]],
        reader: asyncio.Future[None],
        keeper: asyncio.Future[None],
    ) -> None:
        silence = self._settings.silence_s if self._symbols else None  # without mark prices a quiet key is normal
        while True:
            getting = asyncio.ensure_future(frames.get())
            waiting: set[asyncio.Future[Any]] = {getting, reader, keeper}
            try:
                done, _ = await asyncio.wait(waiting, timeout=silence, return_when="FIRST_COMPLETED")
            finally:
                if not getting.done():  # cancelled while waiting: no pending get left behind
                    getting.cancel()
            if getting not in done:
                getting.cancel()
                for task in (reader, keeper):
                    if task in done:
                        task.result()  # raises why it ended (ConnectionClosed, SessionEnded)
                        ws = self._ws
                        code = f" ({ws.close_code} {ws.close_reason})" if ws is not None and ws.close_code else ""
                        raise SessionEnded(f"closed by the exchange{code}")
                raise SessionEnded(f"no frame for {silence:.0f} s (a silent connection)")
            await self._handle(*getting.result())

    async def _handle(self, received_at: float, frame: str | bytes) -> None:
        try:
            event = decode_event(frame)
        except BadStreamEvent as exc:
            self.health.bad_frames += 1
            log.error("unreadable user-data frame", error=str(exc))
            await self._owner.on_bad_frame(str(exc))
            return
        if event is None:
            return
        if isinstance(event, ListenKeyExpired):
            self.health.key_expiries += 1
            raise SessionEnded("listenKeyExpired")
        fresh = self._fresh(event)
        if fresh is None:
            self.health.stale_events += 1
            return
        self.health.events += 1
        self.health.last_event_at = self._now()
        await self._owner.on_event(fresh, received_at)

    def _fresh(self, event: StreamEvent) -> StreamEvent | None:
        """The part of ``event`` that is new (None: nothing is)."""
        sequence = self.sequence
        if isinstance(event, OrderTradeUpdate):
            o = event.o
            return event if sequence.order(o.s, o.i, o.z, o.X, o.T) else None
        if isinstance(event, AccountUpdate):
            changed = [p for p in event.a.P if sequence.position(p.s, event.T, event.E)]
            if not changed:
                return None if event.a.P else event  # a balance-only update has nothing to order
            return msgspec.structs.replace(event, a=msgspec.structs.replace(event.a, P=changed))
        if isinstance(event, MarkPriceUpdate):
            return event if sequence.mark(event.s, event.E) else None
        return event

    def restart(self, why: str) -> None:
        """End this session (the owner found it lost an event): the next one resyncs before it is trusted."""
        ws = self._ws
        if ws is None:
            return
        self.health.resynced = False  # nothing from this session is trusted any more
        log.warning("user-data stream restarted by its owner", reason=why)
        task = asyncio.ensure_future(ws.close(code=1000, reason="resync"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close the connection (never the key: other processes of the account use it)."""
        if self._ws is not None:
            await self._ws.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ExchangeError):
        return f"listen key: {exc.message}"
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd
        return f"closed by the exchange ({frame.code} {frame.reason})" if frame else "connection lost"
    return str(exc) or type(exc).__name__
