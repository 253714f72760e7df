"""/healthz, /readyz and /metrics of every service (a WSGI app over the service's registry)."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Gauge

from quantum_trader.services.metrics import probes_app
from quantum_trader.services.runner import LoopClock, readiness


def call(app, path: str) -> tuple[str, str]:
    seen: list[str] = []
    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""}, lambda s, h: seen.append(s)))
    return seen[0], body.decode()


def test_probes_answer_200_or_503_with_the_reason() -> None:
    registry = CollectorRegistry()
    up = Gauge("p33_store_up", "", registry=registry)
    ready = asyncio.Event()
    app = probes_app(registry, LoopClock().alive, lambda: readiness("brain", ready, registry))
    assert call(app, "/healthz")[0] == "200 OK"
    assert call(app, "/readyz") == ("503 Service Unavailable", "not ok: reconciling the ledger with the exchange\n")
    ready.set()
    status, text = call(app, "/readyz")
    assert status.startswith("503") and text.startswith("not ok: the store is not answering")
    up.set(1)
    assert call(app, "/readyz") == ("200 OK", "ok: deciding\n")
    status, text = call(app, "/metrics")
    assert status == "200 OK" and "p33_store_up 1.0" in text


def test_a_loop_that_stopped_ticking_is_not_alive() -> None:
    clock = LoopClock()
    assert clock.alive()[0]
    clock.at -= 60
    alive, why = clock.alive()
    assert not alive and why.startswith("event loop last ticked 6")
