"""The seed's 24-hour check as numbers: what the operator looks at after a day of running.

A pure function over the stream entries of the period (plans, results, permit audit, ledger audit, service
events); ``qt report`` fetches them and prints the result as a table, JSON or markdown.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from quantum_trader.domain.story import Entry, entry_time, percentile

SLOWEST = 5


@dataclass
class Report:
    since: float
    until: float
    plans: int = 0
    plans_skipped: int = 0
    results: int = 0
    executed: int = 0
    not_executed: dict[str, int] = field(default_factory=dict)  # by error
    timeouts_by_missing: dict[str, int] = field(default_factory=dict)
    allows: int = 0
    denies: int = 0
    deny_allow_ratio: float | None = None
    denies_by_reason: dict[str, int] = field(default_factory=dict)  # "issuer: reason"
    rejected_permits: dict[str, int] = field(default_factory=dict)  # by reason
    wait_p50_ms: float | None = None  # plan published -> both permits consumed
    wait_p99_ms: float | None = None
    result_p50_ms: float | None = None  # plan published -> result
    result_p99_ms: float | None = None
    slowest: list[dict[str, Any]] = field(default_factory=list)
    drift_events: list[dict[str, str]] = field(default_factory=list)  # ledger set to the exchange (not a fill)
    service_starts: dict[str, int] = field(default_factory=dict)
    # lines of the period only the local journals kept (the store lost them), by stream; and journal lines that
    # could not be read (a crash cut them short), by file
    kept_locally: dict[str, int] = field(default_factory=dict)
    journal_unreadable: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def build_report(
    since: float,
    until: float,
    *,
    plans: Sequence[Entry],
    results: Sequence[Entry],
    audit: Sequence[Entry],
    ledger: Sequence[Entry],
    service_events: Sequence[Entry],
) -> Report:
    r = Report(since=since, until=until)
    r.plans = len(plans)
    r.plans_skipped = sum(1 for _, f in plans if f.get("decision") == "SKIP")

    r.results = len(results)
    r.executed = sum(1 for _, f in results if f.get("executed") == "true")
    r.not_executed = dict(Counter(f.get("error") or "?" for _, f in results if f.get("executed") != "true"))
    missing = Counter(
        name.strip()
        for _, f in results
        if f.get("error") == "permit_timeout"
        for name in (f.get("missing") or "?").split(",")
    )
    r.timeouts_by_missing = dict(missing.most_common())
    result_latency = [v for _, f in results if (v := _num(f.get("latency_ms"))) is not None]
    r.result_p50_ms, r.result_p99_ms = percentile(result_latency, 50), percentile(result_latency, 99)
    slow = sorted(results, key=lambda e: _num(e[1].get("latency_ms")) or 0.0, reverse=True)[:SLOWEST]
    r.slowest = [
        {
            "plan_id": f.get("plan_id", ""),
            "symbol": f.get("symbol", ""),
            "outcome": "executed" if f.get("executed") == "true" else f.get("error", "?"),
            "latency_ms": _num(f.get("latency_ms")),
        }
        for _, f in slow
    ]

    decisions = [f for _, f in audit if f.get("decision") in ("allow", "deny")]
    r.allows = sum(1 for f in decisions if f["decision"] == "allow")
    r.denies = len(decisions) - r.allows
    r.deny_allow_ratio = round(r.denies / r.allows, 4) if r.allows else None
    by_reason = Counter(f"{f.get('issuer', '?')}: {f.get('reason', '?')}" for f in decisions if f["decision"] == "deny")
    r.denies_by_reason = dict(by_reason.most_common())
    rejected = Counter(f.get("reason", "?") for _, f in audit if f.get("decision") == "rejected")
    r.rejected_permits = dict(rejected.most_common())
    # one consumed line per slot and plan; the Governor slot's carries the plan's whole wait
    waits = [
        v
        for _, f in audit
        if f.get("decision") == "consumed" and (f.get("subject") or f.get("reason")) == "governor"
        if (v := _num(f.get("latency_ms"))) is not None
    ]
    r.wait_p50_ms, r.wait_p99_ms = percentile(waits, 50), percentile(waits, 99)

    r.drift_events = [
        {
            "at": f"{entry_time(i, f):.3f}",
            "symbol": f.get("symbol", ""),
            "before": f.get("before", ""),
            "after": f.get("after", ""),
            "source": f.get("source", ""),
        }
        for i, f in ledger
        # a ledger set from the exchange rather than by a fill; the first reconcile of a symbol ("none") is not drift
        if f.get("source") in ("reconcile", "adopt") and f.get("before") not in (f.get("after"), "none", "")
    ]
    r.service_starts = dict(
        Counter(f.get("service", "?") for _, f in service_events if f.get("event") == "started").most_common()
    )
    return r
