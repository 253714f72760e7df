"""`qt web`: the live dashboard, a Starlette app on :8040.

- ``GET /`` the page (one HTML file, no build step); ``GET /events`` server-sent events, a fresh ``state`` at
  once and again whenever a plan, decision, result or operator action lands (or every 2 s for positions and
  health); ``GET /api/state`` the same state once, as JSON.
- ``POST /api/kill-switch`` ``{"on": true|false}`` flips the kill switch for every Governor. It needs the operator
  token (``Authorization: Bearer …``; from QT_WEB__OPERATOR_TOKEN(_FILE) or ``<state dir>/secrets/web-operator.token``)
  and is audited in ``quantum:stream:ops.audit`` like the CLI's.

The server reads the store with the operator's account; it writes nothing but the kill switch.
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
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import connect, resolve_redis_url
from quantum_trader.cli.status import collect
from quantum_trader.secrets import web_operator_token
from quantum_trader.settings import Settings
from quantum_trader.web.view import decision_stats, plan_rows

PLANS_SHOWN = 30
AUDIT_WINDOW = 1000  # the ratio and the wait percentiles are over the newest thousand audit lines
PUSH_EVERY_S = 2.0  # positions and health change without a stream entry: push at least this often
MIN_PUSH_GAP_S = 0.2  # under a burst of plans, at most five pushes a second per page
WATCHED = (keys.PLAN_STREAM, keys.AUDIT_STREAM, keys.RESULT_STREAM, keys.OPS_AUDIT_STREAM)


async def dashboard_state(redis: aioredis.Redis, settings: Settings) -> dict[str, Any]:
    status = await collect(redis, list(settings.symbols), settings.governor.mode)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xrevrange(keys.PLAN_STREAM, count=PLANS_SHOWN)
        pipe.xrevrange(keys.AUDIT_STREAM, count=AUDIT_WINDOW)
        pipe.xrevrange(keys.RESULT_STREAM, count=PLANS_SHOWN * 3)
        plans, audit, results = await pipe.execute()
    return {
        "at": time.time(),
        "kill_switch": status.kill_switch,
        "governor_mode": status.governor_mode,
        "unresolved_orders": status.unresolved_orders,
        "services": status.services,
        "groups": status.groups,
        "symbols": status.symbols,
        "plans": plan_rows(plans, audit, results),
        "stats": decision_stats(audit),
    }


def create_app(settings: Settings) -> Starlette:
    token = web_operator_token(settings)
    page = resources.files("quantum_trader.web").joinpath("static/index.html").read_text(encoding="utf-8")
    store: dict[str, aioredis.Redis] = {}

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        store["redis"] = await connect(resolve_redis_url(settings))
        try:
            yield
        finally:
            await store["redis"].aclose()

    async def index(_: Request) -> Response:
        return HTMLResponse(page)

    async def state(_: Request) -> Response:
        return JSONResponse(await dashboard_state(store["redis"], settings))

    async def events(request: Request) -> Response:
        redis = store["redis"]

        async def stream() -> AsyncIterator[str]:
            cursors = {}
            for name in WATCHED:  # start after what exists now: the first push shows it anyway
                last = await redis.xrevrange(name, count=1)
                cursors[name] = last[0][0] if last else "0-0"
            while not await request.is_disconnected():
                pushed = time.monotonic()
                yield f"event: state\ndata: {json.dumps(await dashboard_state(redis, settings))}\n\n"
                news = await redis.xread(cursors, block=int(PUSH_EVERY_S * 1000))
                for name, entries in news or []:
                    cursors[name] = entries[-1][0]
                await asyncio.sleep(max(0.0, MIN_PUSH_GAP_S - (time.monotonic() - pushed)))

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

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
        await ops.set_kill_switch(store["redis"], body["on"], "web")
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
        lifespan=lifespan,
    )


def serve(settings: Settings, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
