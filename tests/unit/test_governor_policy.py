"""Governor (P3.2) policy: each rule alone, the order in which they win, and properties of ``decide``."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.domain import reasons
from quantum_trader.domain.governor import (
    RULES,
    GovernorPolicy,
    GovernorState,
    allowlist,
    cooldown,
    decide,
    kill_switch,
    max_notional,
    rate_limit,
)
from quantum_trader.domain.models import Plan

D = Decimal
NOW = 1_700_000_000.0

POLICY = GovernorPolicy(
    allowlist=frozenset({"BTCUSDT", "ETHUSDT"}),
    cooldown_s=30.0,
    rate_window_s=60.0,
    max_per_symbol=6,
    max_total=60,
    max_notional_usdt=D("250000"),
    price_max_age_s=30.0,
)

# A healthy state: no grants, a fresh price. Plan of 1 BTC at 60k = 60k notional.
OK_STATE = GovernorState(kill_switch=False, mark_price=D("60000"), price_ts=NOW - 1)


def plan(**changes: Any) -> Plan:
    values: dict[str, Any] = {
        "plan_id": "0123456789abcdef",
        "proposal_id": "prop-1",
        "symbol": "BTCUSDT",
        "side": "LONG",
        "action": "FULL_CLOSE",
        "qty": D("1"),
        "decision": "EXECUTE",
        "reason": "ready",
        "steps": "[]",
        "plan_hash": "0" * 64,
        "created_at": NOW,
    }
    values.update(changes)
    return Plan(**values)


def state(**changes: Any) -> GovernorState:
    return replace(OK_STATE, **changes)


def test_healthy_plan_passes_policy() -> None:
    verdict = decide(plan(), OK_STATE, POLICY, NOW)
    assert verdict.allow is True
    assert verdict.reason == reasons.POLICY_PASSED == "policy_passed"


def test_rules_run_in_documented_order() -> None:
    assert (kill_switch.check, allowlist.check, cooldown.check, rate_limit.check, max_notional.check) == RULES


# --- each rule alone --------------------------------------------------------------------------------------


def test_kill_switch() -> None:
    assert kill_switch.check(plan(), state(kill_switch=True), POLICY, NOW) == reasons.KILL_SWITCH_ON
    assert kill_switch.check(plan(), OK_STATE, POLICY, NOW) is None
    verdict = decide(plan(), state(kill_switch=True), POLICY, NOW)
    assert (verdict.allow, verdict.reason) == (False, "kill_switch_on")


def test_allowlist() -> None:
    assert allowlist.check(plan(symbol="DOGEUSDT"), OK_STATE, POLICY, NOW) == reasons.SYMBOL_NOT_ALLOWED
    assert allowlist.check(plan(symbol="ETHUSDT"), OK_STATE, POLICY, NOW) is None
    assert decide(plan(symbol="DOGEUSDT"), OK_STATE, POLICY, NOW).reason == "symbol_not_allowed"
    empty = replace(POLICY, allowlist=frozenset())
    assert decide(plan(), OK_STATE, empty, NOW).reason == "symbol_not_allowed"


@pytest.mark.parametrize(
    ("since_last", "denied"),
    [(0.0, True), (29.999, True), (30.0, False), (30.001, False), (3600.0, False)],
)
def test_cooldown_boundary(since_last: float, denied: bool) -> None:
    s = state(last_grant_symbol_at=NOW - since_last)
    expected = reasons.GOVERNOR_COOLDOWN if denied else None
    assert cooldown.check(plan(), s, POLICY, NOW) == expected
    assert decide(plan(), s, POLICY, NOW).allow is not denied


def test_cooldown_without_previous_grant_and_zero_cooldown() -> None:
    assert cooldown.check(plan(), state(last_grant_symbol_at=None), POLICY, NOW) is None
    no_cooldown = replace(POLICY, cooldown_s=0.0)
    assert cooldown.check(plan(), state(last_grant_symbol_at=NOW), no_cooldown, NOW) is None


@pytest.mark.parametrize(
    ("grants_symbol", "grants_total", "expected"),
    [
        (5, 59, None),  # one below both limits
        (6, 0, reasons.RATE_LIMIT_SYMBOL),  # at the per-symbol limit
        (7, 0, reasons.RATE_LIMIT_SYMBOL),
        (0, 60, reasons.RATE_LIMIT_GLOBAL),  # at the overall limit
        (0, 61, reasons.RATE_LIMIT_GLOBAL),
        (6, 60, reasons.RATE_LIMIT_SYMBOL),  # both: the symbol limit is named
    ],
)
def test_rate_limit(grants_symbol: int, grants_total: int, expected: str | None) -> None:
    s = state(grants_symbol=grants_symbol, grants_total=grants_total)
    assert rate_limit.check(plan(), s, POLICY, NOW) == expected
    verdict = decide(plan(), s, POLICY, NOW)
    assert verdict.reason == (expected or reasons.POLICY_PASSED)


@pytest.mark.parametrize(
    ("qty", "price", "expected"),
    [
        (D("1"), D("60000"), None),
        (D("5"), D("50000"), None),  # exactly at the limit is allowed
        (D("5.00000001"), D("50000"), reasons.MAX_NOTIONAL_EXCEEDED),
        (D("4.9999"), D("50000.01"), None),  # 249995.05
        (D("1000"), D("300"), reasons.MAX_NOTIONAL_EXCEEDED),
    ],
)
def test_max_notional(qty: Decimal, price: Decimal, expected: str | None) -> None:
    s = state(mark_price=price)
    assert max_notional.check(plan(qty=qty), s, POLICY, NOW) == expected


@pytest.mark.parametrize(
    "changes",
    [
        {"mark_price": None},
        {"price_ts": None},
        {"mark_price": None, "price_ts": None},
        {"price_ts": NOW - 30.001},
        {"price_ts": NOW - 3600},
    ],
)
def test_missing_or_stale_price_denies(changes: dict[str, Any]) -> None:
    s = state(**changes)
    assert max_notional.check(plan(), s, POLICY, NOW) == reasons.PRICE_UNAVAILABLE
    assert decide(plan(), s, POLICY, NOW).reason == "price_unavailable"


def test_price_exactly_at_max_age_is_fresh() -> None:
    assert max_notional.check(plan(), state(price_ts=NOW - 30.0), POLICY, NOW) is None


def test_unchecked_limit_denies_even_a_tiny_close() -> None:
    # Without a price, even a close that could never exceed the limit is denied.
    assert decide(plan(qty=D("0.001")), state(mark_price=None), POLICY, NOW).reason == reasons.PRICE_UNAVAILABLE


# --- which rule wins --------------------------------------------------------------------------------------

EVERYTHING_WRONG = GovernorState(
    kill_switch=True,
    grants_symbol=100,
    grants_total=1000,
    last_grant_symbol_at=NOW,
    mark_price=None,
    price_ts=None,
)


def test_rule_precedence() -> None:
    """Break every rule, then fix them one at a time: the reason follows the documented order."""
    p = plan(symbol="DOGEUSDT", qty=D("1000000"))
    s = EVERYTHING_WRONG
    seen = [decide(p, s, POLICY, NOW).reason]
    s = replace(s, kill_switch=False)
    seen.append(decide(p, s, POLICY, NOW).reason)
    p = plan(qty=D("1000000"))
    seen.append(decide(p, s, POLICY, NOW).reason)
    s = replace(s, last_grant_symbol_at=None)
    seen.append(decide(p, s, POLICY, NOW).reason)
    s = replace(s, grants_symbol=0)
    seen.append(decide(p, s, POLICY, NOW).reason)
    s = replace(s, grants_total=0)
    seen.append(decide(p, s, POLICY, NOW).reason)
    s = replace(s, mark_price=D("60000"), price_ts=NOW)
    seen.append(decide(p, s, POLICY, NOW).reason)
    p = plan(qty=D("1"))
    seen.append(decide(p, s, POLICY, NOW).reason)
    assert seen == [
        "kill_switch_on",
        "symbol_not_allowed",
        "governor_cooldown",
        "rate_limit_symbol",
        "rate_limit_global",
        "price_unavailable",
        "max_notional_exceeded",
        "policy_passed",
    ]


def test_kill_switch_wins_over_everything() -> None:
    verdict = decide(plan(symbol="DOGEUSDT", qty=D("1e9")), EVERYTHING_WRONG, POLICY, NOW)
    assert (verdict.allow, verdict.reason) == (False, reasons.KILL_SWITCH_ON)


# --- properties -------------------------------------------------------------------------------------------

_symbols = st.sampled_from(["BTCUSDT", "ETHUSDT", "SOLUSDT"])
_qty = st.decimals(min_value=D("0.001"), max_value=D("100000"), places=3, allow_nan=False, allow_infinity=False)
_price = st.none() | st.decimals(min_value=D("0.0001"), max_value=D("200000"), places=4, allow_nan=False)
_states = st.builds(
    GovernorState,
    kill_switch=st.booleans(),
    grants_symbol=st.integers(0, 10),
    grants_total=st.integers(0, 100),
    last_grant_symbol_at=st.none() | st.floats(NOW - 120, NOW + 5),
    mark_price=_price,
    price_ts=st.none() | st.floats(NOW - 120, NOW + 5),
)
_policies = st.builds(
    GovernorPolicy,
    allowlist=st.sets(st.sampled_from(["BTCUSDT", "ETHUSDT", "SOLUSDT"])).map(frozenset),
    cooldown_s=st.floats(0, 60),
    rate_window_s=st.just(60.0),
    max_per_symbol=st.integers(1, 10),
    max_total=st.integers(1, 100),
    max_notional_usdt=st.decimals(min_value=1, max_value=10**7, places=2, allow_nan=False, allow_infinity=False),
    price_max_age_s=st.floats(0.1, 60),
)


@given(qty=_qty, symbol=_symbols, s=_states.map(lambda s: replace(s, kill_switch=True)), policy=_policies)
def test_decide_never_allows_with_kill_switch_on(
    qty: Decimal, symbol: str, s: GovernorState, policy: GovernorPolicy
) -> None:
    verdict = decide(plan(symbol=symbol, qty=qty), s, policy, NOW)
    assert not verdict.allow
    assert verdict.reason == reasons.KILL_SWITCH_ON


@given(
    qty=_qty,
    price=st.decimals(min_value=D("0.0001"), max_value=D("200000"), places=4, allow_nan=False, allow_infinity=False),
    limit=st.decimals(min_value=1, max_value=10**7, places=2, allow_nan=False, allow_infinity=False),
    price_age=st.floats(-5, 60),
)
def test_decide_allows_exactly_the_notionals_within_the_limit(
    qty: Decimal, price: Decimal, limit: Decimal, price_age: float
) -> None:
    """Every other rule passes: the verdict depends on the price's age and the notional alone."""
    policy = replace(POLICY, max_notional_usdt=limit)
    s = state(mark_price=price, price_ts=NOW - price_age)
    verdict = decide(plan(qty=qty), s, policy, NOW)
    fresh = price_age <= policy.price_max_age_s
    assert verdict.allow == (fresh and qty * price <= limit)
    if not fresh:
        assert verdict.reason == reasons.PRICE_UNAVAILABLE
    elif not verdict.allow:
        assert verdict.reason == reasons.MAX_NOTIONAL_EXCEEDED


