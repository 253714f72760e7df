"""Tests written to kill domain/ mutants that survived `make mutation` (docs/mutation.md): each pins a piece of
behaviour the other unit tests left open. The mutant each test kills is named in its docstring."""

from __future__ import annotations

from decimal import Decimal

import pytest
from test_batch_decisions import GOV_POLICY
from test_brain_rules import POLICY as BRAIN_POLICY
from test_brain_rules import inputs, ledger, plan, snapshot
from test_ledger import result
from test_permits import PLAN, TTL, check, gov_permit, p33_permit, signed

from quantum_trader.domain import brain, governor, reasons
from quantum_trader.domain.brain import ledger_match
from quantum_trader.domain.execution import CLOCK_MARGIN_MS, SendRecord
from quantum_trader.domain.ledger import apply_result
from quantum_trader.domain.models import MAX_ERROR_TEXT, _describe
from quantum_trader.domain.numbers import to_decimal
from quantum_trader.domain.permits import SlotCheck
from quantum_trader.domain.trust import prior_sends_signed_before, stream_id

NOW = 1_700_000_000.0

# --- execution: the send record -------------------------------------------------------------------------------


def test_an_unseen_record_keeps_its_late_horizon() -> None:
    """unseen must pass late_horizon_ms on (dropping it falls back to the 10 s default)."""
    record = SendRecord.unseen(1_000.0, recv_window_ms=500, late_horizon_ms=60_000)
    assert record.late_horizon_ms == 60_000
    assert record.settles_at_ms == 1_000.0 + 60_000


def test_a_resend_moves_the_settling_time_to_the_new_request() -> None:
    """resent must record the new request's timestamp: absence is judged from the last request sent."""
    record = SendRecord(attempts=1, last_signed_ms=1_000.0, recv_window_ms=500, window_end_ms=9_000.0)
    again = record.resent(4_000.0)
    assert again.attempts == 2
    assert again.last_signed_ms == 4_000.0
    assert again.settles_at_ms == 4_000.0 + 500 + CLOCK_MARGIN_MS


# --- batch decisions: one input per plan ----------------------------------------------------------------------


def test_the_brain_refuses_a_batch_whose_inputs_do_not_match_its_plans() -> None:
    """zip(strict=True) in brain.decide_in_order: a missing input must not silently drop a plan."""
    with pytest.raises(ValueError):
        brain.decide_in_order([plan()], [], BRAIN_POLICY, NOW)
    assert len(brain.decide_in_order([plan()], [inputs()], BRAIN_POLICY, NOW)) == 1


def test_the_governor_refuses_a_batch_whose_states_do_not_match_its_plans() -> None:
    """zip(strict=True) in governor.decide_in_order."""
    with pytest.raises(ValueError):
        governor.decide_in_order([plan()], [], GOV_POLICY, NOW)


# --- brain: ledger against exchange ---------------------------------------------------------------------------


def test_a_ledger_position_the_exchange_no_longer_has_is_a_qty_mismatch() -> None:
    """ledger_amt * exchange_amt < 0 (a mutant dividing instead raises on a flat exchange position)."""
    verdict = ledger_match.check(plan(), inputs(snapshot=snapshot("0"), ledger=ledger("1")), BRAIN_POLICY, NOW)
    assert verdict == reasons.QTY_MISMATCH


# --- ledger ---------------------------------------------------------------------------------------------------


def test_a_ledger_started_from_a_result_was_never_synced() -> None:
    """synced_at_ms is 0 without a ledger: no exchange read backs it, so no fill may be taken as synced."""
    after = apply_result(None, result("LONG", "0.4"), "1700000000000-0", NOW)
    assert after is not None
    assert after.synced_at_ms == 0
    assert after.last_known_amt == Decimal("-0.4")


# --- trust ----------------------------------------------------------------------------------------------------


def test_a_stream_id_without_a_sequence_has_sequence_zero() -> None:
    """partition (not rpartition) and ``seq or 0``."""
    assert stream_id("1700000000000") == (1_700_000_000_000, 0)
    assert stream_id("1700000000000-7") == (1_700_000_000_000, 7)


