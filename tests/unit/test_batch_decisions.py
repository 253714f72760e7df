"""Plans read together are decided as if one after another: ``decide_in_order`` against a model of the store
that each one-at-a-time decision would have read from and written to."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st
from test_brain_rules import POLICY as BRAIN_POLICY
from test_brain_rules import inputs, plan

from quantum_trader.domain import brain, governor
from quantum_trader.domain.governor import GovernorPolicy, GovernorState

NOW = 1_700_000_000.0
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
GOV_POLICY = GovernorPolicy(
    allowlist=frozenset(SYMBOLS[:2]),
    cooldown_s=0.0,
    rate_window_s=60.0,
    max_per_symbol=3,
    max_total=5,
    max_notional_usdt=Decimal("1000000"),
    price_max_age_s=30.0,
)

plans = st.lists(
    st.builds(
        lambda n, symbol: plan(plan_id=f"{n:016x}", symbol=symbol), st.integers(0, 2**32), st.sampled_from(SYMBOLS)
    ),
    max_size=12,
    unique_by=lambda p: p.plan_id,
)


@settings(max_examples=200)
@given(plans, st.dictionaries(st.sampled_from(SYMBOLS), st.integers(0, 4)), st.integers(0, 6), st.booleans())
def test_governor_batch_equals_one_at_a_time(batch, granted: dict[str, int], total: int, cooldown: bool) -> None:
    policy = replace(GOV_POLICY, cooldown_s=30.0 if cooldown else 0.0)
    store_symbol = dict(granted)  # the model store: grants in the window per symbol, overall, last grant time
    store_total = total + sum(granted.values())
    store_last: dict[str, float] = {s: NOW - 60 for s in granted if granted[s]}

    def read(symbol: str) -> GovernorState:
        return GovernorState(
            kill_switch=False,
            grants_symbol=store_symbol.get(symbol, 0),
            grants_total=store_total,
            last_grant_symbol_at=store_last.get(symbol),
            mark_price=Decimal("100"),
            price_ts=NOW - 1,
        )

    together = governor.decide_in_order(batch, [read(p.symbol) for p in batch], policy, NOW)
    one_by_one = []
    for p in batch:
        verdict = governor.decide(p, read(p.symbol), policy, NOW)
        if verdict.allow:  # what the permit script records
            store_symbol[p.symbol] = store_symbol.get(p.symbol, 0) + 1
            store_total += 1
            store_last[p.symbol] = NOW
        one_by_one.append(verdict)
    assert together == one_by_one


@settings(max_examples=200)
@given(plans, st.dictionaries(st.sampled_from(SYMBOLS), st.just("ffffffffffffffff")))
def test_brain_batch_equals_one_at_a_time(batch, marks: dict[str, str]) -> None:
    policy = replace(BRAIN_POLICY, managed=frozenset(SYMBOLS))
    store = dict(marks)  # the model store: order-in-flight marks per symbol

    def read(symbol: str) -> brain.BrainInputs:
        return inputs(in_flight_plan=store.get(symbol))

    together = brain.decide_in_order(batch, [read(p.symbol) for p in batch], policy, NOW)
    one_by_one = []
    for p in batch:
        verdict = brain.decide(p, read(p.symbol), policy, NOW)
        if verdict.allow:  # what the permit script does
            store[p.symbol] = p.plan_id
        one_by_one.append(verdict)
    assert together == one_by_one
    assert sum(v.allow for v in together) <= len({p.symbol for p in batch})  # one close per symbol at a time
