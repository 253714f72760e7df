"""The independent oracle (domain/oracle.py): every kind of finding is detected, and a clean run has none.

Permits are real: built as the issuers build them and HMAC-signed with domain/permits.py ``sign()``.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from quantum_trader.domain import oracle
from quantum_trader.domain.models import GovernorPermit, P33Permit, Plan, Proposal, to_fields
from quantum_trader.domain.oracle import IssuerKeys, check, check_orders, check_results, plan_hash_of
from quantum_trader.domain.permits import encode_permit, sign
from quantum_trader.domain.planning import PlanningContext, make_plan, plan_id_for

NOW = 1_700_000_000.0
KEYS = IssuerKeys(governor=b"governor-test-key-0123456789", p33=b"p33-test-key-0123456789")


def a_plan(n: int = 1, symbol: str = "BTCUSDT", position: str = "0.5") -> Plan:
    proposal = Proposal(proposal_id=f"prop-{n}", symbol=symbol, action="FULL_CLOSE")
    ctx = PlanningContext(frozenset({"BTCUSDT", "ETHUSDT"}), Decimal(position))
    return make_plan(proposal, ctx, plan_id_for(f"prop-{n}"), NOW - 0.5)


PLAN = a_plan()


def governor_raw(plan: Plan = PLAN, key: bytes = KEYS.governor, **changes: Any) -> str:
    permit = GovernorPermit(
        granted=True,
        plan_id=plan.plan_id,
        plan_hash=plan.plan_hash,
        issuer="governor",
        reason="policy_passed",
        created_at=NOW - 0.2,
    )
    return encode_permit(sign(msgspec.structs.replace(permit, **changes), key)).decode()


def p33_raw(plan: Plan = PLAN, key: bytes = KEYS.p33, **changes: Any) -> str:
    permit = P33Permit(
        allow=True,
        symbol=plan.symbol,
        safe_close_qty=plan.qty,
        exchange_position_amt=plan.qty,
        ledger_amt=plan.qty,
        created_at=NOW - 0.1,
        reason="sanity_checks_passed",
        plan_id=plan.plan_id,
        plan_hash=plan.plan_hash,
        issuer="p33",
    )
    return encode_permit(sign(msgspec.structs.replace(permit, **changes), key)).decode()


def tampered(raw: str, **changes: Any) -> str:
    doc = msgspec.json.decode(raw)
    doc.update(changes)
    return msgspec.json.encode(doc).decode()


def consumed(slot: str, raw: str | None, plan: Plan = PLAN, at: float = NOW) -> dict[str, str]:
    line = {
        "plan_id": plan.plan_id,
        "issuer": "apply",
        "decision": "consumed",
        "reason": slot,
        "subject": slot,
        "at": repr(at),
        "symbol": plan.symbol,
    }
    if raw is not None:
        line["permit"] = raw
    return line


def an_order(plan: Plan = PLAN, qty: str = "0.500", order_id: int = 1, **changes: Any) -> dict[str, Any]:
    order = {
        "orderId": order_id,
        "symbol": plan.symbol,
        "clientOrderId": f"qt-{plan.proposal_id}",
        "side": "SELL",  # closes the long
        "origQty": qty,
        "executedQty": qty,
        "status": "FILLED",
        "reduceOnly": True,
    }
    return {**order, **changes}


def a_result(plan: Plan = PLAN, executed: bool = True, filled: str = "0.500") -> dict[str, str]:
    return {
        "plan_id": plan.plan_id,
        "symbol": plan.symbol,
        "side": plan.side,
        "executed": "true" if executed else "false",
        "filled_qty": filled if executed else "0",
        "error": "" if executed else "permit_timeout",
    }


def run(
    *,
    orders: list[dict[str, Any]] | None = None,
    audit: list[dict[str, str]] | None = None,
    plans: list[dict[str, str]] | None = None,
    results: list[dict[str, str]] | None = None,
    expected: tuple[str, ...] = (PLAN.plan_id,),
    ttl_s: float | None = None,
) -> oracle.Findings:
    return check(
        [an_order()] if orders is None else orders,
        [consumed("governor", governor_raw()), consumed("p33", p33_raw())] if audit is None else audit,
        [to_fields(PLAN)] if plans is None else plans,
        [a_result()] if results is None else results,
        KEYS,
        expected=expected,
        ttl_s=ttl_s,
    )


def only(findings: oracle.Findings, kind: str, n: int = 1) -> None:
    assert findings.broken == {kind: n}, findings.describe()
    assert len(findings.examples[kind]) == n


def test_the_plan_hash_is_recomputed_as_apply_computes_it() -> None:
    assert plan_hash_of(to_fields(PLAN)) == PLAN.plan_hash
    assert plan_hash_of({**to_fields(PLAN), "qty": "5"}) != PLAN.plan_hash


def test_a_clean_run_has_no_findings_and_every_order_was_verified() -> None:
    findings = run(ttl_s=60.0)
    assert findings.ok and findings.counts == dict.fromkeys(oracle.KINDS, 0)
    assert (findings.orders_checked, findings.orders_verified, findings.plans_checked) == (1, 1, 1)


def test_an_operator_grant_in_the_governor_slot_is_valid() -> None:
    findings = run(audit=[consumed("governor", governor_raw(issuer="operator")), consumed("p33", p33_raw())])
    assert findings.ok and findings.orders_verified == 1


def test_a_plan_published_again_after_a_loss_is_verified_against_either_hash() -> None:
    again = msgspec.structs.replace(PLAN, created_at=NOW + 5)
    again = msgspec.structs.replace(again, plan_hash=plan_hash_of(to_fields(again)))
    audit = [
        consumed("governor", governor_raw(again)),  # the permits of the second publication
        consumed("p33", p33_raw(again)),
    ]
    findings = run(plans=[to_fields(PLAN), to_fields(again)], audit=audit)
    assert findings.ok and findings.orders_verified == 1


BAD_PERMITS: dict[str, Callable[[], tuple[str | None, str | None]]] = {
    "governor tampered after signing (bad MAC)": lambda: (tampered(governor_raw(granted=False), granted=True), None),
    "governor unsigned": lambda: (tampered(governor_raw(), sig=""), None),
    "governor signed with an attacker's key": lambda: (governor_raw(key=b"attacker"), None),
    "governor signed with the P3.3 key": lambda: (governor_raw(key=KEYS.p33), None),
    "governor permit for another plan": lambda: (governor_raw(a_plan(2)), None),
    "governor wrong plan hash, genuinely signed": lambda: (governor_raw(plan_hash="0" * 64), None),
    "governor wrong issuer": lambda: (governor_raw(issuer="apply"), None),
    "governor a deny": lambda: (governor_raw(granted=False), None),
    "governor not JSON": lambda: ("\x00not json", None),
    "p33 tampered safe_close_qty (bad MAC)": lambda: (None, tampered(p33_raw(), safe_close_qty="5")),
    "p33 signed with the Governor key": lambda: (None, p33_raw(key=KEYS.governor)),
    "p33 wrong plan hash": lambda: (None, p33_raw(plan_hash="1" * 64)),
    "p33 issued by the governor": lambda: (None, p33_raw(issuer="governor")),
    "p33 a deny": lambda: (None, p33_raw(allow=False)),
    "p33 for another symbol": lambda: (None, p33_raw(symbol="ETHUSDT")),
}


@pytest.mark.parametrize("case", sorted(BAD_PERMITS))
def test_an_order_whose_consumed_permit_does_not_verify_is_found(case: str) -> None:
    gov, p33 = BAD_PERMITS[case]()
    audit = [consumed("governor", gov or governor_raw()), consumed("p33", p33 or p33_raw())]
    findings = run(audit=audit)
    only(findings, oracle.ORDERS_WITHOUT_VERIFIED_PERMITS)
    assert findings.orders_verified == 0


def test_the_systems_own_allow_and_consumed_lines_are_not_taken_for_proof() -> None:
    """Lines saying allow and consumed, but the consumed bytes are a forgery: an order without valid permits."""
    says_so = [
        {"plan_id": PLAN.plan_id, "issuer": "governor", "decision": "allow", "reason": "policy_passed"},
        {"plan_id": PLAN.plan_id, "issuer": "p33", "decision": "allow", "reason": "sanity_checks_passed"},
        consumed("governor", governor_raw(key=b"attacker")),
        consumed("p33", p33_raw()),
    ]
    only(run(audit=says_so), oracle.ORDERS_WITHOUT_VERIFIED_PERMITS)


@pytest.mark.parametrize(
    "audit",
    [
        [consumed("p33", p33_raw())],  # no Governor consumption at all
        [consumed("governor", governor_raw())],  # no P3.3 consumption
        [consumed("governor", None), consumed("p33", p33_raw())],  # a consumed line without the permit's bytes
        [],
    ],
    ids=["no_governor", "no_p33", "no_permit_bytes", "nothing"],
)
def test_an_order_with_a_missing_permit_is_found(audit: list[dict[str, str]]) -> None:
    only(run(audit=audit), oracle.ORDERS_WITHOUT_VERIFIED_PERMITS)


def test_permits_of_two_different_publications_do_not_make_a_pair() -> None:
    again = msgspec.structs.replace(PLAN, created_at=NOW + 5)
    again = msgspec.structs.replace(again, plan_hash=plan_hash_of(to_fields(again)))
    audit = [consumed("governor", governor_raw(PLAN)), consumed("p33", p33_raw(again))]
    findings = run(plans=[to_fields(PLAN), to_fields(again)], audit=audit)
    only(findings, oracle.ORDERS_WITHOUT_VERIFIED_PERMITS)
    assert "different plan hashes" in findings.examples[oracle.ORDERS_WITHOUT_VERIFIED_PERMITS][0]


@pytest.mark.parametrize(
    "plans",
    [
        [],  # never published
        [{**to_fields(PLAN), "qty": "5.0"}],  # the record was altered: its hash no longer matches its fields
        [{**to_fields(PLAN), "decision": "SKIP"}],  # not an executing plan
    ],
    ids=["unpublished", "altered_record", "skip_plan"],
)
def test_an_order_for_no_valid_published_plan_is_found(plans: list[dict[str, str]]) -> None:
    only(run(plans=plans), oracle.ORDERS_WITHOUT_VERIFIED_PERMITS)


def test_an_order_that_is_no_plans_order_is_found() -> None:
    stray = an_order(clientOrderId="manual-1")
    findings = check_orders([stray], [], [], KEYS)
    only(findings, oracle.ORDERS_WITHOUT_VERIFIED_PERMITS)


def test_a_permit_expired_when_consumed_is_found_when_a_ttl_is_given() -> None:
    audit = [consumed("governor", governor_raw(created_at=NOW - 3600)), consumed("p33", p33_raw())]
    assert run(audit=audit).ok  # without a ttl, age is not judged
    only(run(audit=audit, ttl_s=60.0), oracle.ORDERS_WITHOUT_VERIFIED_PERMITS)


def test_an_executed_quantity_above_the_safe_close_is_found() -> None:
    findings = run(
        audit=[consumed("governor", governor_raw()), consumed("p33", p33_raw(safe_close_qty=Decimal("0.1")))],
        orders=[an_order(qty="0.500")],
    )
    only(findings, oracle.QTY_ABOVE_SAFE_CLOSE)
    assert findings.orders_verified == 1  # the permits are genuine: only the quantity is wrong
    assert "0.500 > safe_close_qty 0.1" in findings.examples[oracle.QTY_ABOVE_SAFE_CLOSE][0]


@pytest.mark.parametrize("changes", [{"side": "BUY"}, {"symbol": "ETHUSDT"}], ids=["side", "symbol"])
def test_an_order_unlike_its_plan_is_found(changes: dict[str, str]) -> None:
    findings = check_orders(
        [{**an_order(), **changes}],
        [consumed("governor", governor_raw()), consumed("p33", p33_raw())],
        [to_fields(PLAN)],
        KEYS,
    )
    # another symbol also fails the P3.3 permit's symbol: the order has no valid permits for what it did
    kind = oracle.ORDERS_UNLIKE_PLAN if "side" in changes else oracle.ORDERS_WITHOUT_VERIFIED_PERMITS
    only(findings, kind)


def test_a_second_order_for_one_client_order_id_is_found() -> None:
    twice = [an_order(qty="0.250", order_id=1), an_order(qty="0.250", order_id=2)]
    findings = run(orders=twice)
    assert findings.counts[oracle.DUPLICATE_ORDERS] == 1, findings.describe()
    assert findings.examples[oracle.DUPLICATE_ORDERS] == [f"qt-{PLAN.proposal_id}: 2 orders"]


@pytest.mark.parametrize("n", [0, 2])
def test_a_plan_without_exactly_one_result_is_found(n: int) -> None:
    findings = run(results=[a_result()] * n)
    assert findings.counts[oracle.PLANS_WITHOUT_ONE_RESULT] == 1, findings.describe()
    assert findings.examples[oracle.PLANS_WITHOUT_ONE_RESULT] == [f"{PLAN.plan_id}: {n} results"]


def test_a_plan_with_an_order_needs_its_result_even_when_not_expected() -> None:
    findings = check_results([an_order()], [], expected=())
    only(findings, oracle.PLANS_WITHOUT_ONE_RESULT)


@pytest.mark.parametrize(
    ("orders", "result"),
    [
        ([an_order()], a_result(filled="0.250")),  # executed, another quantity than the exchange's
        ([an_order()], a_result(executed=False)),  # not executed, yet the order filled
        ([], a_result()),  # executed without an order
        ([an_order(qty="0", status="EXPIRED")], a_result(filled="0")),  # "executed" with nothing filled
    ],
    ids=["other_qty", "filled_not_executed", "no_order", "nothing_filled"],
)
def test_a_last_result_that_disagrees_with_the_exchange_is_found(
    orders: list[dict[str, Any]], result: dict[str, str]
) -> None:
    only(check_results(orders, [result], expected=[PLAN.plan_id]), oracle.RESULTS_DISAGREEING)


def test_only_the_last_result_of_a_plan_is_judged_against_the_exchange() -> None:
    findings = check_results([an_order()], [a_result(executed=False), a_result()], expected=[PLAN.plan_id])
    only(findings, oracle.PLANS_WITHOUT_ONE_RESULT)  # two results: that is found; the last one agrees


def test_a_plan_that_did_not_execute_and_has_no_order_agrees() -> None:
    findings = check_results([], [a_result(executed=False)], expected=[PLAN.plan_id])
    assert findings.ok and findings.plans_checked == 1


def test_findings_merge_and_keep_at_most_ten_examples() -> None:
    many = oracle.Findings()
    for n in range(15):
        many.add(oracle.DUPLICATE_ORDERS, f"qt-{n}")
    merged = oracle.Findings().merge(many).merge(many)
    assert merged.counts[oracle.DUPLICATE_ORDERS] == 30
    assert len(merged.examples[oracle.DUPLICATE_ORDERS]) == oracle.MAX_EXAMPLES


def test_an_order_whose_fill_is_unreadable_counts_as_no_fill() -> None:
    """The simulator's own list is the evidence: a fill it cannot read is no fill, so a result that says
    executed disagrees with it."""
    found = run(orders=[an_order(executedQty="lots")])
    assert found.broken == {"results_disagreeing": 1} and found.orders_verified == 1, found.describe()


def test_a_consumed_line_with_an_unreadable_time_still_proves_its_permit() -> None:
    """The consumption time only bounds the permit's age; the permit's own signature is the proof."""
    line = consumed("governor", governor_raw())
    line["at"] = "soon"
    found = run(audit=[line, consumed("p33", p33_raw())], ttl_s=60)
    assert found.ok and found.orders_verified == 1, found.describe()
