"""Permits an attacker could write: genuine-looking ones signed with the wrong key, replayed, expired, for
another plan, or tampered after signing. Shared by the permit-attack tests and the invariant model."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from conftest import GOVERNOR_KEY, P33_KEY
from quantum_trader.domain import reasons
from quantum_trader.domain.models import GovernorPermit, P33Permit, Plan
from quantum_trader.domain.permits import encode_permit, sign


def governor_permit(plan: Plan, key: str = GOVERNOR_KEY, **changes: Any) -> str:
    permit = GovernorPermit(
        granted=True,
        plan_id=plan.plan_id,
        plan_hash=plan.plan_hash,
        issuer="governor",
        reason="policy_passed",
        created_at=time.time(),
    )
    permit = msgspec.structs.replace(permit, **changes)
    return encode_permit(sign(permit, key.encode())).decode()


def p33_permit(plan: Plan, key: str = P33_KEY, **changes: Any) -> str:
    permit = P33Permit(
        allow=True,
        symbol=plan.symbol,
        safe_close_qty=float(plan.qty),
        exchange_position_amt=float(plan.qty),
        ledger_amt=float(plan.qty),
        created_at=time.time(),
        reason="sanity_checks_passed",
        plan_id=plan.plan_id,
        plan_hash=plan.plan_hash,
        issuer="p33",
    )
    permit = msgspec.structs.replace(permit, **changes)
    return encode_permit(sign(permit, key.encode())).decode()


def tampered(raw: str, **changes: Any) -> str:
    """A genuinely signed permit with fields changed afterwards (the signature no longer matches)."""
    doc = msgspec.json.decode(raw)
    doc.update(changes)
    return msgspec.json.encode(doc).decode()


Attack = Callable[[Plan, Plan], str]
ATTACKS: dict[str, Attack] = {
    "unsigned": lambda plan, other: tampered(governor_permit(plan), sig=""),
    "wrong_key": lambda plan, other: governor_permit(plan, key="attacker-key"),
    "signed_with_p33_key": lambda plan, other: governor_permit(plan, key=P33_KEY),
    "replayed_from_other_plan": lambda plan, other: governor_permit(other),
    "expired": lambda plan, other: governor_permit(plan, created_at=time.time() - 3600),
    "plan_hash_mismatch": lambda plan, other: governor_permit(plan, plan_hash="0" * 64),
    "tampered_reason": lambda plan, other: tampered(governor_permit(plan), reason="trust me"),
    "tampered_deny_to_grant": lambda plan, other: tampered(governor_permit(plan, granted=False), granted=True),
    "wrong_issuer": lambda plan, other: governor_permit(plan, issuer="apply"),
    "garbage": lambda plan, other: "\x00not json",
}
EXPECTED = {
    "unsigned": reasons.BAD_SIGNATURE,
    "wrong_key": reasons.BAD_SIGNATURE,
    "signed_with_p33_key": reasons.BAD_SIGNATURE,
    "replayed_from_other_plan": reasons.PLAN_MISMATCH,
    "expired": reasons.EXPIRED_PERMIT,
    "plan_hash_mismatch": reasons.PLAN_MISMATCH,
    "tampered_reason": reasons.BAD_SIGNATURE,
    "tampered_deny_to_grant": reasons.BAD_SIGNATURE,
    "wrong_issuer": reasons.WRONG_ISSUER,
    "garbage": reasons.MALFORMED_PERMIT,
}
# P3.3-slot forgeries (the Governor-slot ones above, moved to the other slot)
P33_ATTACKS: dict[str, Attack] = {
    "p33_wrong_key": lambda plan, other: p33_permit(plan, key=GOVERNOR_KEY),
    "p33_replayed_from_other_plan": lambda plan, other: p33_permit(other),
    "p33_oversized_qty": lambda plan, other: tampered(p33_permit(plan), safe_close_qty=1e9),
}
