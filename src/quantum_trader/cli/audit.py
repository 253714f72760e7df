"""``qt audit`` and ``qt report``: the trail as tables and JSON (views/trail.py reads it from the store; the
arranging is domain/story and domain/report)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from quantum_trader.domain.report import Report
from quantum_trader.domain.story import KEPT_IN, Entry, Event
from quantum_trader.ops import OperatorError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``7d`` -> seconds. Raises OperatorError with the accepted forms."""
    found = _DURATION.match(text.strip().lower())
    if not found:
        raise OperatorError(f"--since {text!r}: use a number and a unit, e.g. 90s, 15m, 1h, 24h, 7d")
    return float(found.group(1)) * _UNIT_S[found.group(2)]


def clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if at else "?"


def story_json(plan: dict[str, str], events: list[Event]) -> str:
    doc = {
        "plan_id": plan.get("plan_id"),
        "symbol": plan.get("symbol"),
        "events": [
            {
                "at": e.at,
                "time": clock(e.at),
                "step": e.step,
                "actor": e.actor,
                "summary": e.summary,
                "fields": e.detail,
            }
            for e in events
        ],
    }
    return json.dumps(doc, indent=2)


def print_story(plan: dict[str, str], events: list[Event]) -> None:
    from rich.table import Table

    from quantum_trader.cli.render import console

    title = f"plan {plan.get('plan_id')}  {plan.get('symbol', '')} {plan.get('action', '')}  (times UTC)"
    table = Table(title=title, title_justify="left")
    for name in ("time", "+ms", "step", "who", "what"):
        table.add_column(name, justify="right" if name == "+ms" else "left")
    first = events[0].at if events else 0.0
    for e in events:
        kept = e.detail.get(KEPT_IN)
        what = f"{e.summary} (only in the journal of {kept})" if kept else e.summary
        table.add_row(clock(e.at), f"{(e.at - first) * 1000:.1f}", e.step, e.actor, what)
    console.print(table)
    if plan.get(KEPT_IN):
        console.print("the store has no record of this plan: its story is told from the local journals")


def decisions_json(entries: list[Entry]) -> str:
    return json.dumps([{"id": i, **f} for i, f in entries], indent=2)


def print_decisions(entries: list[Entry], since: str) -> None:
    from rich.table import Table

    from quantum_trader.cli.render import console
    from quantum_trader.domain.story import entry_time

    table = Table(title=f"permit decisions, last {since} ({len(entries)} shown, times UTC)", title_justify="left")
    for name in ("time", "plan", "symbol", "issuer", "decision", "reason", "ms"):
        table.add_column(name, justify="right" if name == "ms" else "left")
    for i, f in entries:
        table.add_row(
            clock(entry_time(i, f)),
            f.get("plan_id", ""),
            f.get("symbol", ""),
            f.get("issuer", ""),
            f.get("decision", ""),
            _reason(f),
            f.get("latency_ms", ""),
        )
    console.print(table)


def _reason(f: dict[str, str]) -> str:
    """The reason, and for Apply's lines the permit slot they are about when it is not already the reason."""
    reason, subject = f.get("reason", ""), f.get("subject", "")
    return f"{reason} ({subject})" if subject and subject != reason else reason


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def report_rows(r: Report) -> list[tuple[str, str]]:
    """The report as (measure, value) lines, shared by the table and the markdown."""
    rows = [
        ("period (UTC)", f"{clock(r.since)} .. {clock(r.until)}"),
        ("plans", f"{r.plans} ({r.plans_skipped} skipped at planning)"),
        ("results", str(r.results)),
        ("executed", str(r.executed)),
    ]
    rows += [(f"not executed: {error}", str(n)) for error, n in sorted(r.not_executed.items())]
    rows += [(f"permit_timeout, missing {who}", str(n)) for who, n in r.timeouts_by_missing.items()]
    ratio = f"{r.deny_allow_ratio:.3f}" if r.deny_allow_ratio is not None else "-"
    rows += [("allows / denies", f"{r.allows} / {r.denies}"), ("deny/allow ratio", ratio)]
    rows += [(f"deny {reason}", str(n)) for reason, n in r.denies_by_reason.items()]
    rows += [(f"rejected permit: {reason}", str(n)) for reason, n in r.rejected_permits.items()]
    rows += [
        ("permit wait p50 / p99 (ms)", f"{_ms(r.wait_p50_ms)} / {_ms(r.wait_p99_ms)}"),
        ("plan to result p50 / p99 (ms)", f"{_ms(r.result_p50_ms)} / {_ms(r.result_p99_ms)}"),
    ]
    rows += [(f"slowest: {s['plan_id']}", f"{s['symbol']} {s['outcome']} {_ms(s['latency_ms'])} ms") for s in r.slowest]
    rows.append(("ledger drift events", str(len(r.drift_events))))
    rows += [
        (f"  drift {d['symbol']} ({d['source']})", f"{d['before']} -> {d['after']} at {clock(float(d['at']))}")
        for d in r.drift_events[:10]
    ]
    starts = ", ".join(f"{s} {n}" for s, n in r.service_starts.items()) or "none"
    rows.append(("service starts", starts))
    rows += [(f"kept only in the local journals: {name}", str(n)) for name, n in r.kept_locally.items()]
    rows += [(f"unreadable journal lines: {name}", str(n)) for name, n in r.journal_unreadable.items()]
    return rows


def print_report(r: Report, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(r.as_dict(), indent=2))
        return
    rows = report_rows(r)
    if fmt == "markdown":
        print("| measure | value |\n|---|---|")
        for name, value in rows:
            print(f"| {name} | {value} |")
        return
    from rich.table import Table

    from quantum_trader.cli.render import console

    table = Table(title="qt report", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def dead_letters_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)


def print_dead_letters(rows: list[dict[str, Any]], since: str) -> None:
    from rich.markup import escape
    from rich.table import Table

    from quantum_trader.cli.render import console

    table = Table(
        title=f"dead letters, last {since} ({len(rows)} shown, newest first, times UTC)", title_justify="left"
    )
    for name in ("time", "from", "entry", "service", "error", "fields", "raw bytes"):
        table.add_column(name)
    for row in rows:
        raw = "" if row["raw_bytes"] is None else f"{row['raw_bytes']}{' (cut)' if row['raw_truncated'] else ''}"
        table.add_row(
            clock(row["at"]),
            escape(row["source_stream"].removeprefix("quantum:stream:")),
            escape(row["source_id"]),
            escape(row["service"]),
            escape(row["error"]),
            escape(row["fields"]),
            raw,
        )
    console.print(table)
