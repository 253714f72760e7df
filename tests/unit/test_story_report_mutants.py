"""Golden outputs of the operator's texts (domain/story, domain/report, domain/reasons), written to kill the
mutants `make mutation` left alive there (docs/mutation.md). A story line or a report field is what the operator
reads, so every one is compared exactly; the mutants each test kills are named in its docstring."""

from __future__ import annotations

from typing import Any

import pytest

from quantum_trader.domain import reasons
from quantum_trader.domain.report import build_report
from quantum_trader.domain.story import Entry, Event, entry_time, filter_decisions, percentile, plan_story

T0_MS = 1_800_000_000_000


def ms(n: int) -> float:
    """Epoch seconds of the n-th millisecond after T0, as entry_time computes it from a stream id."""
    return (T0_MS + n) / 1000


def line(n: int, **fields: str) -> Entry:
    """A stream entry with id T0+n ms (and no ``at`` field unless given)."""
    return (f"{T0_MS + n}-0", dict(fields))


def at(n: int) -> str:
    return str(ms(n))


# --- story: entry times -----------------------------------------------------------------------------------------


def test_only_a_finite_positive_at_field_overrides_the_stream_id() -> None:
    """entry_time: `isfinite(at) or at > 0` (mutant 10), `at >= 0` (12), `at > 1` (13); `rsplit` (20)."""
    entry_id = f"{T0_MS + 500}-0"
    assert entry_time(entry_id, {"at": "inf"}) == ms(500)
    assert entry_time(entry_id, {"at": "-5"}) == ms(500)
    assert entry_time(entry_id, {"at": "0"}) == ms(500)
    assert entry_time(entry_id, {"at": "0.5"}) == 0.5
    # only the part before the first dash is the milliseconds
    assert entry_time("1800000000500-0-7", {}) == 1800000000.5


# --- story: one plan's whole story --------------------------------------------------------------------------------

PLAN = {
    "plan_id": "p7",
    "symbol": "ETHUSDT",
    "side": "SHORT",
    "qty": "0.500",
    "decision": "EXECUTE",
    "reason": "ready",
    "created_at": at(10),
}
PROPOSAL = line(2, symbol="ETHUSDT", action="PARTIAL_CLOSE", qty="0.5", close_pct="50", kill_score="0.9")
AUDIT = [
    line(
        20,
        plan_id="p7",
        symbol="ETHUSDT",
        issuer="governor",
        decision="allow",
        reason="policy_passed",
        latency_ms="2.5",
        at=at(20),
    ),
    line(21, plan_id="p8", symbol="ETHUSDT", issuer="p33", decision="deny", reason="qty_mismatch", at=at(21)),
    # no `at` and no latency: the time comes from the id, the summary has no "after"
    line(30, plan_id="p7", symbol="ETHUSDT", issuer="p33", decision="allow", reason="sanity_checks_passed"),
    line(
        35,
        plan_id="p7",
        symbol="ETHUSDT",
        issuer="apply",
        decision="rejected",
        reason="bad_signature",
        subject="governor",
        at=at(35),
    ),
    line(
        40,
        plan_id="p7",
        symbol="ETHUSDT",
        issuer="apply",
        decision="consumed",
        reason="governor",
        subject="governor",
        latency_ms="38",
        at=at(40),
    ),
    # an older consumed line without `subject`: its reason names the slot
    line(41, plan_id="p7", symbol="ETHUSDT", issuer="apply", decision="consumed", reason="p33", at=at(41)),
    line(
        45,
        plan_id="p7",
        symbol="ETHUSDT",
        issuer="governor",
        decision="duplicate",
        reason="decided by governor-2",
        subject="governor-1",
        at=at(45),
    ),
]
RESULT = line(
    50,
    plan_id="p7",
    symbol="ETHUSDT",
    executed="true",
    filled_qty="0.500",
    avg_price="3000.5",
    order_id="99",
    client_order_id="qt-p7",
)
LEDGER = [
    line(60, plan_id="p7", symbol="ETHUSDT", before="-1.000", after="-0.500", source="result"),
    line(61, plan_id="p8", symbol="ETHUSDT", before="-0.500", after="0.000", source="result"),
    line(62, plan_id="", symbol="ETHUSDT", before="-0.500", after="-0.400", source="adopt"),
]