def test_prior_sends_are_bounded_by_the_end_of_the_window() -> None:
    """+ window_s on each branch, and the epoch's start when there is no record."""
    from test_trust import EPOCH

    assert prior_sends_signed_before(EPOCH, 100.0, 30.0, NOW) == 130.0
    assert prior_sends_signed_before(EPOCH, None, 30.0, NOW) == EPOCH.since + 30.0
    assert prior_sends_signed_before(None, None, 30.0, NOW) == NOW + 30.0


# --- models: validation messages ------------------------------------------------------------------------------


def test_a_long_error_is_cut_and_marked() -> None:
    """> MAX_ERROR_TEXT (not >=), text[:MAX] + "…" without a field."""
    exact = "x" * MAX_ERROR_TEXT
    assert _describe(ValueError(exact)) == exact
    assert _describe(ValueError("x" * (MAX_ERROR_TEXT + 50))) == exact + "…"


def test_a_long_error_keeps_its_field_name_in_front() -> None:
    """head[: MAX - 20] + "…" + the field, then the field name first with its backquote stripped."""
    long = "E" * (MAX_ERROR_TEXT + 100) + " - at `$.qty`"
    assert _describe(ValueError(long)) == "qty: " + "E" * (MAX_ERROR_TEXT - 20) + "…"


def test_the_field_is_the_last_location_msgspec_names() -> None:
    """rpartition, on both the cut and the reorder (a message may itself quote a location)."""
    short = "got `a - at `$.x` here` - at `$.qty`"
    assert _describe(ValueError(short)) == "qty: got `a - at `$.x` here`"
    long = "E - at `$.x` " + "E" * MAX_ERROR_TEXT + " - at `$.qty`"
    assert _describe(ValueError(long)) == "qty: " + long[: MAX_ERROR_TEXT - 20] + "…"


# --- numbers --------------------------------------------------------------------------------------------------


def test_a_non_finite_decimal_is_refused_with_its_value() -> None:
    with pytest.raises(ValueError, match="not a finite number: Decimal\\('Infinity'\\)"):
        to_decimal(Decimal("Infinity"))


# --- permits: what a rejection carries ------------------------------------------------------------------------

# Apply logs and dead-letters a rejected slot with its bytes and (when it decoded) the permit: a rejection
# must carry both, for its own slot.


def test_a_missing_slot_names_its_slot() -> None:
    assert check("p33", None) == SlotCheck("p33", "missing")


def test_a_malformed_permit_carries_its_bytes() -> None:
    assert check("governor", b"{not json") == SlotCheck("governor", "rejected", reasons.MALFORMED_PERMIT, b"{not json")


def test_a_wrong_issuer_carries_its_bytes_and_permit() -> None:
    permit = gov_permit(issuer="p33")
    raw = signed(permit)
    got = check("governor", raw)
    assert got == SlotCheck("governor", "rejected", reasons.WRONG_ISSUER, raw, got.permit)
    assert got.permit is not None and got.permit.issuer == "p33"


def test_a_bad_signature_carries_its_bytes_and_permit() -> None:
    raw = signed(gov_permit(), key=b"another-key-0123456789")
    got = check("governor", raw)
    assert got.slot == "governor" and got.reason == reasons.BAD_SIGNATURE
    assert got.raw == raw
    assert got.permit is not None and got.permit.plan_id == PLAN.plan_id


@pytest.mark.parametrize(
    ("slot", "changes"),
    [("governor", {"plan_hash": "f" * 64}), ("p33", {"symbol": "ETHUSDT"})],
)
def test_a_permit_for_another_plan_carries_its_bytes_and_permit(slot: str, changes: dict[str, str]) -> None:
    raw = signed(gov_permit(**changes) if slot == "governor" else p33_permit(**changes))
    got = check(slot, raw)
    assert (got.slot, got.state, got.reason, got.raw) == (slot, "rejected", reasons.PLAN_MISMATCH, raw)
    assert got.permit is not None and got.permit.plan_id == PLAN.plan_id


def test_an_expired_permit_carries_its_bytes_and_permit() -> None:
    raw = signed(p33_permit(created_at=NOW - TTL - 1))
    got = check("p33", raw)
    assert (got.slot, got.state, got.reason, got.raw) == ("p33", "rejected", reasons.EXPIRED_PERMIT, raw)
    assert got.permit is not None and got.permit.created_at == NOW - TTL - 1
