"""What the dashboard shows, from stream entries (web/view.py): pure."""

from __future__ import annotations

from quantum_trader.views.dashboard import decision_stats, plan_rows


def plan(n: int, plan_id: str, decision: str = "EXECUTE", **f: str) -> tuple[str, dict[str, str]]:
    return (
        f"{1800000000000 + n}-0",
        {
            "plan_id": plan_id,
            "symbol": "BTCUSDT",
            "side": "LONG",
            "qty": "0.010",
            "decision": decision,
            "reason": f.pop("reason", "ready"),
            **f,
        },
    )


def line(n: int, plan_id: str, issuer: str, decision: str, reason: str) -> tuple[str, dict[str, str]]:
    return (f"{1800000000000 + n}-0", {"plan_id": plan_id, "issuer": issuer, "decision": decision, "reason": reason})


def test_each_plan_row_has_its_two_decisions_and_outcome() -> None:
    plans = [plan(3, "c", "SKIP", reason="duplicate_in_flight"), plan(2, "b"), plan(1, "a")]  # newest first
    audit = [
        line(13, "b", "governor", "deny", "kill_switch_on"),
        line(12, "a", "apply", "consumed", "governor"),
        line(11, "a", "p33", "allow", "sanity_checks_passed"),
        line(10, "a", "operator", "allow", "operator_grant"),
        line(14, "a", "governor", "deny", "late_duplicate"),  # a later decision for the same slot does not win
    ]
    results = [("1800000000020-0", {"plan_id": "a", "executed": "true", "filled_qty": "0.010", "latency_ms": "9"})]
    rows = plan_rows(plans, audit, results)
    assert [r["plan_id"] for r in rows] == ["c", "b", "a"]
    c, b, a = rows
    assert (c["outcome"], c["governor"], c["p33"]) == ("skipped", None, None)
    assert b["outcome"] == "waiting" and b["governor"]["reason"] == "kill_switch_on" and b["p33"] is None
    assert a["outcome"] == "executed" and a["filled_qty"] == "0.010"
    assert a["governor"] == {"decision": "allow", "reason": "operator_grant", "issuer": "operator", "latency_ms": ""}
    assert a["p33"]["reason"] == "sanity_checks_passed"


def test_a_failed_plan_says_who_and_why() -> None:
    results = [("1-0", {"plan_id": "a", "executed": "false", "error": "permit_timeout", "missing": "Governor"})]
    (row,) = plan_rows([plan(1, "a")], [], results)
    assert (row["outcome"], row["missing"]) == ("permit_timeout", "Governor")


def test_stats_count_allows_and_denies_and_the_wait() -> None:
    audit = [
        line(1, "a", "governor", "allow", "policy_passed"),
        line(2, "a", "p33", "allow", "sanity_checks_passed"),
        line(3, "b", "governor", "deny", "kill_switch_on"),
        (
            "4-0",
            {
                "plan_id": "a",
                "issuer": "apply",
                "decision": "consumed",
                "reason": "governor",
                "subject": "governor",
                "latency_ms": "5.5",
            },
        ),
    ]
    stats = decision_stats(audit)
    assert (stats["allows"], stats["denies"], stats["deny_allow_ratio"]) == (2, 1, 0.5)
    assert stats["wait_p50_ms"] == 5.5 and stats["denies_by_reason"] == {"governor: kill_switch_on": 1}
    assert decision_stats([])["deny_allow_ratio"] is None
