"""What the dashboard shows: one state of the chain (status, recent plans with their permits and outcome,
decision stats, dead letters), read from the store. ``dashboard_state`` fetches; ``plan_rows`` and
``decision_stats`` arrange (pure).

Plans newest first, each with its Governor and P3.3 decision (or none yet) and its outcome (or "waiting").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.domain.dead_letters import letter_row, newest_first
from quantum_trader.domain.report import build_report
from quantum_trader.domain.story import Entry, entry_time
from quantum_trader.settings import Settings
from quantum_trader.views.status import collect

PLANS_SHOWN = 30
LETTERS_SHOWN = 10  # the newest dead letters over every dead-letter stream
AUDIT_WINDOW = 1000  # the ratio and the wait percentiles are over the newest thousand audit lines


async def dashboard_state(redis: aioredis.Redis, settings: Settings) -> dict[str, Any]:
    status = await collect(redis, list(settings.symbols), settings.governor.mode)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xrevrange(keys.PLAN_STREAM, count=PLANS_SHOWN)
        pipe.xrevrange(keys.AUDIT_STREAM, count=AUDIT_WINDOW)
        pipe.xrevrange(keys.RESULT_STREAM, count=PLANS_SHOWN * 3)
        for dlq in keys.DEAD_LETTER_STREAMS:
            pipe.xlen(dlq)
            pipe.xrevrange(dlq, count=LETTERS_SHOWN)
        plans, audit, results, *letters = await pipe.execute()
    counts, latest = letters[0::2], letters[1::2]
    rows = [
        letter_row(dlq, i, f) for dlq, entries in zip(keys.DEAD_LETTER_STREAMS, latest, strict=True) for i, f in entries
    ]
    return {
        "at": time.time(),
        "kill_switch": status.kill_switch,
        "governor_mode": status.governor_mode,
        "unresolved_orders": status.unresolved_orders,
        "services": status.services,
        "store": status.store,  # the instance, and through Sentinels which node is primary and the replicas
        "groups": status.groups,
        "symbols": status.symbols,
        "plans": plan_rows(plans, audit, results),
        "stats": decision_stats(audit),
        "dead_letters": {"count": sum(counts), "latest": newest_first(rows, LETTERS_SHOWN)},
    }


SLOTS = {"governor": "governor", "operator": "governor", "p33": "p33"}


def _decision(f: dict[str, str]) -> dict[str, Any]:
    return {
        "decision": f.get("decision", ""),
        "reason": f.get("reason", ""),
        "issuer": f.get("issuer", ""),
        "latency_ms": f.get("latency_ms", ""),
    }


def plan_rows(plans: Sequence[Entry], audit: Sequence[Entry], results: Sequence[Entry]) -> list[dict[str, Any]]:
    """One row per plan in ``plans`` (in the given order), joined with its decisions and result."""
    decisions: dict[tuple[str, str], dict[str, Any]] = {}
    for _, f in sorted(audit, key=lambda e: e[0]):  # oldest first: the first decision per slot wins, as in Apply
        slot = SLOTS.get(f.get("issuer", ""))
        if slot and f.get("decision") in ("allow", "deny"):
            decisions.setdefault((f.get("plan_id", ""), slot), _decision(f))
    outcome = {f.get("plan_id", ""): f for _, f in results}
    rows = []
    for entry_id, f in plans:
        plan_id = f.get("plan_id", "")
        result = outcome.get(plan_id)
        if result is None:
            state = "waiting" if f.get("decision") == "EXECUTE" else "skipped"
        else:
            state = "executed" if result.get("executed") == "true" else result.get("error") or "failed"
        rows.append(
            {
                "plan_id": plan_id,
                "at": entry_time(entry_id, {"at": f.get("created_at", "")}),
                "symbol": f.get("symbol", ""),
                "side": f.get("side", ""),
                "qty": f.get("qty", ""),
                "plan": f.get("decision", ""),
                "plan_reason": f.get("reason", ""),
                "governor": decisions.get((plan_id, "governor")),
                "p33": decisions.get((plan_id, "p33")),
                "outcome": state,
                "outcome_reason": (result or {}).get("reason", ""),
                "denied_by": (result or {}).get("denied_by", ""),
                "missing": (result or {}).get("missing", ""),
                "filled_qty": (result or {}).get("filled_qty", ""),
                "latency_ms": (result or {}).get("latency_ms", ""),
            }
        )
    return rows


def decision_stats(audit: Sequence[Entry]) -> dict[str, Any]:
    """Allow/deny counts, their ratio and the permit wait percentiles over ``audit`` (the recent window)."""
    r = build_report(0, 0, plans=[], results=[], audit=audit, ledger=[], service_events=[])
    return {
        "allows": r.allows,
        "denies": r.denies,
        "deny_allow_ratio": r.deny_allow_ratio,
        "wait_p50_ms": r.wait_p50_ms,
        "wait_p99_ms": r.wait_p99_ms,
        "denies_by_reason": r.denies_by_reason,
        "decisions": len(audit),
    }
