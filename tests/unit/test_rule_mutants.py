"""Tests written to kill mutants of the domain rules (numbers, models, planning, governor, trust) that survived
`make mutation` (docs/mutation.md): each pins a piece of behaviour the other unit tests left open. The mutants
each test kills are named in its docstring (``<module>.<function>__mutmut_<n>``).

Every call to the rule under test is inside the test: mutmut runs a mutant only against the tests that called
its function, and a call made while the module is imported is attributed to no test.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

import pytest

from quantum_trader.domain import governor, reasons
from quantum_trader.domain.governor import GovernorPolicy, GovernorState
from quantum_trader.domain.models import (
    MalformedEntry,
    P33Permit,
    Plan,
    Proposal,
    Result,
    _describe,
    from_fields,
    to_fields,
)
from quantum_trader.domain.numbers import round_down_to_step
from quantum_trader.domain.planning import PlanningContext, is_plan_id, make_plan, plan_hash, plan_id_for
from quantum_trader.domain.trust import TRUST_MAX_AGE_S, Epoch, StoreIdentity

NOW = 1_700_000_000.0
ALLOWED = frozenset({"BTCUSDT"})

# --- numbers.round_down_to_step -------------------------------------------------------------------------------


def test_a_zero_quantity_rounds_to_a_plain_zero() -> None:
    """round_down_to_step__mutmut_4 (`qty < 0`: zero goes through the division and comes back as 0.000): the
    result is what a permit's safe_close_qty is written from, so its form is on the wire."""
    assert str(round_down_to_step(Decimal(0), Decimal("0.001"))) == "0"
    assert str(round_down_to_step(Decimal("-0.5"), Decimal("0.001"))) == "0"


def test_a_quantity_a_hair_below_a_multiple_rounds_down_to_the_multiple_below() -> None:
    """round_down_to_step__mutmut_16 (`result = step`) and __mutmut_17 (`result += step`): 4.99...9 with more
    nines than the working precision divides to 5; the product 5 is above the quantity, and the guard must
    step down to 4, not jump to one step or up to 6."""
    qty = Decimal("4." + "9" * 130)
    result = round_down_to_step(qty, Decimal(1))
    assert result == 4 and str(result) == "4"
    assert result <= qty


def test_a_quotient_with_a_fraction_is_cut_not_rounded() -> None:
    """round_down_to_step__mutmut_11 (the quotient rounded half-even, the guard left to undo it): at 120 digits
    (10**119 + 2) / 2.5 = 4e118 + 0.8 is exact, and cutting it gives 10**119; rounding it up to 4e118 + 1 makes
    a product of 121 digits that the precision rounds back to the quantity itself, which is no multiple of 2.5
    and passes the guard."""
    assert round_down_to_step(Decimal(10**119 + 2), Decimal("2.5")) == Decimal(10**119)


def test_a_quantity_longer_than_any_precision_is_rounded_down_exactly() -> None:
    """The rounding is done on integers: a 121-digit (or any) quantity that is already a multiple comes back
    unchanged, and one a hair above a multiple comes back as that multiple, never above the quantity."""
    qty = Decimal("1" * 120 + "9")
    assert round_down_to_step(qty, Decimal(1)) == qty
    assert round_down_to_step(Decimal("1" * 120 + "9.5"), Decimal(1)) == qty


def test_a_huge_quantity_is_returned_with_the_steps_exponent() -> None:
    result = round_down_to_step(Decimal("1E+60"), Decimal("1E-61"))
    assert result == Decimal("1E+60") and result.as_tuple().exponent == -61
    assert round_down_to_step(Decimal("1E+59"), Decimal("1E-61")) == Decimal("1E+59")  # raised before


def test_a_quantity_below_one_step_is_zero_however_small() -> None:
    assert round_down_to_step(Decimal("1E-999999"), Decimal("0.001")) == 0