@given(qty=_qty, symbol=_symbols, s=_states, policy=_policies)
def test_decide_invariants(qty: Decimal, symbol: str, s: GovernorState, policy: GovernorPolicy) -> None:
    """Whatever the state: a kill switch never allows, and an allow satisfies every rule (notional included)."""
    verdict = decide(plan(symbol=symbol, qty=qty), s, policy, NOW)
    if s.kill_switch:
        assert not verdict.allow
        assert verdict.reason == reasons.KILL_SWITCH_ON
    if verdict.allow:
        assert verdict.reason == reasons.POLICY_PASSED
        assert s.mark_price is not None
        assert s.price_ts is not None
        assert NOW - s.price_ts <= policy.price_max_age_s
        assert qty * s.mark_price <= policy.max_notional_usdt
        assert symbol in policy.allowlist
        assert s.grants_symbol < policy.max_per_symbol
        assert s.grants_total < policy.max_total
        assert s.last_grant_symbol_at is None or NOW - s.last_grant_symbol_at >= policy.cooldown_s
    else:
        assert verdict.reason in {
            reasons.KILL_SWITCH_ON,
            reasons.SYMBOL_NOT_ALLOWED,
            reasons.GOVERNOR_COOLDOWN,
            reasons.RATE_LIMIT_SYMBOL,
            reasons.RATE_LIMIT_GLOBAL,
            reasons.PRICE_UNAVAILABLE,
            reasons.MAX_NOTIONAL_EXCEEDED,
        }