def rows(story: list[Event]) -> list[tuple[float, str, str, str]]:
    return [(e.at, e.step, e.actor, e.summary) for e in story]


def test_the_story_of_an_executed_plan_reads_exactly() -> None:
    """plan_story and _decision_event, every line and its detail: the proposal's summary (plan_story 12-40),
    its default actor (62, 63), the plan line (73-97), every event's detail (_decision_event 76, 81;
    plan_story 45-51, 105-111, 134, 139, 181, 186), an audit line without `at` (_decision_event 82,
    plan_story 119), a deny (_decision_event 34, 35), an allow without latency (40, 41), a consumed line
    without subject (49), a duplicate (70, 71)."""
    story = plan_story(PLAN, PROPOSAL, AUDIT, RESULT, LEDGER)
    assert rows(story) == [
        (ms(2), "proposal", "upstream", "PARTIAL_CLOSE ETHUSDT qty 0.5 50 %"),
        (ms(10), "plan", "apply", "EXECUTE SHORT 0.500 (ready)"),
        (ms(20), "decision", "governor", "ALLOW (policy_passed) after 2.5 ms"),
        (ms(30), "decision", "p33", "ALLOW (sanity_checks_passed)"),
        (ms(35), "rejected", "apply", "rejected the governor permit: bad_signature"),
        (ms(40), "consumed", "apply", "consumed the governor permit"),
        (ms(41), "consumed", "apply", "consumed the p33 permit"),
        (ms(45), "duplicate", "governor", "duplicate: decided by governor-2"),
        (ms(50), "result", "apply", "EXECUTED: filled 0.500 @ 3000.5 (order 99, qt-p7)"),
        (ms(60), "ledger", "p33", "ledger -1.000 -> -0.500 (result)"),
    ]
    own_audit = [f for _, f in AUDIT if f["plan_id"] == "p7"]
    assert [e.detail for e in story] == [PROPOSAL[1], PLAN, *own_audit, RESULT[1], LEDGER[0][1]]


def test_the_story_of_a_denied_plan_reads_exactly() -> None:
    """A DENY line (_decision_event 34, 35), the not-executed result with who denied (_result_summary 44-49),
    a proposal with neither qty nor close_pct but a source, a plan without reason (plan_story 94-97)."""
    plan = {"plan_id": "p9", "side": "LONG", "qty": "1", "decision": "EXECUTE", "created_at": at(5)}
    proposal = line(1, symbol="SOLUSDT", action="FULL_CLOSE", source="cli")
    audit = [
        line(6, plan_id="p9", issuer="governor", decision="deny", reason="kill_switch_on", latency_ms="1.2"),
        line(7, plan_id="p9", issuer="p33", decision="allow", reason="sanity_checks_passed", latency_ms="3"),
    ]
    result = line(
        9,
        plan_id="p9",
        executed="false",
        error="permit_denied",
        denied_by="governor",
        reason="kill_switch_on",
        exchange_code="0",
    )
    story = plan_story(plan, proposal, audit, result, [])
    assert rows(story) == [
        (ms(1), "proposal", "cli", "FULL_CLOSE SOLUSDT"),
        (ms(5), "plan", "apply", "EXECUTE LONG 1"),
        (ms(6), "decision", "governor", "DENY (kill_switch_on) after 1.2 ms"),
        (ms(7), "decision", "p33", "ALLOW (sanity_checks_passed) after 3 ms"),
        (ms(9), "result", "apply", "not executed: permit_denied by governor (kill_switch_on)"),
    ]


def test_missing_fields_read_as_question_marks_in_the_story() -> None:
    """The defaults of every field the story prints: _decision_event 3-22 and 30 (decision, issuer, reason,
    latency), 61-66 (a rejected line's subject); _result_summary 9-35 (an executed result's fields) and 38-43
    (a result's error); plan_story 13-26 (a proposal's action and symbol), 73-93 (a plan's decision, side,
    qty), 71 (no created_at), 156-175 (a ledger line's before, after, source)."""
    plan = {"plan_id": "p3"}
    audit = [
        line(3, plan_id="p3"),
        line(4, plan_id="p3", decision="rejected"),
        line(5, plan_id="p3", decision="allow"),
    ]
    story = plan_story(plan, line(1), audit, line(8, executed="true"), [line(9, plan_id="p3")])
    assert rows(story) == [
        (0.0, "plan", "apply", "?"),
        (ms(1), "proposal", "upstream", "? ?"),
        (ms(3), "?", "?", "?: "),
        (ms(4), "rejected", "?", "rejected the ? permit: "),
        (ms(5), "decision", "?", "ALLOW ()"),
        (ms(8), "result", "apply", "EXECUTED: filled ? @ ? (order ?, )"),
        (ms(9), "ledger", "p33", "ledger ? -> ? (?)"),
    ]
    (failed,) = plan_story({}, None, [], line(8, executed="false", exchange_code=""), [])
    assert failed.summary == "not executed: ?"
    # a plan with a decision and qty but no side keeps the gap between them
    (skip,) = plan_story({"decision": "SKIP", "qty": "0"}, None, [], None, [])
    assert skip.summary == "SKIP  0"