def test_a_quantity_or_step_that_is_not_finite_is_refused() -> None:
    for qty, step in ((Decimal("Infinity"), Decimal(1)), (Decimal(1), Decimal("NaN"))):
        with pytest.raises(ValueError, match="must be finite"):
            round_down_to_step(qty, step)


# --- trust.Epoch.trusts ---------------------------------------------------------------------------------------


def test_a_proposal_exactly_at_the_maximum_age_is_no_longer_trusted() -> None:
    """Epoch.trusts__mutmut_7 (`>=`): the age bound is strict, as the floor's is."""
    epoch = Epoch(StoreIdentity("run-1", "repl-1"), (0, 0), since=0.0)
    oldest_ms = int((NOW - TRUST_MAX_AGE_S) * 1000)
    assert oldest_ms == (NOW - TRUST_MAX_AGE_S) * 1000  # the boundary is exact in float
    assert epoch.trusts(f"{oldest_ms}-0", NOW) is False
    assert epoch.trusts(f"{oldest_ms}-1", NOW) is False  # same millisecond: the age counts ms only
    assert epoch.trusts(f"{oldest_ms + 1}-0", NOW) is True


# --- governor.decide_in_order ---------------------------------------------------------------------------------


def test_a_batch_keeps_the_stores_last_grant_for_a_symbol_not_granted_in_it() -> None:
    """governor.decide_in_order__mutmut_25, 27 (the store's last grant replaced by None when no plan of the
    batch was granted for the symbol: the cooldown forgotten)."""
    policy = GovernorPolicy(
        allowlist=ALLOWED,
        cooldown_s=10.0,
        rate_window_s=60.0,
        max_per_symbol=3,
        max_total=5,
        max_notional_usdt=Decimal("1000000"),
        price_max_age_s=30.0,
    )
    plan = a_plan()
    state = GovernorState(kill_switch=False, mark_price=Decimal("100"), price_ts=NOW)
    assert governor.decide_in_order([plan], [state], policy, NOW)[0].allow  # the rest of the policy passes
    cooling = GovernorState(kill_switch=False, last_grant_symbol_at=NOW - 1.0, mark_price=Decimal("100"), price_ts=NOW)
    verdicts = governor.decide_in_order([plan], [cooling], policy, NOW)
    assert [(v.allow, v.reason) for v in verdicts] == [(False, reasons.GOVERNOR_COOLDOWN)]


# --- models ---------------------------------------------------------------------------------------------------


def plan_values(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "plan_id": "0123456789abcdef",
        "proposal_id": "prop-1",
        "symbol": "BTCUSDT",
        "side": "LONG",
        "action": "FULL_CLOSE",
        "qty": Decimal("0.5"),
        "decision": "EXECUTE",
        "reason": "ready",
        "steps": "[]",
        "plan_hash": "0" * 64,
        "created_at": NOW,
    }
    return {**values, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"qty": Decimal("NaN")}, "qty must be a finite number, got NaN"),  # __mutmut_5
        ({"created_at": float("nan")}, "created_at must be a finite number, got nan"),  # __mutmut_7, 8, 11, 12
        ({"created_at": float("inf")}, "created_at must be a finite number, got inf"),
    ],
    ids=["qty_nan", "created_at_nan", "created_at_inf"],
)
def test_a_plan_with_a_non_finite_number_is_refused_naming_the_field(changes: dict[str, Any], message: str) -> None:
    """Plan.__post_init__ mutants 5, 7, 8, 11, 12 (the field's name changed, or created_at not checked)."""
    with pytest.raises(ValueError) as refused:
        Plan(**plan_values(**changes))
    assert str(refused.value) == message


def test_a_p33_permit_with_a_negative_safe_close_is_refused_saying_so() -> None:
    """P33Permit.__post_init__ mutants 19..21 (the message lost or changed)."""
    with pytest.raises(ValueError) as refused:
        P33Permit(
            allow=True,
            symbol="BTCUSDT",
            safe_close_qty=Decimal("-0.1"),
            exchange_position_amt=Decimal("0.5"),
            created_at=NOW,
            reason="sanity_checks_passed",
            plan_id="0123456789abcdef",
            plan_hash="0" * 64,
            issuer="p33",
        )
    assert str(refused.value) == "safe_close_qty must be >= 0"


