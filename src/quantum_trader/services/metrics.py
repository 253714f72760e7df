"""Prometheus metrics, one registry per service instance (so tests can run several services in one process).

Names: Apply ``qt_apply_*`` on :8043, Governor ``qt_governor_*`` on :8044, P3.3 ``p33_*`` on :8045 (the seed's
operators grep for ``p33``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from quantum_trader.exchange.userstream import StreamHealth

# Permit waits range from ~1 ms (both issuers up) to the 1.2 s window; decisions from 0.1 ms to seconds.
WAIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.2, 1.5, 2.5, 5.0)
DECISION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class ApplyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.plans = Counter(
            "qt_apply_plans",
            "Plans published, by decision and reason",
            ["decision", "reason"],
            registry=registry,
        )
        self.results = Counter(
            "qt_apply_results",
            "Results published, by outcome (executed or the error)",
            ["outcome"],
            registry=registry,
        )
        self.permit_decisions = Counter(
            "qt_apply_permit_decisions",
            "Valid permit decisions of plans Apply executed or saw denied, by issuer, allow/deny and reason",
            ["issuer", "decision", "reason"],
            registry=registry,
        )
        self.permit_wait = Histogram(
            "qt_apply_permit_wait_seconds",
            "From plan publication until Apply knows both decisions (or gives up)",
            ["outcome"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.timeouts = Counter(
            "qt_apply_permit_timeouts",
            "permit_timeout results, by missing issuer",
            ["missing"],
            registry=registry,
        )
        self.rejected_permits = Counter(
            "qt_apply_rejected_permits", "Permits rejected by Apply, by reason", ["reason"], registry=registry
        )
        self.orders = Counter(
            "qt_apply_orders",
            "Order attempts by outcome: filled, not_filled, rejected, not_placed, unknown, banned, throttled",
            ["outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "qt_apply_dead_letters", "Proposals moved to the dead-letter stream", registry=registry
        )
        self.in_flight = Gauge("qt_apply_plans_in_flight", "Plans waiting or executing", registry=registry)
        self.clock_offset = Gauge(
            "qt_apply_clock_offset_ms",
            "This host's wall clock minus the exchange's, as last measured",
            registry=registry,
        )
        self.clock_error = Gauge(
            "qt_apply_clock_error_ms",
            "How far that offset may be off now (half the measuring round trip plus drift since)",
            registry=registry,
        )
        self.host_clock_gap = Gauge(
            "qt_apply_host_clock_gap_ms",
            "The largest difference between this host's clock and another live Apply host's, errors included",
            registry=registry,
        )
        self.clock_ok = Gauge(
            "qt_apply_clocks_within_bounds",
            "1 while the clocks are within their bounds; 0: Apply fails closed (plans nothing, calls nothing absent)",
            registry=registry,
        )
        self.unresolved = Gauge(
            "qt_apply_unresolved_orders",
            "Orders sent whose outcome is not established yet (no result until it is)",
            registry=registry,
        )
        self.store_up = Gauge("qt_apply_store_up", "1 while the store answers", registry=registry)
        self.lookups = Counter(
            "qt_apply_truth_lookups",
            "Orders looked up on the exchange because the store could not vouch for the plan, by why",
            ["why"],
            registry=registry,
        )
        self.adopted = Counter(
            "qt_apply_adopted_orders",
            "Orders found on the exchange for plans the store had forgotten, published as their result",
            registry=registry,
        )
        self.repeats = Counter(
            "qt_apply_repeated_proposals",
            "Proposals sent again with the id of one already answered (a client's retry): its plan's result stands",
            registry=registry,
        )
        self.store_changes = Gauge(
            "qt_apply_store_instances_changed",
            "Times this process found the store to be another instance (restart, failover) than before",
            registry=registry,
        )
        self.store_replicas = Gauge(
            "qt_apply_store_replicas",
            "Replicas connected to the store's primary, as it reports them (checked every sweep round)",
            registry=registry,
        )
        self.store_promoted = Gauge(
            "qt_apply_store_promoted",
            "1 while the store's primary is a promoted replica (since the last failover, until it restarts)",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "qt_apply_consumer_lag", "Entries not yet delivered to the consumer group", ["group"], registry=registry
        )
        self.consumer_pending = Gauge(
            "qt_apply_consumer_pending", "Entries delivered but not acknowledged", ["group"], registry=registry
        )
        self.exchange_banned = Gauge(
            "qt_apply_exchange_banned",
            "1 while the exchange bans this IP (HTTP 418): no order is sent",
            registry=registry,
        )
        self.position_reads = Counter(
            "qt_apply_position_reads",
            "Positions read to plan a close, by source: P3.3's fresh snapshot, or the exchange (weight 5)",
            ["source"],
            registry=registry,
        )
        self.exchange_weight = Gauge(
            "qt_apply_exchange_used_weight",
            "Request weight used this minute, as the exchange reports it",
            registry=registry,
        )
        self.exchange_limit_used = Gauge(
            "qt_apply_exchange_limit_used_ratio",
            "Share of each exchange rate limit used in its current window (weight_1m, orders_10s, orders_1m), as "
            "counted and reported; orders are refused rate_limited from 0.8",
            ["limit"],
            registry=registry,
        )


class GovernorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.permits = Counter(
            "qt_governor_permits",
            "Governor decisions, by allow/deny and reason",
            ["decision", "reason"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "qt_governor_decision_seconds",
            "From reading a plan to its permit written",
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.awaiting_operator = Counter(
            "qt_governor_awaiting_operator", "Plans left to an operator (manual mode)", registry=registry
        )
        self.duplicates = Counter(
            "qt_governor_duplicate_decisions", "Plans already decided by another instance", registry=registry
        )
        self.dead_letters = Counter(
            "qt_governor_dead_letters", "Plan entries moved to the dead-letter stream", registry=registry
        )
        self.store_up = Gauge("qt_governor_store_up", "1 while the store answers", registry=registry)
        self.consumer_lag = Gauge(
            "qt_governor_consumer_lag", "Entries not yet delivered to the consumer group", ["group"], registry=registry
        )
        self.consumer_pending = Gauge(
            "qt_governor_consumer_pending", "Entries delivered but not acknowledged", ["group"], registry=registry
        )


class BrainMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.permits = Counter(
            "p33_permits",
            "P3.3 decisions, by allow/deny and reason",
            ["decision", "reason"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "p33_decision_seconds",
            "From reading a plan to its permit written",
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.snapshot_age = Gauge(
            "p33_snapshot_age_seconds",
            "Age of the position snapshot at the last poll",
            ["symbol"],
            registry=registry,
        )
        self.snapshot_errors = Counter("p33_snapshot_errors", "Snapshot polls that failed", registry=registry)
        self.ledger_updates = Counter(
            "p33_ledger_updates",
            "Ledger changes, by source (result or reconcile)",
            ["source"],
            registry=registry,
        )
        self.ready = Gauge("p33_ready", "1 once the ledger is reconciled and permits are issued", registry=registry)
        self.ledger_drift = Gauge(
            "p33_ledger_drift",
            "Exchange position minus ledger at the last snapshot poll, per symbol (0 when they agree)",
            ["symbol"],
            registry=registry,
        )
        self.duplicates = Counter(
            "p33_duplicate_decisions", "Plans already decided by another instance", registry=registry
        )
        self.dead_letters = Counter(
            "p33_dead_letters", "Entries moved to a dead-letter stream", ["stream"], registry=registry
        )
        self.store_up = Gauge("p33_store_up", "1 while the store answers", registry=registry)
        self.consumer_lag = Gauge(
            "p33_consumer_lag", "Entries not yet delivered to the consumer group", ["group"], registry=registry
        )
        self.consumer_pending = Gauge(
            "p33_consumer_pending", "Entries delivered but not acknowledged", ["group"], registry=registry
        )
        self.pushed_positions = Counter(
            "p33_pushed_positions", "Position snapshots written from the user-data stream", registry=registry
        )
        self.stream_gaps = Counter(
            "p33_stream_gaps",
            "Fills the user-data stream did not show within a second while healthy (polled, and the stream resynced)",
            registry=registry,
        )
        self.drift_events = Counter(
            "p33_drift_events",
            "Exchange position changes no plan of the chain explains, by the exchange's reason",
            ["reason"],
            registry=registry,
        )


class StreamCollector:
    """The user-data stream's health (exchange/userstream.py StreamHealth) as ``<prefix>_stream_*`` series, read
    at each scrape: connected and healthy (0/1), the last frame's and event's age, and the counts since start
    (sessions, reconnects, key renewals, resyncs, key expiries, events, stale events passed over, bad frames)."""

    COUNTS = ("sessions", "reconnects", "renewals", "resyncs", "key_expiries", "events", "stale_events", "bad_frames")

    def __init__(self, prefix: str, health: Callable[[], StreamHealth | None]) -> None:
        self._prefix = prefix
        self._health = health

    def collect(self) -> Iterable[Any]:
        health = self._health()
        if health is None:
            return
        name = f"{self._prefix}_stream"
        yield GaugeMetricFamily(f"{name}_connected", "1 while the user-data stream is connected", health.connected)
        yield GaugeMetricFamily(
            f"{name}_healthy", "1 while it is connected and resynced: its events are trusted", health.healthy
        )
        now = time.time()
        for what, at in (("frame", health.last_frame_at), ("event", health.last_event_at)):
            age = now - at if at else float("inf")
            yield GaugeMetricFamily(f"{name}_last_{what}_age_seconds", f"Seconds since the last {what}", age)
        for count in self.COUNTS:
            help_text = f"User-data stream {count.replace('_', ' ')} since start"
            yield CounterMetricFamily(f"{name}_{count}", help_text, getattr(health, count))


def stream_metrics(registry: CollectorRegistry, prefix: str, health: Callable[[], StreamHealth | None]) -> None:
    registry.register(StreamCollector(prefix, health))


def build_info(registry: CollectorRegistry, service: str) -> None:
    """``qt_build_info{service, version, python} 1``: which release runs where (and a silent service shows as
    an absent series)."""
    import platform

    from quantum_trader import __version__

    info = Info("qt_build", "The running release", registry=registry)
    info.info({"service": service, "version": __version__, "python": platform.python_version()})


Probe = Callable[[], tuple[bool, str]]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes every few seconds would drown the service's own log


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def probes_app(registry: CollectorRegistry, alive: Probe, ready: Probe) -> Callable[..., Iterable[bytes]]:
    """``/metrics`` (Prometheus), ``/healthz`` (the process and its loop are alive) and ``/readyz`` (it decides:
    connected to the store and, for P3.3, reconciled); 200 or 503 with the reason as text."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        probe = {"/healthz": alive, "/readyz": ready}.get(path)
        if probe is None:
            body: Iterable[bytes] = metrics(environ, start_response)
            return body
        ok, why = probe()
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [f"{'ok' if ok else 'not ok'}: {why}\n".encode()]

    return app


def serve_metrics(
    registry: CollectorRegistry,
    port: int,
    host: str = "127.0.0.1",
    *,
    alive: Probe | None = None,
    ready: Probe | None = None,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` from a daemon thread; port 0: none."""
    if not port:
        return
    always: Probe = lambda: (True, "no probe")  # noqa: E731
    server = make_server(host, port, probes_app(registry, alive or always, ready or always), _Server, _Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