def test_a_consumed_line_names_its_slot_by_subject_before_reason() -> None:
    """_decision_event 50-52: `subject` names the slot; `reason` only stands in when there is none."""
    audit = [line(1, plan_id="p1", issuer="apply", decision="consumed", subject="p33", reason="governor")]
    story = plan_story({"plan_id": "p1"}, None, audit, None, [])
    assert [(e.step, e.summary) for e in story] == [("plan", "?"), ("consumed", "consumed the p33 permit")]


def test_a_plan_without_id_keeps_only_lines_with_an_empty_plan_id() -> None:
    """plan_story 3, 5, 8: a plan without plan_id matches lines whose plan_id is "", not lines without one."""
    audit = [line(1, plan_id="", decision="allow", issuer="governor"), line(2, decision="deny", issuer="p33")]
    ledger = [line(3, plan_id="", before="1", after="0", source="result"), line(4, before="2", after="1")]
    story = plan_story({"decision": "SKIP"}, None, audit, None, ledger)
    assert [(e.step, e.actor, e.summary) for e in story] == [
        ("plan", "apply", "SKIP"),
        ("decision", "governor", "ALLOW ()"),
        ("ledger", "p33", "ledger 1 -> 0 (result)"),
    ]


def test_events_of_the_same_millisecond_keep_the_chains_order() -> None:
    """plan_story 197, 198 (the proposal loses its rank), 209-211 (None ranks cannot be compared)."""
    plan = {"plan_id": "p1", "decision": "EXECUTE", "created_at": at(0)}
    audit = [line(0, plan_id="p1", issuer="governor", decision="allow", reason="policy_passed", at=at(0))]
    result = line(0, plan_id="p1", executed="false", error="permit_timeout", missing="p33")
    story = plan_story(plan, line(0, action="FULL_CLOSE", symbol="BTCUSDT"), audit, result, [])
    assert [(e.at, e.step) for e in story] == [
        (ms(0), "proposal"),
        (ms(0), "plan"),
        (ms(0), "decision"),
        (ms(0), "result"),
    ]


def test_exchange_codes_0_and_empty_are_not_shown() -> None:
    """_result_summary 66 ("" dropped from the exclusions), 67 ("0" dropped)."""
    for code in ("", "0"):
        result = line(1, executed="false", error="exchange_rejected", exchange_code=code)
        (event,) = plan_story({}, None, [], result, [])
        assert event.summary == "not executed: exchange_rejected"
    (event,) = plan_story({}, None, [], line(1, executed="false", error="exchange_rejected", exchange_code="-1"), [])
    assert event.summary == "not executed: exchange_rejected code -1"


def test_an_empty_filter_matches_entries_without_that_field() -> None:
    """filter_decisions 7-36: a missing field reads as "" (None would crash, "XXXX" would not match)."""
    entries = [line(1, plan_id="a"), line(2, plan_id="b", symbol="BTCUSDT", issuer="p33", decision="deny")]
    assert filter_decisions(entries, symbol="") == [entries[0]]
    assert filter_decisions(entries, issuer="") == [entries[0]]
    assert filter_decisions(entries, decision="") == [entries[0]]


def test_percentile_ranks_are_nearest_rank_exactly() -> None:
    """percentile 9 (`max(2, ...)`), 13 (`q / 101`)."""
    assert percentile([3.0, 1.0, 2.0], 10) == 1.0
    assert percentile([float(v) for v in range(1, 102)], 100) == 101.0


# --- report: a day of entries -------------------------------------------------------------------------------------