def test_a_key_that_is_not_utf8_is_quoted_to_forty_characters() -> None:
    """from_fields__mutmut_10 (`[:41]`)."""
    with pytest.raises(MalformedEntry) as refused:
        from_fields(Result, {"k" * 50 + "\udcff": "x"})
    assert str(refused.value) == "k" * 40 + ": not valid UTF-8"


def test_a_bad_boolean_is_quoted_to_forty_characters() -> None:
    """from_fields__mutmut_18 (`[:41]`)."""
    with pytest.raises(MalformedEntry) as refused:
        from_fields(Result, {"plan_id": "0123456789abcdef", "symbol": "BTCUSDT", "side": "LONG", "executed": "y" * 50})
    assert str(refused.value) == f"executed: expected true/false, got {'y' * 40!r}"


def test_the_field_name_is_kept_whole_whatever_it_ends_with() -> None:
    """_describe__mutmut_30 (`rstrip('XX`XX')` also strips trailing X's from the field name)."""
    assert _describe(ValueError("Expected `int`, got `str` - at `$.MAX`")) == "MAX: Expected `int`, got `str`"


# --- planning -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0123456789abcdef", True),
        (plan_id_for("prop-1"), True),
        ("0123456789abcde", False),  # 15 digits: __mutmut_1 (`or`)
        ("0123456789abcdef0", False),  # 17: __mutmut_3 (`== 17`)
        ("0123456789ABCDEF", False),  # upper case: __mutmut_7
        ("0123456789abcdeX", False),  # __mutmut_6 (the digits "XX0123456789abcdefXX" admit an X)
        ("0123456789abcdeg", False),
        ("", False),
    ],
)
def test_a_plan_id_is_sixteen_lowercase_hex_digits(text: str, expected: bool) -> None:
    """is_plan_id__mutmut_1..7 (no test called it): 2 (`!= 16`), 4 (`all(None)`), 5 (`not in`) fail the valid ids."""
    assert is_plan_id(text) is expected


@pytest.mark.parametrize(
    ("position", "reason"),
    [(Decimal(0), reasons.NO_POSITION), (None, reasons.POSITION_UNAVAILABLE)],
    ids=["flat", "unknown"],
)
def test_a_partial_close_of_no_known_position_plans_nothing(position: Decimal | None, reason: str) -> None:
    """make_plan__mutmut_14 (the requested quantity taken without a position: a partial close by qty keeps it)."""
    proposal = Proposal(proposal_id="prop-1", symbol="BTCUSDT", action="PARTIAL_CLOSE", qty=Decimal("0.3"))
    plan = make_plan(proposal, PlanningContext(ALLOWED, position), "0123456789abcdef", NOW)
    assert (plan.decision, plan.reason, plan.qty, plan.steps) == ("SKIP", reason, Decimal(0), "[]")


def test_the_plan_hash_is_over_the_fields_with_keys_sorted() -> None:
    """plan_hash__mutmut_8, 10 (keys in field order): recomputed here with json, as docs/ and every consumer
    define it (SHA-256 over the compact JSON of the wire fields but plan_hash, keys sorted)."""
    plan = a_plan()
    body = {k: v for k, v in to_fields(plan).items() if k != "plan_hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert plan.plan_hash == plan_hash(plan) == hashlib.sha256(canonical).hexdigest()


def a_plan() -> Plan:
    proposal = Proposal(proposal_id="prop-1", symbol="BTCUSDT", action="FULL_CLOSE")
    return make_plan(proposal, PlanningContext(ALLOWED, Decimal("0.5")), "0123456789abcdef", NOW)
