"""The atomic steps (Lua scripts, and P3.3's ledger transaction) on a real store, where a race between services
is decided."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from quantum_trader.bus import keys
from quantum_trader.bus.scripts import GrantCount, PermitWrite, Scripts
from quantum_trader.bus.streams import ensure_topology
from quantum_trader.domain.models import Ledger, Result, from_fields, to_fields
from quantum_trader.services.brain import record_results

pytestmark = pytest.mark.integration


async def issue_p33(rds, plan_id: str) -> tuple[bool, str]:
    return await Scripts(rds).issue_permit(
        claim_key=keys.decision_claim("p33", plan_id),
        claim_value="p33:test:1-0",
        permit_key=keys.p33_permit(plan_id),
        permit_json="{}",
        permit_ttl_s=60,
        audit_fields={"plan_id": plan_id, "issuer": "p33", "decision": "allow"},
        audit_maxlen=1000,
        mark_key=keys.p33_symbol_in_flight("SOLUSDT"),
        mark_value=plan_id,
        mark_ttl_s=15,
        mark_unless=keys.p33_result_seen(plan_id),
    )


async def test_an_allow_marks_the_symbol_in_flight_until_the_result(rds) -> None:
    assert await issue_p33(rds, "aa01") == (True, "p33:test:1-0")
    assert await rds.get(keys.p33_symbol_in_flight("SOLUSDT")) == "aa01"


async def test_an_allow_after_the_plans_result_sets_no_in_flight_mark(rds) -> None:
    """The Governor denied and Apply published the result before P3.3 decided, and P3.3's ledger follower has
    seen it go by: nothing would release the mark, which would hold the symbol back for the whole cooldown."""
    await rds.set(keys.p33_result_seen("aa02"), "1")
    assert await issue_p33(rds, "aa02") == (True, "p33:test:1-0")
    assert await rds.exists(keys.p33_permit("aa02"))
    assert not await rds.exists(keys.p33_symbol_in_flight("SOLUSDT"))


async def test_a_second_decision_for_the_plan_writes_nothing(rds) -> None:
    assert (await issue_p33(rds, "aa03"))[0]
    second = await Scripts(rds).issue_permit(
        claim_key=keys.decision_claim("p33", "aa03"),
        claim_value="p33:other:2-0",
        permit_key=keys.p33_permit("aa03"),
        permit_json='{"other": true}',
        permit_ttl_s=60,
        audit_fields={"plan_id": "aa03", "issuer": "p33", "decision": "deny"},
        audit_maxlen=1000,
    )
    assert second == (False, "p33:test:1-0")
    assert await rds.get(keys.p33_permit("aa03")) == "{}"
    assert await rds.xlen(keys.AUDIT_STREAM) == 1


async def test_the_ledger_followers_release_and_a_late_allow_cannot_interleave_into_a_stuck_mark(rds) -> None:
    """Both orders of P3.3's two steps for one plan end with the symbol free: allow then result (the release
    frees it) and result then allow (the release remembered the result, the allow sets no mark)."""
    await ensure_topology(rds)

    async def result_seen(plan_id: str) -> None:
        result = Result(plan_id=plan_id, symbol="SOLUSDT", side="LONG", executed=False, error="permit_denied")
        await record_results(rds, [(f"1-{plan_id[-1]}", result)], time.time, 1000)

    await issue_p33(rds, "bb01")
    assert await rds.get(keys.p33_symbol_in_flight("SOLUSDT")) == "bb01"
    await result_seen("bb01")
    assert not await rds.exists(keys.p33_symbol_in_flight("SOLUSDT"))

    await result_seen("bb02")
    await issue_p33(rds, "bb02")
    assert not await rds.exists(keys.p33_symbol_in_flight("SOLUSDT"))


async def test_a_mark_without_an_unless_key_is_always_set(rds) -> None:
    """Without ``mark_unless`` nothing is tested: the mark is written (no silent loss of the in-flight guard)."""
    written, _ = await Scripts(rds).issue_permit(
        claim_key=keys.decision_claim("p33", "cc01"),
        claim_value="p33:test:1-0",
        permit_key=keys.p33_permit("cc01"),
        permit_json="{}",
        permit_ttl_s=60,
        audit_fields={"plan_id": "cc01", "issuer": "p33", "decision": "allow"},
        audit_maxlen=1000,
        mark_key=keys.p33_symbol_in_flight("SOLUSDT"),
        mark_value="cc01",
        mark_ttl_s=15,
    )
    assert written and await rds.get(keys.p33_symbol_in_flight("SOLUSDT")) == "cc01"


def _fill(plan_id: str, qty: str) -> Result:
    return Result(plan_id=plan_id, symbol="SOLUSDT", side="LONG", executed=True, filled_qty=Decimal(qty))


async def test_results_read_together_move_the_ledger_in_order_and_only_once(rds) -> None:
    await ensure_topology(rds)
    start = Ledger(last_known_amt=Decimal(10), updated_at=1.0, source="reconcile")
    await rds.hset(keys.ledger("SOLUSDT"), mapping=to_fields(start))
    batch = [("5-0", _fill("dd01", "2")), ("6-0", _fill("dd02", "3"))]
    changes = await record_results(rds, batch, time.time, 1000)
    moves = [(c.before.last_known_amt if c.before else None, c.after.last_known_amt) for c in changes]
    assert moves == [(10, 8), (8, 5)]
    assert from_fields(Ledger, await rds.hgetall(keys.ledger("SOLUSDT"))).last_known_amt == 5
    assert await rds.xlen(keys.LEDGER_AUDIT_STREAM) == 2
    assert await record_results(rds, batch, time.time, 1000) == []  # redelivered: each result applies once
    assert from_fields(Ledger, await rds.hgetall(keys.ledger("SOLUSDT"))).last_known_amt == 5


async def test_a_mark_set_while_results_are_recorded_makes_the_transaction_run_again(rds) -> None:
    """P3.3's allow for the plan lands between the follower's read and its write: WATCH aborts the write, the
    second run sees the mark and frees it (and the seen key it sets stops any later allow from marking)."""
    await ensure_topology(rds)
    calls = []

    async def allow_meanwhile() -> None:
        await issue_p33(rds, "ee01")

    def clock() -> float:  # called between the read and the transaction: the interleaving point
        calls.append(1)
        return time.time()

    result = Result(plan_id="ee01", symbol="SOLUSDT", side="LONG", executed=False, error="permit_timeout")
    original = rds.pipeline

    def pipeline(*args, **kwargs):  # the follower's read pipeline: an allow lands right after it
        pipe = original(*args, **kwargs)
        if kwargs.get("transaction") is False and not calls:
            execute = pipe.execute

            async def execute_then_allow(*a, **k):
                got = await execute(*a, **k)
                await allow_meanwhile()
                return got

            pipe.execute = execute_then_allow
        return pipe

    rds.pipeline = pipeline
    try:
        await record_results(rds, [("7-0", result)], clock, 1000)
    finally:
        rds.pipeline = original
    assert len(calls) == 2  # ran twice
    assert not await rds.exists(keys.p33_symbol_in_flight("SOLUSDT"))
    assert await rds.exists(keys.p33_result_seen("ee01"))


async def test_permits_written_together_in_one_pipeline_survive_a_script_flush(rds) -> None:
    """Several decisions go out in one round trip; a store that lost its scripts (restart) gets them loaded again
    and every write still happens once. A Governor allow is counted in its rate-limit sets."""
    await rds.script_flush()
    now = time.time()
    writes = [
        PermitWrite(
            claim_key=keys.decision_claim("governor", plan_id),
            claim_value=f"governor:test:{n}-0",
            permit_key=keys.governor_permit(plan_id),
            permit_json="{}",
            permit_ttl_s=60,
            audit_fields={"plan_id": plan_id, "issuer": "governor", "decision": "allow"},
            audit_maxlen=1000,
            count=GrantCount((keys.GOVERNOR_GRANTS,), plan_id, now, now - 60, 120),
        )
        for n, plan_id in enumerate(("ff01", "ff02", "ff03"))
    ]
    assert await Scripts(rds).issue_permits(writes) == [(True, f"governor:test:{n}-0") for n in range(3)]
    assert await rds.zcard(keys.GOVERNOR_GRANTS) == 3 and await rds.xlen(keys.AUDIT_STREAM) == 3
    again = await Scripts(rds).issue_permits(writes)  # a redelivery by the same consumer: same owner, no new count
    assert again == [(True, f"governor:test:{n}-0") for n in range(3)] and await rds.zcard(keys.GOVERNOR_GRANTS) == 3


async def test_an_executing_plan_is_not_published_while_another_holds_its_symbol(rds) -> None:
    scripts = Scripts(rds)
    hold = keys.symbol_in_flight("SOLUSDT")
    fields = {"plan_id": "gg01", "symbol": "SOLUSDT"}
    assert await scripts.publish_plan(plan_id="gg01", fields=fields, proposal_entry_id="1-0", maxlen=100,
                                      hold_key=hold, hold_ms=60_000) == "published"  # fmt: skip
    assert await rds.get(hold) == "gg01"
    other = {"plan_id": "gg02", "symbol": "SOLUSDT"}
    assert await scripts.publish_plan(plan_id="gg02", fields=other, proposal_entry_id="2-0", maxlen=100,
                                      hold_key=hold, hold_ms=60_000) == "busy"  # fmt: skip
    assert await rds.xlen(keys.PLAN_STREAM) == 1 and not await rds.exists(keys.plan_record("gg02"))
    assert await scripts.publish_plan(plan_id="gg01", fields=fields, proposal_entry_id="1-0", maxlen=100,
                                      hold_key=hold, hold_ms=60_000) == "exists"  # fmt: skip
