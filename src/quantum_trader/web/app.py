"""`qt web`: the live dashboard, a Starlette app on :8040.

- ``GET /`` the page (one HTML file, no build step); ``GET /events`` server-sent events, a fresh ``state`` at
  once and again whenever a plan, decision, result or operator action lands (or every 2 s for positions and
  health), from one shared producer, at most ``QT_WEB__MAX_CLIENTS`` pages; ``GET /api/state`` one state.
- Only the Host names in ``QT_WEB__ALLOWED_HOSTS`` are answered (no DNS-rebinding page can use it).
- ``POST /api/kill-switch`` ``{"on": true|false}`` flips the kill switch for every Governor. It needs the operator
  token (``Authorization: Bearer …``; from QT_WEB__OPERATOR_TOKEN(_FILE) or ``<state dir>/secrets/web-operator.token``)
  and is audited in ``quantum:stream:ops.audit`` like the CLI's.

The server uses its own store account (``qt-web``): it reads, and writes nothing but the kill switch and its
audit line.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import connect, resolve_redis_url
from quantum_trader.journal import open_journal
from quantum_trader.secrets import web_operator_token
from quantum_trader.settings import Settings
from quantum_trader.tasks import cancel_and_wait
from quantum_trader.views.dashboard import dashboard_state

PUSH_EVERY_S = 2.0  # positions and health change without a stream entry: push at least this often
MIN_PUSH_GAP_S = 0.2  # under a burst of plans, at most five pushes a second per page
WATCHED = (keys.PLAN_STREAM, keys.AUDIT_STREAM, keys.RESULT_STREAM, keys.OPS_AUDIT_STREAM)


class StateFeed:
    """One producer of dashboard states for every open page: it computes a state when a plan, decision, result
    or operator action lands (or every ``PUSH_EVERY_S``), at most every ``MIN_PUSH_GAP_S``, and only while
    at least one page listens. However many pages are open, the store sees one reader."""

    def __init__(self, redis: aioredis.Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.latest = ""
        self.version = 0
        self.listeners = 0
        self._changed = asyncio.Condition()
        self._listening = asyncio.Event()

    async def run(self) -> None:
        cursors: dict[str, str] = {}
        while True:
            await self._listening.wait()
            if not cursors:  # start after what exists now: the first state shows it anyway
                for name in WATCHED:
                    last = await self.redis.xrevrange(name, count=1)
                    cursors[name] = last[0][0] if last else "0-0"
            pushed = time.monotonic()
            state = json.dumps(await dashboard_state(self.redis, self.settings))
            async with self._changed:
                self.latest, self.version = state, self.version + 1
                self._changed.notify_all()
            news = await self.redis.xread(cursors, block=int(PUSH_EVERY_S * 1000))
            for name, entries in news or []:
                cursors[name] = entries[-1][0]
            await asyncio.sleep(max(0.0, MIN_PUSH_GAP_S - (time.monotonic() - pushed)))

    async def states(self) -> AsyncIterator[str]:
        """The latest state at once (when there is one), then each new one, while the caller iterates."""
        self.listeners += 1
        self._listening.set()
        seen = 0
        try:
            while True:
                async with self._changed:
                    while self.version == seen:
                        await self._changed.wait()
                    seen, state = self.version, self.latest
                yield state
        finally:
            self.listeners -= 1
            if not self.listeners:
                self._listening.clear()


def create_app(settings: Settings) -> Starlette:
    token = web_operator_token(settings)
    page = resources.files("quantum_trader.web").joinpath("static/index.html").read_text(encoding="utf-8")
    store: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        store["redis"] = await connect(resolve_redis_url(settings))
        store["feed"] = feed = StateFeed(store["redis"], settings)
        producer = asyncio.create_task(feed.run(), name="dashboard-feed")
        try:
            yield
        finally:
            await cancel_and_wait([producer])
            await store["redis"].aclose()

    async def index(_: Request) -> Response:
        return HTMLResponse(page)

    async def state(_: Request) -> Response:
        return JSONResponse(await dashboard_state(store["redis"], settings))

    async def events(request: Request) -> Response:
        feed: StateFeed = store["feed"]
        if feed.listeners >= settings.web.max_clients:
            return JSONResponse({"error": "too many open dashboards"}, status_code=503)

        async def stream() -> AsyncIterator[str]:
            async for state in feed.states():
                if await request.is_disconnected():
                    return
                yield f"event: state\ndata: {state}\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    journal = open_journal(settings, "web", sync_each=True)  # the switch's flips, kept on this host too

    async def kill_switch(request: Request) -> Response:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"error": "operator token required (Authorization: Bearer …)"}, status_code=401)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("on"), bool):
            return JSONResponse({"error": 'send {"on": true} or {"on": false}'}, status_code=400)
        await ops.set_kill_switch(store["redis"], body["on"], "web", journal)
        return JSONResponse({"kill_switch": body["on"]})

    async def healthz(_: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/state", state),
            Route("/events", events),
            Route("/api/kill-switch", kill_switch, methods=["POST"]),
            Route("/healthz", healthz),
        ],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=settings.web.allowed_hosts)],
        lifespan=lifespan,
    )


def serve(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
