"""The audit trail arranged for operators (domain/story) and the 24-hour report (domain/report): pure, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.cli.audit import parse_since
from quantum_trader.domain.report import build_report
from quantum_trader.domain.story import entry_time, filter_decisions, id_at, percentile, plan_story
from quantum_trader.ops import OperatorError

T0 = 1_800_000_000.0
PLAN = {
    "plan_id": "p1",
    "symbol": "BTCUSDT",
    "side": "LONG",
    "qty": "0.010",
    "decision": "EXECUTE",
    "reason": "ready",
    "created_at": str(T0),
}


def audit_line(n: int, **fields: str) -> tuple[str, dict[str, str]]:
    return (f"{int(T0 * 1000) + n}-0", {"symbol": "BTCUSDT", **fields})


def test_an_entrys_time_is_its_at_field_or_its_stream_id() -> None:
    assert entry_time("1800000000500-0", {"at": "1800000001.25"}) == 1800000001.25
    assert entry_time("1800000000500-0", {}) == 1800000000.5
    assert entry_time("1800000000500-0", {"at": "nan"}) == 1800000000.5
    assert entry_time("1800000000500-0", {"at": "soon"}) == 1800000000.5
    assert entry_time("garbage", {}) == 0.0
    assert id_at(1800000000.5) == "1800000000500-0" and id_at(-5) == "0-0"


def test_a_plans_story_is_in_time_order_and_only_its_own() -> None:
    audit = [
        audit_line(
            9, plan_id="p1", issuer="apply", decision="consumed", reason="p33", subject="p33", at=str(T0 + 0.009)
        ),
        audit_line(
            3,
            plan_id="p1",
            issuer="governor",
            decision="allow",
            reason="policy_passed",
            latency_ms="3.1",
            at=str(T0 + 0.003),
        ),
        audit_line(5, plan_id="other", issuer="p33", decision="deny", reason="qty_mismatch"),
        audit_line(4, plan_id="p1", issuer="p33", decision="allow", reason="sanity_checks_passed", at=str(T0 + 0.004)),
        audit_line(
            6,
            plan_id="p1",
            issuer="apply",
            decision="rejected",
            reason="bad_signature",
            subject="governor",
            at=str(T0 + 0.006),
        ),
    ]
    proposal = (f"{int(T0 * 1000) - 2}-0", {"symbol": "BTCUSDT", "action": "FULL_CLOSE", "source": "cli"})
    result = (
        f"{int(T0 * 1000) + 12}-0",
        {
            "plan_id": "p1",
            "executed": "true",
            "filled_qty": "0.010",
            "avg_price": "60000",
            "order_id": "7",
            "client_order_id": "qt-p1",
        },
    )
    ledger = [
        (
            f"{int(T0 * 1000) + 15}-0",
            {"plan_id": "p1", "symbol": "BTCUSDT", "before": "0.010", "after": "0.000", "source": "result"},
        ),
        (
            f"{int(T0 * 1000) + 16}-0",
            {"plan_id": "", "symbol": "BTCUSDT", "before": "0", "after": "1", "source": "adopt"},
        ),
    ]
    story = plan_story(PLAN, proposal, audit, result, ledger)
    assert [(e.step, e.actor) for e in story] == [
        ("proposal", "cli"),
        ("plan", "apply"),
        ("decision", "governor"),
        ("decision", "p33"),
        ("rejected", "apply"),
        ("consumed", "apply"),
        ("result", "apply"),
        ("ledger", "p33"),
    ]
    assert story[2].summary == "ALLOW (policy_passed) after 3.1 ms"
    assert story[4].summary == "rejected the governor permit: bad_signature"
    assert story[5].summary == "consumed the p33 permit"
    assert story[6].summary == "EXECUTED: filled 0.010 @ 60000 (order 7, qt-p1)"
    assert story[7].summary == "ledger 0.010 -> 0.000 (result)"


def test_a_failed_plans_result_says_who_and_why() -> None:
    result = ("1-0", {"executed": "false", "error": "permit_timeout", "missing": "Governor"})
    (event,) = plan_story({}, None, [], result, [])
    assert event.summary == "not executed: permit_timeout missing: Governor"
    result = (
        "1-0",
        {
            "executed": "false",
            "error": "exchange_rejected",
            "reason": "ReduceOnly Order is rejected.",
            "exchange_code": "-2022",
        },
    )
    (event,) = plan_story({}, None, [], result, [])
    assert event.summary == "not executed: exchange_rejected (ReduceOnly Order is rejected.) code -2022"


def test_decisions_are_filtered_by_every_given_filter_case_insensitively() -> None:
    entries = [
        audit_line(1, plan_id="a", issuer="governor", decision="deny", symbol="BTCUSDT"),
        audit_line(2, plan_id="b", issuer="p33", decision="deny", symbol="ETHUSDT"),
        audit_line(3, plan_id="c", issuer="governor", decision="allow", symbol="ETHUSDT"),
    ]
    assert [f["plan_id"] for _, f in filter_decisions(entries, decision="DENY")] == ["a", "b"]
    assert [f["plan_id"] for _, f in filter_decisions(entries, issuer="Governor", symbol="ethusdt")] == ["c"]
    assert filter_decisions(entries, symbol="SOLUSDT") == []
    assert filter_decisions(entries) == entries


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1), st.floats(min_value=0, max_value=100))
def test_a_percentile_is_one_of_the_values_and_monotonic(values: list[float], q: float) -> None:
    p = percentile(values, q)
    assert p in values
    assert p is not None and p <= (percentile(values, min(100.0, q + 10)) or 0)


def test_the_report_counts_what_the_seed_asks_for() -> None:
    plans = [audit_line(i, decision="EXECUTE") for i in range(4)] + [audit_line(9, decision="SKIP")]
    results = [
        audit_line(10, plan_id="a", executed="true", latency_ms="8.0"),
        audit_line(11, plan_id="b", executed="false", error="permit_timeout", missing="Governor", latency_ms="1201"),
        audit_line(
            12, plan_id="c", executed="false", error="permit_timeout", missing="Governor,P3.3", latency_ms="1202"
        ),
        audit_line(13, plan_id="d", executed="false", error="permit_denied", latency_ms="4"),
        audit_line(14, plan_id="e", executed="false", error="skipped", latency_ms="1"),
    ]
    audit = [
        audit_line(20, plan_id="a", issuer="governor", decision="allow", reason="policy_passed"),
        audit_line(21, plan_id="a", issuer="p33", decision="allow", reason="sanity_checks_passed"),
        audit_line(
            22,
            plan_id="a",
            issuer="apply",
            decision="consumed",
            reason="governor",
            subject="governor",
            latency_ms="6.5",
        ),
        audit_line(23, plan_id="a", issuer="apply", decision="consumed", reason="p33", subject="p33", latency_ms="6.5"),
        audit_line(24, plan_id="d", issuer="governor", decision="deny", reason="kill_switch_on"),
        audit_line(25, plan_id="d", issuer="p33", decision="allow", reason="sanity_checks_passed"),
        audit_line(26, plan_id="b", issuer="apply", decision="rejected", reason="bad_signature", subject="governor"),
    ]
    ledger = [
        audit_line(30, symbol="BTCUSDT", before="none", after="0.010", source="reconcile"),
        audit_line(31, symbol="BTCUSDT", before="0.010", after="0.000", source="result"),
        audit_line(32, symbol="BTCUSDT", before="0.000", after="0.020", source="adopt"),
        audit_line(33, symbol="ETHUSDT", before="1.0", after="1.0", source="reconcile"),
        audit_line(34, symbol="ETHUSDT", before="1.0", after="0.5", source="reconcile"),
    ]
    events = [
        audit_line(40, service="apply", event="started"),
        audit_line(41, service="apply", event="started"),
        audit_line(42, service="brain", event="started"),
        audit_line(43, service="brain", event="stopped"),
    ]
    r = build_report(T0, T0 + 86400, plans=plans, results=results, audit=audit, ledger=ledger, service_events=events)
    assert (r.plans, r.plans_skipped, r.results, r.executed) == (5, 1, 5, 1)
    assert r.not_executed == {"permit_timeout": 2, "permit_denied": 1, "skipped": 1}
    assert r.timeouts_by_missing == {"Governor": 2, "P3.3": 1}
    assert (r.allows, r.denies, r.deny_allow_ratio) == (3, 1, 0.3333)
    assert r.denies_by_reason == {"governor: kill_switch_on": 1}
    assert r.rejected_permits == {"bad_signature": 1}
    assert r.wait_p50_ms == r.wait_p99_ms == 6.5  # one wait per plan (the Governor slot's line)
    assert [s["plan_id"] for s in r.slowest] == ["c", "b", "a", "d", "e"]
    assert [(d["symbol"], d["source"]) for d in r.drift_events] == [("BTCUSDT", "adopt"), ("ETHUSDT", "reconcile")]
    assert r.service_starts == {"apply": 2, "brain": 1}


def test_an_empty_period_reports_zeros_not_errors() -> None:
    r = build_report(T0, T0 + 60, plans=[], results=[], audit=[], ledger=[], service_events=[])
    assert r.plans == r.executed == r.allows == 0
    assert r.deny_allow_ratio is None and r.wait_p50_ms is None and r.slowest == []


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("24H", 86400), ("1.5d", 129600)]
)
def test_periods_are_a_number_and_a_unit(text: str, seconds: float) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "h", "1w", "-1h", "yesterday", "1 hour"])
def test_a_bad_period_says_what_is_accepted(text: str) -> None:
    with pytest.raises(OperatorError, match="90s, 15m, 1h"):
        parse_since(text)