def day() -> dict[str, list[Entry]]:
    plans = [line(i, decision="EXECUTE") for i in range(3)] + [line(3, decision="SKIP"), line(4, decision="SKIP")]
    results = [
        line(100, plan_id="a", symbol="BTCUSDT", executed="true", latency_ms="12.5"),
        line(
            101,
            plan_id="b",
            symbol="ETHUSDT",
            executed="false",
            error="permit_timeout",
            missing="governor, p33",
            latency_ms="1500",
        ),
        line(102, plan_id="c", symbol="ETHUSDT", executed="false", error="permit_timeout", latency_ms="1499"),
        line(103, plan_id="d", symbol="SOLUSDT", executed="false", error="permit_denied", latency_ms="0.5"),
        line(104, executed="false"),  # no plan_id, symbol, error or latency
        line(105, plan_id="f", symbol="BTCUSDT", executed="false", error="skipped", latency_ms=""),
    ]
    audit = [
        line(200, plan_id="a", issuer="governor", decision="allow", reason="policy_passed"),
        line(201, plan_id="a", issuer="p33", decision="allow", reason="sanity_checks_passed"),
        line(
            202,
            plan_id="a",
            issuer="apply",
            decision="consumed",
            reason="governor",
            subject="governor",
            latency_ms="20",
        ),
        line(203, plan_id="a", issuer="apply", decision="consumed", reason="p33", subject="p33", latency_ms="21"),
        line(204, plan_id="d", issuer="governor", decision="deny", reason="kill_switch_on"),
        line(205, plan_id="d", issuer="p33", decision="allow", reason="sanity_checks_passed"),
        line(206, plan_id="x", decision="deny"),  # neither issuer nor reason
        line(207, plan_id="e", issuer="operator", decision="deny", reason="operator_deny"),
        line(208, plan_id="g", issuer="governor", decision="deny", reason="kill_switch_on"),
        line(209, plan_id="b", issuer="apply", decision="rejected", reason="bad_signature", subject="governor"),
        line(210, plan_id="c", issuer="apply", decision="rejected", subject="p33"),
        # consumed lines naming the Governor slot by subject only, and by reason only (older lines)
        line(211, plan_id="h", issuer="apply", decision="consumed", subject="governor", latency_ms="30"),
        line(212, plan_id="i", issuer="apply", decision="consumed", reason="governor", latency_ms="40"),
        line(213, plan_id="a", issuer="governor", decision="duplicate", reason="decided by governor-2"),
    ]
    ledger = [
        line(300, symbol="BTCUSDT", before="none", after="0.010", source="reconcile"),
        line(301, symbol="BTCUSDT", before="0.010", after="0.000", source="result"),
        line(302, symbol="BTCUSDT", before="0.000", after="0.020", source="adopt", at="1800000009.5"),
        line(303, symbol="ETHUSDT", before="1.0", after="1.0", source="reconcile"),
        line(304, symbol="ETHUSDT", before="1.0", after="0.5", source="reconcile"),
        line(305, before="2", source="reconcile"),  # no symbol, no after
        line(306, symbol="SOLUSDT", after="3", source="reconcile"),  # no before
        line(307, symbol="XRPUSDT", before="", after="1", source="reconcile"),  # empty before: a first reconcile
        line(308, symbol="XRPUSDT", source="adopt"),  # neither: nothing to compare
    ]
    events = [
        line(400, service="apply", event="started"),
        line(401, service="apply", event="started"),
        line(402, service="brain", event="started"),
        line(403, service="brain", event="stopped"),
        line(404, event="started"),
    ]
    return {"plans": plans, "results": results, "audit": audit, "ledger": ledger, "service_events": events}


