"""What the dashboard shows, computed from stream entries (pure: the app fetches, this arranges).

Plans newest first, each with its Governor and P3.3 decision (or none yet) and its outcome (or "waiting").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quantum_trader.domain.report import build_report
from quantum_trader.domain.story import Entry, entry_time

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
