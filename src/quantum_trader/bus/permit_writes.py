"""What one issuer's decision writes to the store, as the permit script takes it: the signed permit, its audit
entry and, per issuer, what goes with it (a Governor allow's rate-limit count, a P3.3 allow's order-in-flight
mark). The Governor service and the operator's `qt permit grant` both write Governor permits through here."""

from __future__ import annotations

from quantum_trader.bus import keys
from quantum_trader.bus.scripts import GrantCount, PermitWrite
from quantum_trader.domain.brain import BrainVerdict
from quantum_trader.domain.models import AuditEntry, GovernorPermit, P33Permit, Plan, to_fields
from quantum_trader.domain.permits import encode_permit, sign
from quantum_trader.domain.verdict import Verdict
from quantum_trader.settings import Settings


def decision_audit(plan: Plan, issuer: str, allow: bool, reason: str, now: float) -> AuditEntry:
    return AuditEntry(
        plan_id=plan.plan_id,
        issuer=issuer,
        decision="allow" if allow else "deny",
        reason=reason,
        at=now,
        latency_ms=round((now - plan.created_at) * 1000, 3),
        symbol=plan.symbol,
    )


def governor_permit_write(
    settings: Settings,
    secret: bytes,
    plan: Plan,
    verdict: Verdict,
    *,
    issuer: str,
    claim_owner: str,
    now: float,
    entry_id: str = "",
) -> PermitWrite:
    """The signed Governor-slot permit for ``plan``, its audit entry and (for an allow) its rate-limit count."""
    permit = sign(
        GovernorPermit(
            granted=verdict.allow,
            plan_id=plan.plan_id,
            plan_hash=plan.plan_hash,
            issuer=issuer,  # type: ignore[arg-type]
            reason=verdict.reason,
            created_at=now,
        ),
        secret,
    )
    window_s = settings.governor.rate_window_s
    # An allow counts against the rate limits (grants per symbol and overall) in the same script as its permit.
    count = GrantCount(
        keys=(keys.GOVERNOR_GRANTS, keys.governor_symbol_grants(plan.symbol)),
        member=plan.plan_id,
        at=now,
        window_start=now - window_s,
        expire_s=int(window_s) + 60,
    )
    return PermitWrite(
        claim_key=keys.decision_claim("governor", plan.plan_id),
        claim_value=claim_owner,
        permit_key=keys.governor_permit(plan.plan_id),
        permit_json=encode_permit(permit).decode(),
        permit_ttl_s=settings.permit_ttl_s,
        audit_fields=to_fields(decision_audit(plan, issuer, verdict.allow, verdict.reason, now)),
        audit_maxlen=settings.audit_maxlen,
        group=keys.GOVERNOR_GROUP if entry_id else "",
        entry_id=entry_id,
        count=count if verdict.allow else None,
    )


def p33_permit_write(
    settings: Settings, secret: bytes, plan: Plan, verdict: BrainVerdict, *, claim_owner: str, now: float, entry_id: str
) -> PermitWrite:
    """The signed P3.3 permit for ``plan``, its audit entry and (for an allow) the symbol's order-in-flight mark."""
    permit = sign(
        P33Permit(
            allow=verdict.allow,
            symbol=plan.symbol,
            safe_close_qty=verdict.safe_close_qty,
            exchange_position_amt=verdict.exchange_position_amt,
            ledger_amt=verdict.ledger_amt,
            created_at=now,
            reason=verdict.reason,
            plan_id=plan.plan_id,
            plan_hash=plan.plan_hash,
            issuer="p33",
        ),
        secret,
    )
    return PermitWrite(
        claim_key=keys.decision_claim("p33", plan.plan_id),
        claim_value=claim_owner,
        permit_key=keys.p33_permit(plan.plan_id),
        permit_json=encode_permit(permit).decode(),
        permit_ttl_s=settings.permit_ttl_s,
        audit_fields=to_fields(decision_audit(plan, "p33", verdict.allow, verdict.reason, now)),
        audit_maxlen=settings.audit_maxlen,
        group=keys.P33_GROUP,
        entry_id=entry_id,
        mark_key=keys.p33_symbol_in_flight(plan.symbol) if verdict.allow else "",
        mark_value=plan.plan_id,
        mark_ttl_s=int(settings.brain.cooldown_s) or 1,
        # the Governor may have denied already and the result gone by: then no result will release a mark
        mark_unless=keys.p33_result_seen(plan.plan_id),
    )
