"""Permits: signing by issuers, and Apply's pure verification of the two slots.

``sig`` is hex HMAC-SHA256 over the permit's JSON without ``sig``, keys sorted, compact. The Governor slot is
signed with the Governor key (by the Governor, or by ``qt permit`` for an operator); the P3.3 slot with the
P3.3 key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgspec

from quantum_trader.domain import reasons
from quantum_trader.domain.models import (
    GOVERNOR_NAME,
    P33_NAME,
    GovernorPermit,
    MalformedEntry,
    P33Permit,
    Plan,
    decode_json,
)

Slot = Literal["governor", "p33"]
SLOT_NAMES: dict[Slot, str] = {"governor": GOVERNOR_NAME, "p33": P33_NAME}
_SLOT_ISSUERS: dict[Slot, frozenset[str]] = {
    "governor": frozenset({"governor", "operator"}),
    "p33": frozenset({"p33"}),
}
_SLOT_TYPES: dict[Slot, type[GovernorPermit] | type[P33Permit]] = {
    "governor": GovernorPermit,
    "p33": P33Permit,
}

P = TypeVar("P", GovernorPermit, P33Permit)


def _canonical(doc: dict[str, Any]) -> bytes:
    return msgspec.json.encode({k: v for k, v in doc.items() if k != "sig"}, order="sorted")


def _mac(secret: bytes, doc: dict[str, Any]) -> str:
    return hmac.new(secret, _canonical(doc), hashlib.sha256).hexdigest()


def sign(permit: P, secret: bytes) -> P:
    doc = msgspec.to_builtins(permit)
    return msgspec.structs.replace(permit, sig=_mac(secret, doc))


def encode_permit(permit: GovernorPermit | P33Permit) -> bytes:
    return msgspec.json.encode(permit)


@dataclass(frozen=True, slots=True)
class SlotCheck:
    """One permit slot as Apply sees it."""

    slot: Slot
    state: Literal["missing", "rejected", "allow", "deny"]
    reason: str = ""
    raw: bytes | None = None
    permit: GovernorPermit | P33Permit | None = None

    @property
    def name(self) -> str:
        return SLOT_NAMES[self.slot]


def check_slot(slot: Slot, raw: bytes | None, plan: Plan, secret: bytes, now: float, ttl_s: float) -> SlotCheck:
    """Validate what is stored in one permit slot for ``plan``. Anything not provably valid is rejected."""
    if raw is None:
        return SlotCheck(slot, "missing")
    try:
        permit = decode_json(_SLOT_TYPES[slot], raw)
        doc = msgspec.json.decode(raw)
    except MalformedEntry:
        return SlotCheck(slot, "rejected", reasons.MALFORMED_PERMIT, raw)
    if permit.issuer not in _SLOT_ISSUERS[slot]:
        return SlotCheck(slot, "rejected", reasons.WRONG_ISSUER, raw, permit)
    if not hmac.compare_digest(permit.sig.encode(), _mac(secret, doc).encode()):
        return SlotCheck(slot, "rejected", reasons.BAD_SIGNATURE, raw, permit)
    if permit.plan_id != plan.plan_id or permit.plan_hash != plan.plan_hash:
        return SlotCheck(slot, "rejected", reasons.PLAN_MISMATCH, raw, permit)
    if isinstance(permit, P33Permit) and permit.symbol != plan.symbol:
        return SlotCheck(slot, "rejected", reasons.PLAN_MISMATCH, raw, permit)
    if abs(now - permit.created_at) > ttl_s:
        return SlotCheck(slot, "rejected", reasons.EXPIRED_PERMIT, raw, permit)
    granted = permit.granted if isinstance(permit, GovernorPermit) else permit.allow
    return SlotCheck(slot, "allow" if granted else "deny", permit.reason, raw, permit)


@dataclass(frozen=True, slots=True)
class WaitOutcome:
    """Where a plan stands given its two slots."""

    kind: Literal["waiting", "ready", "denied"]
    missing: tuple[str, ...] = ()
    denied_by: tuple[str, ...] = ()
    deny_reason: str = ""


def combine(governor: SlotCheck, p33: SlotCheck) -> WaitOutcome:
    """A deny from either issuer ends the wait at once; two allows make the plan ready; else keep waiting."""
    slots = (governor, p33)
    denials = [s for s in slots if s.state == "deny"]
    if denials:
        return WaitOutcome(
            "denied",
            denied_by=tuple(s.name for s in denials),
            deny_reason=",".join(s.reason for s in denials),
        )
    if all(s.state == "allow" for s in slots):
        return WaitOutcome("ready")
    return WaitOutcome("waiting", missing=tuple(s.name for s in slots if s.state != "allow"))
