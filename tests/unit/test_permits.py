"""Permits: signing, Apply's verification of each slot, and how the two slots combine."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.domain import reasons
from quantum_trader.domain.models import GovernorPermit, P33Permit, Plan, Proposal
from quantum_trader.domain.permits import (
    SLOT_NAMES,
    SlotCheck,
    WaitOutcome,
    check_slot,
    combine,
    encode_permit,
    sign,
)
from quantum_trader.domain.planning import PlanningContext, make_plan, plan_id_for

NOW = 1_700_000_000.0
TTL = 60.0
KEYS = {"governor": b"governor-test-key-0123456789", "p33": b"p33-test-key-0123456789"}


def make_test_plan(entry_id: str = "1700000000000-0", symbol: str = "BTCUSDT") -> Plan:
    proposal_id = f"prop-{entry_id}"  # a plan of its own per entry id given
    proposal = Proposal(proposal_id=proposal_id, symbol=symbol, action="FULL_CLOSE")
    ctx = PlanningContext(frozenset({"BTCUSDT", "ETHUSDT"}), Decimal("0.5"))
    return make_plan(proposal, ctx, plan_id_for(proposal_id), NOW - 0.5)


PLAN = make_test_plan()


def gov_permit(plan: Plan = PLAN, **changes: Any) -> GovernorPermit:
    values: dict[str, Any] = {
        "granted": True,
        "plan_id": plan.plan_id,
        "plan_hash": plan.plan_hash,
        "issuer": "governor",
        "reason": reasons.POLICY_PASSED,
        "created_at": NOW,
    }
    values.update(changes)
    return GovernorPermit(**values)


def p33_permit(plan: Plan = PLAN, **changes: Any) -> P33Permit:
    values: dict[str, Any] = {
        "allow": True,
        "symbol": plan.symbol,
        "safe_close_qty": 0.5,
        "exchange_position_amt": 0.5,
        "ledger_amt": 0.5,
        "created_at": NOW,
        "reason": reasons.SANITY_CHECKS_PASSED,
        "plan_id": plan.plan_id,
        "plan_hash": plan.plan_hash,
        "issuer": "p33",
    }
    values.update(changes)
    return P33Permit(**values)


def signed(permit: GovernorPermit | P33Permit, key: bytes | None = None) -> bytes:
    slot = "governor" if isinstance(permit, GovernorPermit) else "p33"
    return encode_permit(sign(permit, key if key is not None else KEYS[slot]))


def check(slot: str, raw: bytes | None, plan: Plan = PLAN, now: float = NOW) -> SlotCheck:
    return check_slot(slot, raw, plan, KEYS[slot], now, TTL)  # type: ignore[arg-type]


def rejected_for(slot: str, raw: bytes, plan: Plan = PLAN, now: float = NOW) -> str:
    result = check(slot, raw, plan, now)
    assert result.state == "rejected"
    return result.reason


# --- sign / check round trip ------------------------------------------------------------------------------


def test_sign_sets_a_hex_sha256_mac() -> None:
    permit = sign(gov_permit(), KEYS["governor"])
    assert len(permit.sig) == 64
    int(permit.sig, 16)
    assert sign(gov_permit(), KEYS["governor"]).sig == permit.sig  # deterministic
    assert sign(gov_permit(), KEYS["p33"]).sig != permit.sig
    assert msgspec.structs.replace(permit, sig="") == gov_permit()  # nothing else changed


@pytest.mark.parametrize(("granted", "state"), [(True, "allow"), (False, "deny")])
@pytest.mark.parametrize("issuer", ["governor", "operator"])
def test_governor_slot_round_trip(granted: bool, state: str, issuer: str) -> None:
    permit = gov_permit(granted=granted, issuer=issuer, reason="because")
    raw = signed(permit)
    result = check("governor", raw)
    assert result.state == state
    assert result.reason == "because"
    assert result.raw == raw
    assert result.permit == sign(permit, KEYS["governor"])
    assert result.name == "Governor"


@pytest.mark.parametrize(("allow", "state"), [(True, "allow"), (False, "deny")])
def test_p33_slot_round_trip(allow: bool, state: str) -> None:
    permit = p33_permit(allow=allow, reason=reasons.QTY_MISMATCH, ledger_amt=None)
    result = check("p33", signed(permit))
    assert result.state == state
    assert result.reason == reasons.QTY_MISMATCH
    assert isinstance(result.permit, P33Permit)
    assert result.permit.safe_close_qty == 0.5
    assert result.name == "P3.3"


def test_missing_slot() -> None:
    for slot in ("governor", "p33"):
        result = check(slot, None)
        assert result.state == "missing"
        assert result.reason == ""


# --- rejections -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"null",
        b"[]",
        b"{}",
        b"\xff\xfe\x00",
        b'{"granted": true',
        b"1",
    ],
)
@pytest.mark.parametrize("slot", ["governor", "p33"])
def test_malformed_json(slot: str, raw: bytes) -> None:
    assert rejected_for(slot, raw) == reasons.MALFORMED_PERMIT


def _doc(permit: GovernorPermit | P33Permit) -> dict[str, Any]:
    return dict(json.loads(signed(permit)))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("granted", "yes"),
        ("granted", 1),
        ("plan_id", 12),
        ("plan_id", "NOT-A-PLAN-ID"),
        ("created_at", "now"),
        ("reason", ["a"]),
        ("issuer", "admin"),
        ("sig", None),
    ],
)
def test_wrong_types_in_governor_slot(field: str, value: Any) -> None:
    doc = _doc(gov_permit())
    doc[field] = value
    assert rejected_for("governor", json.dumps(doc).encode()) == reasons.MALFORMED_PERMIT


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("allow", "true"),
        ("symbol", "btcusdt"),
        ("safe_close_qty", "half"),  # a decimal string now (not a float): a string that is no number
        ("safe_close_qty", [0.5]),
        ("safe_close_qty", "-1.0"),
        ("ledger_amt", "x"),
        ("exchange_position_amt", None),
    ],
)
def test_wrong_types_in_p33_slot(field: str, value: Any) -> None:
    doc = _doc(p33_permit())
    doc[field] = value
    assert rejected_for("p33", json.dumps(doc).encode()) == reasons.MALFORMED_PERMIT


def test_missing_required_field() -> None:
    doc = _doc(gov_permit())
    del doc["granted"]
    assert rejected_for("governor", json.dumps(doc).encode()) == reasons.MALFORMED_PERMIT


@pytest.mark.parametrize("issuer", ["p33", "apply"])
def test_wrong_issuer_in_governor_slot(issuer: str) -> None:
    raw = signed(gov_permit(issuer=issuer), KEYS["governor"])
    result = check("governor", raw)
    assert (result.state, result.reason) == ("rejected", reasons.WRONG_ISSUER)
    assert result.permit is not None


@pytest.mark.parametrize("issuer", ["governor", "operator", "apply"])
def test_wrong_issuer_in_p33_slot(issuer: str) -> None:
    raw = signed(p33_permit(issuer=issuer), KEYS["p33"])
    assert rejected_for("p33", raw) == reasons.WRONG_ISSUER


def test_p33_permit_document_in_governor_slot_is_rejected() -> None:
    # A genuine P3.3 permit copied into the Governor slot does not even have the Governor permit's shape.
    assert rejected_for("governor", signed(p33_permit())) == reasons.MALFORMED_PERMIT
    assert rejected_for("p33", signed(gov_permit())) == reasons.MALFORMED_PERMIT


def test_signature_by_the_wrong_key() -> None:
    assert rejected_for("governor", signed(gov_permit(), KEYS["p33"])) == reasons.BAD_SIGNATURE
    assert rejected_for("p33", signed(p33_permit(), KEYS["governor"])) == reasons.BAD_SIGNATURE
    assert rejected_for("governor", signed(gov_permit(), b"")) == reasons.BAD_SIGNATURE


def test_unsigned_and_garbled_signatures() -> None:
    assert rejected_for("governor", encode_permit(gov_permit())) == reasons.BAD_SIGNATURE  # sig ""
    doc = _doc(gov_permit())
    del doc["sig"]
    assert rejected_for("governor", json.dumps(doc).encode()) == reasons.BAD_SIGNATURE
    doc = _doc(gov_permit())
    doc["sig"] = doc["sig"].upper()
    assert rejected_for("governor", json.dumps(doc).encode()) == reasons.BAD_SIGNATURE
    doc["sig"] = doc["sig"][:-2]
    assert rejected_for("governor", json.dumps(doc).encode()) == reasons.BAD_SIGNATURE


def test_non_ascii_signature_is_rejected() -> None:
    doc = _doc(gov_permit())
    doc["sig"] = "é" * 64
    assert rejected_for("governor", json.dumps(doc).encode()) == reasons.BAD_SIGNATURE


def test_extra_field_breaks_the_signature() -> None:
    doc = _doc(gov_permit())
    doc["note"] = "added later"
    assert rejected_for("governor", json.dumps(doc).encode()) == reasons.BAD_SIGNATURE


def test_reordered_keys_and_whitespace_still_verify() -> None:
    doc = _doc(p33_permit())
    raw = json.dumps(dict(reversed(list(doc.items()))), indent=2).encode()
    assert check("p33", raw).state == "allow"


_HEX16 = st.from_regex(r"[0-9a-f]{16}", fullmatch=True)
_TEXT = st.text(max_size=40)
_FLOAT = st.floats(allow_nan=False, allow_infinity=False, width=64)

_GOV_CHANGES: dict[str, st.SearchStrategy[Any]] = {
    "granted": st.booleans(),
    "plan_id": _HEX16,
    "plan_hash": _TEXT,
    "issuer": st.sampled_from(["governor", "operator"]),
    "reason": _TEXT,
    "created_at": _FLOAT,
}
_P33_CHANGES: dict[str, st.SearchStrategy[Any]] = {
    "allow": st.booleans(),
    "symbol": st.from_regex(r"[A-Z0-9]{5,20}", fullmatch=True),
    "safe_close_qty": st.floats(min_value=0, allow_infinity=False),
    "exchange_position_amt": _FLOAT,
    "ledger_amt": st.none() | _FLOAT,
    "created_at": _FLOAT,
    "reason": _TEXT,
    "plan_id": _HEX16,
    "plan_hash": _TEXT,
}


@given(data=st.data(), slot=st.sampled_from(["governor", "p33"]))
def test_tampering_with_any_field_is_a_bad_signature(data: st.DataObject, slot: str) -> None:
    permit: GovernorPermit | P33Permit = gov_permit() if slot == "governor" else p33_permit()
    changes = _GOV_CHANGES if slot == "governor" else _P33_CHANGES
    doc = _doc(permit)
    field = data.draw(st.sampled_from(sorted(changes)), label="field")
    value = data.draw(changes[field].filter(lambda v: v != doc[field]), label="value")
    doc[field] = value
    raw = msgspec.json.encode(doc)
    assert rejected_for(slot, raw) == reasons.BAD_SIGNATURE


def test_replay_onto_another_plan() -> None:
    other = make_test_plan("1700000000001-0")
    raw_gov = signed(gov_permit(PLAN))
    raw_p33 = signed(p33_permit(PLAN))
    assert check("governor", raw_gov).state == "allow"
    assert rejected_for("governor", raw_gov, other) == reasons.PLAN_MISMATCH
    assert rejected_for("p33", raw_p33, other) == reasons.PLAN_MISMATCH


def test_plan_hash_mismatch() -> None:
    changed = msgspec.structs.replace(PLAN, qty=Decimal("0.4"))
    changed = msgspec.structs.replace(changed, plan_hash="1" * 64)
    assert changed.plan_id == PLAN.plan_id
    assert rejected_for("governor", signed(gov_permit(PLAN)), changed) == reasons.PLAN_MISMATCH
    assert rejected_for("p33", signed(p33_permit(PLAN)), changed) == reasons.PLAN_MISMATCH
    assert rejected_for("governor", signed(gov_permit(plan_hash="0" * 64))) == reasons.PLAN_MISMATCH


def test_p33_symbol_mismatch() -> None:
    assert rejected_for("p33", signed(p33_permit(symbol="ETHUSDT"))) == reasons.PLAN_MISMATCH


@pytest.mark.parametrize(
    ("age", "expired"),
    [
        (0.0, False),
        (59.9, False),
        (60.0, False),  # exactly the ttl is still valid
        (60.001, True),
        (86_400.0, True),
        (-59.9, False),  # a little clock skew into the future is tolerated
        (-60.001, True),  # far future
        (-86_400.0, True),
    ],
)
@pytest.mark.parametrize("slot", ["governor", "p33"])
def test_expiry(slot: str, age: float, expired: bool) -> None:
    permit = gov_permit(created_at=NOW - age) if slot == "governor" else p33_permit(created_at=NOW - age)
    result = check(slot, signed(permit))
    if expired:
        assert (result.state, result.reason) == ("rejected", reasons.EXPIRED_PERMIT)
    else:
        assert result.state == "allow"


def test_rejection_order() -> None:
    # A permit that is wrong in every way is reported by the first check that fails.
    old_other = gov_permit(make_test_plan("9-9"), created_at=NOW - 10_000, issuer="p33")
    assert rejected_for("governor", signed(old_other, KEYS["p33"])) == reasons.WRONG_ISSUER
    old_other = gov_permit(make_test_plan("9-9"), created_at=NOW - 10_000)
    assert rejected_for("governor", signed(old_other, KEYS["p33"])) == reasons.BAD_SIGNATURE
    assert rejected_for("governor", signed(old_other)) == reasons.PLAN_MISMATCH
    assert rejected_for("governor", signed(gov_permit(created_at=NOW - 10_000))) == reasons.EXPIRED_PERMIT


# --- combine ----------------------------------------------------------------------------------------------

STATES = ("missing", "rejected", "allow", "deny")


def slot(name: str, state: str, reason: str = "") -> SlotCheck:
    return SlotCheck(name, state, reason)  # type: ignore[arg-type]


def test_slot_names_are_the_seed_words() -> None:
    assert SLOT_NAMES == {"governor": "Governor", "p33": "P3.3"}


@pytest.mark.parametrize("other", STATES)
def test_deny_wins_immediately(other: str) -> None:
    outcome = combine(slot("governor", "deny", "kill_switch_on"), slot("p33", other, "x" if other == "deny" else ""))
    assert outcome.kind == "denied"
    assert outcome.missing == ()
    if other == "deny":
        assert outcome.denied_by == ("Governor", "P3.3")
        assert outcome.deny_reason == "kill_switch_on,x"
    else:
        assert outcome.denied_by == ("Governor",)
        assert outcome.deny_reason == "kill_switch_on"
    outcome = combine(slot("governor", other), slot("p33", "deny", "stale_snapshot"))
    assert outcome.kind == "denied"
    assert "P3.3" in outcome.denied_by


def test_combine_truth_table() -> None:
    table = {
        ("allow", "allow"): WaitOutcome("ready"),
        ("allow", "missing"): WaitOutcome("waiting", missing=("P3.3",)),
        ("allow", "rejected"): WaitOutcome("waiting", missing=("P3.3",)),
        ("missing", "allow"): WaitOutcome("waiting", missing=("Governor",)),
        ("rejected", "allow"): WaitOutcome("waiting", missing=("Governor",)),
        ("missing", "missing"): WaitOutcome("waiting", missing=("Governor", "P3.3")),
        ("rejected", "rejected"): WaitOutcome("waiting", missing=("Governor", "P3.3")),
        ("missing", "rejected"): WaitOutcome("waiting", missing=("Governor", "P3.3")),
        ("deny", "allow"): WaitOutcome("denied", denied_by=("Governor",), deny_reason="r1"),
        ("allow", "deny"): WaitOutcome("denied", denied_by=("P3.3",), deny_reason="r2"),
        ("missing", "deny"): WaitOutcome("denied", denied_by=("P3.3",), deny_reason="r2"),
        ("deny", "deny"): WaitOutcome("denied", denied_by=("Governor", "P3.3"), deny_reason="r1,r2"),
    }
    for (gov, p33), expected in table.items():
        gov_reason = "r1" if gov == "deny" else ""
        p33_reason = "r2" if p33 == "deny" else ""
        assert combine(slot("governor", gov, gov_reason), slot("p33", p33, p33_reason)) == expected, (gov, p33)


@given(gov=st.sampled_from(STATES), p33=st.sampled_from(STATES))
def test_ready_iff_both_allow(gov: str, p33: str) -> None:
    outcome = combine(slot("governor", gov), slot("p33", p33))
    assert (outcome.kind == "ready") == (gov == "allow" and p33 == "allow")
    assert (outcome.kind == "denied") == ("deny" in (gov, p33))
    if outcome.kind == "waiting":
        names = {"Governor"} if gov != "allow" else set()
        names |= {"P3.3"} if p33 != "allow" else set()
        assert set(outcome.missing) == names


def test_end_to_end_two_valid_permits_are_ready() -> None:
    gov = check("governor", signed(gov_permit()))
    p33 = check("p33", signed(p33_permit()))
    assert combine(gov, p33) == WaitOutcome("ready")
    forged = check("p33", signed(p33_permit(), b"attacker"))
    assert combine(gov, forged) == WaitOutcome("waiting", missing=("P3.3",))
