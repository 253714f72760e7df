"""The audit trail as an operator reads it: one plan's story in time order, and filtered decision lists.

Pure functions over stream entries as the store returns them (``(entry_id, fields)``, strings only); the
``qt audit`` command fetches, these arrange. An entry's time is its own ``at`` field when it has a readable one,
else the millisecond part of its stream id (every stream entry has one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

Entry = tuple[str, dict[str, str]]


def entry_time(entry_id: str, fields: dict[str, str]) -> float:
    """Epoch seconds of a stream entry: its ``at`` field, or its id's milliseconds."""
    try:
        at = float(fields.get("at", ""))
        if math.isfinite(at) and at > 0:
            return at
    except ValueError:
        pass
    try:
        return int(entry_id.split("-", 1)[0]) / 1000
    except ValueError:
        return 0.0


def id_at(seconds: float) -> str:
    """The smallest stream id at or after ``seconds`` (for XRANGE bounds)."""
    return f"{max(0, int(seconds * 1000))}-0"


@dataclass(frozen=True)
class Event:
    at: float
    step: str  # proposal | plan | decision | consumed | rejected | duplicate | result | ledger
    actor: str  # who did it: upstream, apply, governor, operator, p33
    summary: str
    detail: dict[str, str] = field(default_factory=dict)


KEPT_IN = "kept_in"  # the field marking a line found only in a local journal: which process's file kept it


def merge_local(
    stored: Sequence[Entry],
    local: Iterable[tuple[Entry, str]],
    same: Callable[[dict[str, str]], Hashable] | None = None,
) -> list[Entry]:
    """The store's entries of one stream plus, from the local journals (journal.py), every line the store no
    longer has (a failover or a store that came back older erased it), each marked ``kept_in`` with the file
    that kept it; in time order. A line is the store's when both have the same fields (the journal writes the
    fields the store was given), or the same ``same(fields)`` when given (results: one per plan, the store's
    first: a result a failover erased and the plan's later answer on the new primary count once); a line two
    journals kept counts once. ``local`` holds ``((entry_id or "", fields), where)``; a line without an id gets
    the id of its time."""
    identify = same or line_identity
    have = {identify(fields) for _, fields in stored}
    extra: list[Entry] = []
    for (entry_id, fields), where in local:
        identity = identify(fields)
        if identity in have:
            continue
        have.add(identity)
        extra.append((entry_id or id_at(entry_time("0-0", fields)), {**fields, KEPT_IN: where}))
    if not extra:
        return list(stored)
    return sorted([*stored, *extra], key=lambda e: (entry_time(*e), _id_order(e[0])))


def one_per_plan(fields: dict[str, str]) -> Hashable:
    """Results: one per plan (a line without a plan id is only the same as itself)."""
    return fields.get("plan_id") or line_identity(fields)


def line_identity(fields: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """A line's fields as one comparable value (the same line in the store and in a journal)."""
    return tuple(sorted((k, v) for k, v in fields.items() if k != KEPT_IN))


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def _decision_event(entry_id: str, f: dict[str, str]) -> Event:
    decision, issuer, reason = f.get("decision", "?"), f.get("issuer", "?"), f.get("reason", "")
    latency = f.get("latency_ms", "")
    if decision in ("allow", "deny"):
        summary = f"{decision.upper()} ({reason})" + (f" after {latency} ms" if latency else "")
        step = "decision"
    elif decision == "consumed":
        summary = f"consumed the {f.get('subject') or reason} permit"
        step = "consumed"
    elif decision == "rejected":
        summary = f"rejected the {f.get('subject', '?')} permit: {reason}"
        step = "rejected"
    else:
        summary = f"{decision}: {reason}"
        step = decision
    return Event(entry_time(entry_id, f), step, issuer, summary, dict(f))


def _result_summary(f: dict[str, str]) -> str:
    if f.get("executed") == "true":
        fill = f"{f.get('filled_qty', '?')} @ {f.get('avg_price', '?')}"
        return f"EXECUTED: filled {fill} (order {f.get('order_id', '?')}, {f.get('client_order_id', '')})"
    words = [f.get("error", "?")]
    if f.get("denied_by"):
        words.append(f"by {f['denied_by']}")
    if f.get("missing"):
        words.append(f"missing: {f['missing']}")
    if f.get("reason"):
        words.append(f"({f['reason']})")
    if f.get("exchange_code") not in (None, "", "0"):
        words.append(f"code {f['exchange_code']}")
    return "not executed: " + " ".join(words)


def plan_story(
    plan: dict[str, str],
    proposal: Entry | None,
    audit: Iterable[Entry],
    result: Entry | None,
    ledger: Iterable[Entry],
) -> list[Event]:
    """Everything recorded about one plan, oldest first. ``audit`` and ``ledger`` may hold other plans' entries
    (a time-bounded scan): only this plan's are kept."""
    plan_id = plan.get("plan_id", "")
    events: list[Event] = []
    if proposal is not None:
        pid, pf = proposal
        summary = f"{pf.get('action', '?')} {pf.get('symbol', '?')}"
        if pf.get("qty"):
            summary += f" qty {pf['qty']}"
        if pf.get("close_pct"):
            summary += f" {pf['close_pct']} %"
        events.append(Event(entry_time(pid, pf), "proposal", pf.get("source") or "upstream", summary, dict(pf)))
    if plan and not plan.get(KEPT_IN):  # a plan the store forgot has no record to tell: its lines tell it
        created = float(plan.get("created_at") or 0)
        summary = f"{plan.get('decision', '?')} {plan.get('side', '')} {plan.get('qty', '')}".strip()
        if plan.get("reason"):
            summary += f" ({plan['reason']})"
        events.append(Event(created, "plan", "apply", summary, dict(plan)))
    events += [_decision_event(i, f) for i, f in audit if f.get("plan_id") == plan_id]
    if result is not None:
        rid, rf = result
        events.append(Event(entry_time(rid, rf), "result", "apply", _result_summary(rf), dict(rf)))
    for lid, lf in ledger:
        if lf.get("plan_id") == plan_id:
            summary = f"ledger {lf.get('before', '?')} -> {lf.get('after', '?')} ({lf.get('source', '?')})"
            events.append(Event(entry_time(lid, lf), "ledger", "p33", summary, dict(lf)))
    order = {"proposal": 0, "plan": 1}
    return sorted(events, key=lambda e: (e.at, order.get(e.step, 2)))


def filter_decisions(
    audit: Iterable[Entry],
    *,
    symbol: str | None = None,
    issuer: str | None = None,
    decision: str | None = None,
) -> list[Entry]:
    """Audit entries matching every given filter (case-insensitive), in stream order."""

    def keep(f: dict[str, str]) -> bool:
        return (
            (symbol is None or f.get("symbol", "").upper() == symbol.upper())
            and (issuer is None or f.get("issuer", "").lower() == issuer.lower())
            and (decision is None or f.get("decision", "").lower() == decision.lower())
        )

    return [(i, f) for i, f in audit if keep(f)]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ranked = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ranked)))
    return ranked[min(rank, len(ranked)) - 1]