EXPECTED_DAY: dict[str, Any] = {
    "since": 1_800_000_000.0,
    "until": 1_800_086_400.0,
    "plans": 5,
    "plans_skipped": 2,
    "results": 6,
    "executed": 1,
    "not_executed": {"permit_timeout": 2, "permit_denied": 1, "?": 1, "skipped": 1},
    "timeouts_by_missing": {"governor": 1, "p33": 1, "?": 1},
    "allows": 3,
    "denies": 4,
    "deny_allow_ratio": 1.3333,
    "denies_by_reason": {"governor: kill_switch_on": 2, "?: ?": 1, "operator: operator_deny": 1},
    "rejected_permits": {"bad_signature": 1, "?": 1},
    "wait_p50_ms": 30.0,
    "wait_p99_ms": 40.0,
    "result_p50_ms": 12.5,
    "result_p99_ms": 1500.0,
    "slowest": [
        {"plan_id": "b", "symbol": "ETHUSDT", "outcome": "permit_timeout", "latency_ms": 1500.0},
        {"plan_id": "c", "symbol": "ETHUSDT", "outcome": "permit_timeout", "latency_ms": 1499.0},
        {"plan_id": "a", "symbol": "BTCUSDT", "outcome": "executed", "latency_ms": 12.5},
        {"plan_id": "d", "symbol": "SOLUSDT", "outcome": "permit_denied", "latency_ms": 0.5},
        {"plan_id": "", "symbol": "", "outcome": "?", "latency_ms": None},
    ],
    "drift_events": [
        {"at": "1800000009.500", "symbol": "BTCUSDT", "before": "0.000", "after": "0.020", "source": "adopt"},
        {"at": "1800000000.304", "symbol": "ETHUSDT", "before": "1.0", "after": "0.5", "source": "reconcile"},
        {"at": "1800000000.305", "symbol": "", "before": "2", "after": "", "source": "reconcile"},
        {"at": "1800000000.306", "symbol": "SOLUSDT", "before": "", "after": "3", "source": "reconcile"},
    ],
    "service_starts": {"apply": 2, "brain": 1, "?": 1},
    "kept_locally": {},  # set by views/trail.py from the journals, not by build_report
    "journal_unreadable": {},
}


def test_a_days_report_has_exactly_these_fields() -> None:
    """build_report, every field: since/until (2, 3), a result without error (33) or missing (53), the result
    latencies (57-64, 68, 69; _num 2: a result without latency), the slowest list (88-133), denies without
    issuer or reason (165-177), a rejection without reason (188-193), which consumed lines carry a plan's wait
    (203-216), the drift list (237-269, 297), a start without service (302-307); Report.as_dict."""
    r = build_report(1_800_000_000.0, 1_800_086_400.0, **day())
    assert r.as_dict() == EXPECTED_DAY
    # the counted tables print most frequent first; ties in the order they first appeared
    assert list(r.denies_by_reason) == list(EXPECTED_DAY["denies_by_reason"])
    assert list(r.timeouts_by_missing) == list(EXPECTED_DAY["timeouts_by_missing"])
    assert list(r.service_starts) == list(EXPECTED_DAY["service_starts"])


def test_the_reports_percentiles_are_the_50th_and_99th() -> None:
    """build_report 68, 73 (result latency p51, p100) and 230, 235 (wait p51, p100): 100 values tell them apart."""
    results = [line(n, plan_id=f"p{n}", executed="true", latency_ms=str(n)) for n in range(1, 101)]
    audit = [
        line(n, plan_id=f"p{n}", decision="consumed", subject="governor", latency_ms=str(n)) for n in range(1, 101)
    ]
    r = build_report(0.0, 1.0, plans=[], results=results, audit=audit, ledger=[], service_events=[])
    assert (r.result_p50_ms, r.result_p99_ms) == (50.0, 99.0)
    assert (r.wait_p50_ms, r.wait_p99_ms) == (50.0, 99.0)


# --- reasons ------------------------------------------------------------------------------------------------------


def test_a_reason_is_registered_once_with_its_issuers_split() -> None:
    """reasons._r 1-18 (they run at import, before any mutant is active: only a direct call reaches them)."""
    code = "test_only_reason"
    try:
        assert reasons._r(code, "deny", "governor,p33", "m", "c", "a") == code
        assert reasons.REGISTRY[code] == reasons.Reason(code, "deny", ("governor", "p33"), "m", "c", "a")
        with pytest.raises(ValueError, match=r"^reason code test_only_reason defined twice$"):
            reasons._r(code, "allow", "apply", "m2", "c2", "a2")
        assert reasons.REGISTRY[code].meaning == "m"
    finally:
        reasons.REGISTRY.pop(code, None)


def test_explain_finds_a_code_or_nothing() -> None:
    """reasons.explain 1."""
    found = reasons.explain("kill_switch_on")
    assert found is not None and (found.code, found.kind, found.issuers) == ("kill_switch_on", "deny", ("governor",))
    assert reasons.explain("no_such_code") is None
