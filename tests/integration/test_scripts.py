"""The atomic steps (Lua scripts, and P3.3's ledger transaction) on a real store, where a race between services
is decided."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.bus.scripts import GrantCount, PermitWrite, Scripts
from quantum_trader.bus.streams import ensure_topology
from quantum_trader.domain.models import Ledger, Result, from_fields, to_fields
from quantum_trader.services.brain.ledger import record_results

pytestmark = pytest.mark.integration


async def issue_p33(rds: aioredis.Redis, plan_id: str) -> tuple[bool, str]:
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


async def test_an_allow_marks_the_symbol_in_flight_until_the_result(rds: aioredis.Redis) -> None:
    assert await issue_p33(rds, "aa01") == (True, "p33:test:1-0")
    assert await rds.get(keys.p33_symbol_in_flight("SOLUSDT")) == "aa01"


async def test_an_allow_after_the_plans_result_sets_no_in_flight_mark(rds: aioredis.Redis) -> None:
    """The Governor denied and Apply published the result before P3.3 decided, and P3.3's ledger follower has
    seen it go by: nothing would release the mark, which would hold the symbol back for the whole cooldown."""
    await rds.set(keys.p33_result_seen("aa02"), "1")
    assert await issue_p33(rds, "aa02") == (True, "p33:test:1-0")
    assert await rds.exists(keys.p33_permit("aa02"))
    assert not await rds.exists(keys.p33_symbol_in_flight("SOLUSDT"))


async def test_a_second_decision_for_the_plan_writes_nothing(rds: aioredis.Redis) -> None:
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


async def test_the_ledger_followers_release_and_a_late_allow_cannot_interleave_into_a_stuck_mark(
    rds: aioredis.Redis,
) -> None:
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


async def test_a_mark_without_an_unless_key_is_always_set(rds: aioredis.Redis) -> None:
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


async def test_results_read_together_move_the_ledger_in_order_and_only_once(rds: aioredis.Redis) -> None:
    await ensure_topology(rds)
    start = Ledger(last_known_amt=Decimal(10), updated_at=1.0, source="reconcile")
    await rds.hset(keys.ledger("SOLUSDT"), mapping=to_fields(start))
    batch = [("5-0", _fill("dd01", "2")), ("6-0", _fill("dd02", "3"))]
    changes = await record_results(rds, batch, time.time, 1000)
    moves = [(c.before.last_known_amt if c.before else None, c.after.last_known_amt) for c in changes]
    assert moves == [(Decimal(10), Decimal(8)), (Decimal(8), Decimal(5))]
    assert from_fields(Ledger, await rds.hgetall(keys.ledger("SOLUSDT"))).last_known_amt == 5
    assert await rds.xlen(keys.LEDGER_AUDIT_STREAM) == 2
    assert await record_results(rds, batch, time.time, 1000) == []  # redelivered: each result applies once
    assert from_fields(Ledger, await rds.hgetall(keys.ledger("SOLUSDT"))).last_known_amt == 5


async def test_a_mark_set_while_results_are_recorded_makes_the_transaction_run_again(rds: aioredis.Redis) -> None:
    """P3.3's allow for the plan lands between the follower's read and its write: WATCH aborts the write, the
    second run sees the mark and frees it (and the seen key it sets stops any later allow from marking)."""
    await ensure_topology(rds)
    calls: list[int] = []

    async def allow_meanwhile() -> None:
        await issue_p33(rds, "ee01")

    def clock() -> float:  # called between the read and the transaction: the interleaving point
        calls.append(1)
        return time.time()

    result = Result(plan_id="ee01", symbol="SOLUSDT", side="LONG", executed=False, error="permit_timeout")
    original = rds.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:  # the follower's read pipeline: an allow lands right after it
        pipe = original(*args, **kwargs)
        if kwargs.get("transaction") is False and not calls:
            execute = pipe.execute

            async def execute_then_allow(*a: Any, **k: Any) -> Any:
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


async def test_permits_written_together_in_one_pipeline_survive_a_script_flush(rds: aioredis.Redis) -> None:
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


async def test_an_executing_plan_is_not_published_while_another_holds_its_symbol(rds: aioredis.Redis) -> None:
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


# --- every script, one step at a time: what it writes, what it refuses, when it acknowledges -----------------

PLAN = "ab01ab01ab01ab01"
GOV_RAW, P33_RAW = b'{"granted": true, "issuer": "governor"}', b'{"allow": true, "issuer": "p33"}'
MARKER = '{"client_order_id": "qt-ab01ab01ab01ab01", "at": 1.0}'


async def store_state(rds: aioredis.Redis) -> dict[str, Any]:
    """Every key with its type, whole value and whether it expires: equal before and after = nothing changed."""
    state: dict[str, Any] = {}
    async for key in rds.scan_iter(count=1000):
        kind = await rds.type(key)
        if kind == "string":
            value: Any = await rds.get(key)
        elif kind == "hash":
            value = await rds.hgetall(key)
        elif kind == "zset":
            value = await rds.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await rds.xrange(key)
        elif kind == "set":
            value = sorted(await rds.smembers(key))
        else:
            value = await rds.lrange(key, 0, -1)
        state[key] = (kind, value, await rds.ttl(key) > 0)
    return state


async def consume(
    rds: aioredis.Redis, governor_raw: bytes = GOV_RAW, p33_raw: bytes = P33_RAW, expected_epoch: str = ""
) -> str:
    return await Scripts(rds).consume_permits(
        plan_id=PLAN,
        symbol="SOLUSDT",
        governor_raw=governor_raw,
        p33_raw=p33_raw,
        marker=MARKER,
        now=1_700_000_000.25,
        latency_ms=12.5,
        audit_maxlen=1000,
        expected_epoch=expected_epoch,
    )


async def both_permits(rds: aioredis.Redis) -> None:
    await rds.set(keys.governor_permit(PLAN), GOV_RAW, ex=60)
    await rds.set(keys.p33_permit(PLAN), P33_RAW, ex=60)


async def test_consume_takes_both_permits_marks_records_and_audits_once(rds: aioredis.Redis) -> None:
    await both_permits(rds)
    assert await consume(rds) == "ok"
    assert not await rds.exists(keys.governor_permit(PLAN), keys.p33_permit(PLAN))
    assert await rds.get(keys.executed_marker(PLAN)) == MARKER
    assert await rds.ttl(keys.executed_marker(PLAN)) > 0
    assert await rds.zscore(keys.APPLY_INTENTS, PLAN) == 1_700_000_000.25
    audit = [fields for _, fields in await rds.xrange(keys.AUDIT_STREAM)]
    assert [(f["plan_id"], f["issuer"], f["decision"], f["subject"], f["symbol"]) for f in audit] == [
        (PLAN, "apply", "consumed", "governor", "SOLUSDT"),
        (PLAN, "apply", "consumed", "p33", "SOLUSDT"),
    ]
    before = await store_state(rds)
    await both_permits(rds)  # even fresh permits written again (a racing issuer) are not consumed a second time
    again = await store_state(rds)
    assert await consume(rds) == "already_executed"
    assert await store_state(rds) == again
    assert {k: v for k, v in again.items() if k not in (keys.governor_permit(PLAN), keys.p33_permit(PLAN))} == before


async def test_consume_of_an_executed_plan_consumes_nothing_even_with_valid_permits(rds: aioredis.Redis) -> None:
    """Another handler consumed the plan's permits (its executed marker is set) and the issuers' permits are
    present again, byte for byte what this handler verified: nothing may be consumed, marked or recorded."""
    await rds.set(keys.executed_marker(PLAN), '{"client_order_id": "other"}', ex=600)
    await both_permits(rds)
    before = await store_state(rds)
    assert await consume(rds) == "already_executed"
    assert await store_state(rds) == before
    assert await rds.get(keys.governor_permit(PLAN)) == GOV_RAW.decode()
    assert await rds.zcard(keys.APPLY_INTENTS) == 0 and await rds.xlen(keys.AUDIT_STREAM) == 0


@pytest.mark.parametrize(
    ("stored_governor", "stored_p33", "status"),
    [
        (b'{"granted": true, "issuer": "forged"}', P33_RAW, "governor_permit_changed"),
        (GOV_RAW, b'{"allow": true, "issuer": "forged"}', "p33_permit_changed"),
        (None, P33_RAW, "governor_permit_changed"),  # expired between the check and the consume
        (GOV_RAW, None, "p33_permit_changed"),
        (b"{}", b"{}", "governor_permit_changed"),
    ],
)
async def test_a_permit_swapped_after_verification_is_not_consumed(
    rds: aioredis.Redis, stored_governor: bytes | None, stored_p33: bytes | None, status: str
) -> None:
    if stored_governor is not None:
        await rds.set(keys.governor_permit(PLAN), stored_governor, ex=60)
    if stored_p33 is not None:
        await rds.set(keys.p33_permit(PLAN), stored_p33, ex=60)
    before = await store_state(rds)
    assert await consume(rds) == status  # Apply verified GOV_RAW and P33_RAW
    assert await store_state(rds) == before
    assert not await rds.exists(keys.executed_marker(PLAN), keys.APPLY_INTENTS, keys.AUDIT_STREAM)


async def test_consume_after_the_plan_has_its_result_is_already_finished(rds: aioredis.Redis) -> None:
    await rds.set(keys.result_marker(PLAN), "5-0", ex=600)
    await both_permits(rds)
    before = await store_state(rds)
    assert await consume(rds) == "already_finished"
    assert await store_state(rds) == before
    assert not await rds.exists(keys.executed_marker(PLAN), keys.APPLY_INTENTS, keys.AUDIT_STREAM)


async def pending_entry(rds: aioredis.Redis, stream: str, group: str) -> str:
    """One entry of ``stream`` read by ``group`` and not yet acknowledged."""
    await ensure_topology(rds)
    entry_id = await rds.xadd(stream, {"plan_id": PLAN})
    read = await rds.xreadgroup(group, "test-consumer", {stream: ">"}, count=1)
    assert read[0][1][0][0] == entry_id
    assert (await rds.xpending(stream, group))["pending"] == 1
    return str(entry_id)


async def pending(rds: aioredis.Redis, stream: str, group: str) -> int:
    return int((await rds.xpending(stream, group))["pending"])


RESULT_FIELDS = {"plan_id": PLAN, "symbol": "SOLUSDT", "executed": "true", "filled_qty": "1"}


async def publish_result(
    rds: aioredis.Redis, entry_id: str, *, no_order: bool = False, expected_epoch: str = "", **fields: str
) -> str:
    return await Scripts(rds).publish_result(
        plan_id=PLAN,
        symbol="SOLUSDT",
        fields={**RESULT_FIELDS, **fields},
        proposal_entry_id=entry_id,
        result_maxlen=1000,
        no_order=no_order,
        expected_epoch=expected_epoch,
    )


async def test_a_result_is_published_with_its_effects_and_its_acknowledgement_together(rds: aioredis.Redis) -> None:
    entry = await pending_entry(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP)
    await rds.set(keys.symbol_in_flight("SOLUSDT"), PLAN)
    await rds.zadd(keys.APPLY_INTENTS, {PLAN: 1.0, "other-plan": 2.0})
    assert await publish_result(rds, entry) == "published"
    published = await rds.xrange(keys.RESULT_STREAM)
    assert len(published) == 1 and published[0][1] == RESULT_FIELDS
    assert await rds.get(keys.result_marker(PLAN)) == published[0][0]
    assert not await rds.exists(keys.symbol_in_flight("SOLUSDT"))
    assert await rds.zrange(keys.APPLY_INTENTS, 0, -1) == ["other-plan"]
    assert await pending(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP) == 0


async def test_a_result_leaves_another_plans_hold_of_the_symbol(rds: aioredis.Redis) -> None:
    await rds.set(keys.symbol_in_flight("SOLUSDT"), "other-plan")
    assert await publish_result(rds, "") == "published"
    assert await rds.get(keys.symbol_in_flight("SOLUSDT")) == "other-plan"


async def test_a_second_result_writes_nothing_and_still_acknowledges(rds: aioredis.Redis) -> None:
    """The result came from elsewhere first (the intent sweep, a racing Apply) without acknowledging this
    proposal: the proposal's own publish finds it, adds nothing, and acknowledges the proposal."""
    entry = await pending_entry(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP)
    assert await publish_result(rds, "") == "published"
    assert await pending(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP) == 1  # no entry given: none acknowledged
    before = await store_state(rds)
    assert await publish_result(rds, entry, executed="false", error="order_not_placed", filled_qty="0") == "exists"
    assert await store_state(rds) == before
    assert await rds.xlen(keys.RESULT_STREAM) == 1
    assert await pending(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP) == 0


async def test_a_no_order_result_is_refused_while_the_plan_is_executed(rds: aioredis.Redis) -> None:
    """Another handler consumed the permits: a timeout result would hide its order. Nothing is written and the
    proposal stays pending (it is how the plan gets recovered)."""
    entry = await pending_entry(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP)
    await rds.set(keys.executed_marker(PLAN), MARKER, ex=600)
    await rds.set(keys.symbol_in_flight("SOLUSDT"), PLAN)
    await rds.zadd(keys.APPLY_INTENTS, {PLAN: 1.0})
    before = await store_state(rds)
    timeout = {"executed": "false", "error": "permit_timeout", "filled_qty": "0"}
    assert await publish_result(rds, entry, no_order=True, **timeout) == "executed"
    assert await store_state(rds) == before
    assert await rds.xlen(keys.RESULT_STREAM) == 0 and not await rds.exists(keys.result_marker(PLAN))
    assert await pending(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP) == 1
    # the order's own outcome is the result it waits for
    assert await publish_result(rds, entry) == "published"
    assert await rds.xlen(keys.RESULT_STREAM) == 1 and await pending(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP) == 0


async def issue(rds: aioredis.Redis, owner: str, decision: str, entry_id: str = "") -> tuple[bool, str]:
    return await Scripts(rds).issue_permit(
        claim_key=keys.decision_claim("p33", PLAN),
        claim_value=owner,
        permit_key=keys.p33_permit(PLAN),
        permit_json=f'{{"decision": "{decision}"}}',
        permit_ttl_s=60,
        audit_fields={"plan_id": PLAN, "issuer": "p33", "decision": decision},
        audit_maxlen=1000,
        group=keys.P33_GROUP if entry_id else "",
        entry_id=entry_id,
    )


async def test_a_permit_and_the_acknowledgement_of_its_plan_entry_go_together(rds: aioredis.Redis) -> None:
    entry = await pending_entry(rds, keys.PLAN_STREAM, keys.P33_GROUP)
    assert await issue(rds, "p33:a:1-0", "allow", entry) == (True, "p33:a:1-0")
    assert await rds.get(keys.p33_permit(PLAN)) == '{"decision": "allow"}'
    assert await rds.xlen(keys.AUDIT_STREAM) == 1
    assert await pending(rds, keys.PLAN_STREAM, keys.P33_GROUP) == 0
    assert await pending(rds, keys.PLAN_STREAM, keys.GOVERNOR_GROUP) == 0  # only its own group: never read there


async def test_a_losing_decision_writes_nothing_and_only_acknowledges(rds: aioredis.Redis) -> None:
    entry = await pending_entry(rds, keys.PLAN_STREAM, keys.P33_GROUP)
    assert await issue(rds, "p33:a:1-0", "allow") == (True, "p33:a:1-0")
    assert await pending(rds, keys.PLAN_STREAM, keys.P33_GROUP) == 1  # no entry given: none acknowledged
    before = await store_state(rds)
    assert await issue(rds, "p33:b:1-0", "deny", entry) == (False, "p33:a:1-0")
    assert await store_state(rds) == before
    assert await pending(rds, keys.PLAN_STREAM, keys.P33_GROUP) == 0


async def publish_plan(rds: aioredis.Redis, plan_id: str, hold: bool, **fields: str) -> str:
    return await Scripts(rds).publish_plan(
        plan_id=plan_id,
        fields={"plan_id": plan_id, "symbol": "SOLUSDT", "decision": "EXECUTE", **fields},
        proposal_entry_id="1-0",
        request="SOLUSDT|FULL_CLOSE||",
        maxlen=1000,
        hold_key=keys.symbol_in_flight("SOLUSDT") if hold else "",
        hold_ms=60_000 if hold else 0,
    )


@pytest.mark.parametrize("hold", [True, False])
async def test_a_second_publish_of_the_same_plan_writes_nothing(rds: aioredis.Redis, hold: bool) -> None:
    assert await publish_plan(rds, PLAN, hold) == "published"
    assert await rds.xlen(keys.PLAN_STREAM) == 1
    assert await rds.hgetall(keys.plan_record(PLAN)) == {
        "proposal_entry_id": "1-0",
        "request": "SOLUSDT|FULL_CLOSE||",  # what the proposal asked: a retry must ask the same
        "plan_id": PLAN,
        "symbol": "SOLUSDT",
        "decision": "EXECUTE",
    }
    assert await rds.get(keys.symbol_in_flight("SOLUSDT")) == (PLAN if hold else None)
    before = await store_state(rds)
    assert await publish_plan(rds, PLAN, hold, decision="SKIP") == "exists"
    assert await store_state(rds) == before


async def test_a_plan_refused_as_busy_writes_nothing(rds: aioredis.Redis) -> None:
    assert await publish_plan(rds, "other-plan", True) == "published"
    before = await store_state(rds)
    assert await publish_plan(rds, PLAN, True) == "busy"
    assert await store_state(rds) == before


async def test_the_hold_for_an_unknown_outcome_lasts_as_long_as_its_intent_and_no_longer(rds: aioredis.Redis) -> None:
    scripts = Scripts(rds)
    hold = keys.symbol_in_flight("SOLUSDT")
    # no intent recorded (resolved, or never consumed): no hold at all
    assert await scripts.hold_for_intent(plan_id=PLAN, symbol="SOLUSDT") is False
    assert not await rds.exists(hold)
    await rds.zadd(keys.APPLY_INTENTS, {"other-plan": 1.0})
    assert await scripts.hold_for_intent(plan_id=PLAN, symbol="SOLUSDT") is False
    assert not await rds.exists(hold)
    # recorded, but its plan's record (whose expiry ends the intent) is gone: no hold
    await rds.zadd(keys.APPLY_INTENTS, {PLAN: 2.0})
    assert await scripts.hold_for_intent(plan_id=PLAN, symbol="SOLUSDT") is False
    assert not await rds.exists(hold)
    # recorded: the symbol is held for the plan until its record expires, not a moment longer
    await rds.hset(keys.plan_record(PLAN), mapping={"plan_id": PLAN})
    await rds.pexpire(keys.plan_record(PLAN), 90_000)
    assert await scripts.hold_for_intent(plan_id=PLAN, symbol="SOLUSDT") is True
    assert await rds.get(hold) == PLAN
    assert 89_000 < await rds.pttl(hold) <= await rds.pttl(keys.plan_record(PLAN)) + 50
    # the result that closes the intent frees the hold in the same step
    assert await publish_result(rds, "") == "published"
    assert await rds.zscore(keys.APPLY_INTENTS, PLAN) is None and not await rds.exists(hold)
    assert await scripts.hold_for_intent(plan_id=PLAN, symbol="SOLUSDT") is False
    assert not await rds.exists(hold)


# --- what each script leaves behind expires when it should (read from PTTL, never waited for) ---------------

DAY_MS = keys.PLAN_BOOKKEEPING_TTL_S * 1000


async def expires_within(rds: aioredis.Redis, key: str, ttl_ms: int) -> bool:
    """``key`` was just given ``ttl_ms``: its PTTL is at most that and at most a second less."""
    left = int(await rds.pttl(key))
    return ttl_ms - 1000 < left <= ttl_ms


async def test_a_published_plans_record_and_symbol_hold_expire(rds: aioredis.Redis) -> None:
    assert await publish_plan(rds, PLAN, True) == "published"
    assert await expires_within(rds, keys.plan_record(PLAN), DAY_MS)
    assert await expires_within(rds, keys.symbol_in_flight("SOLUSDT"), 60_000)  # publish_plan's hold_ms


async def test_hold_ms_without_a_hold_key_takes_no_hold(rds: aioredis.Redis) -> None:
    """The hold is taken only on ``hold_key``: without one no key but the plan's stream and record is written
    (not the record's key as a hold, not a default key)."""
    assert await Scripts(rds).publish_plan(
        plan_id=PLAN, fields={"plan_id": PLAN}, proposal_entry_id="1-0", maxlen=100, hold_ms=60_000
    ) == "published"  # fmt: skip
    assert set(await store_state(rds)) == {keys.PLAN_STREAM, keys.plan_record(PLAN)}
    assert await rds.hgetall(keys.plan_record(PLAN)) == {"proposal_entry_id": "1-0", "request": "", "plan_id": PLAN}


async def test_a_hold_key_without_hold_ms_takes_no_hold_and_is_not_refused(rds: aioredis.Redis) -> None:
    """``hold_ms`` 0 (the default) means no hold: another plan's hold of the key neither stops the plan nor
    is touched."""
    hold = keys.symbol_in_flight("SOLUSDT")
    await rds.set(hold, "other-plan", px=60_000)
    assert await Scripts(rds).publish_plan(
        plan_id=PLAN, fields={"plan_id": PLAN}, proposal_entry_id="1-0", maxlen=100, hold_key=hold
    ) == "published"  # fmt: skip
    assert await rds.get(hold) == "other-plan" and await expires_within(rds, hold, 60_000)


async def test_a_results_marker_expires_with_the_plans_bookkeeping(rds: aioredis.Redis) -> None:
    assert await publish_result(rds, "") == "published"
    assert await expires_within(rds, keys.result_marker(PLAN), DAY_MS)


async def test_a_result_without_no_order_is_the_orders_own_and_is_published_while_executed(
    rds: aioredis.Redis,
) -> None:
    """``no_order`` defaults to False: the caller that sent the order publishes its outcome without saying so."""
    await rds.set(keys.executed_marker(PLAN), MARKER, ex=600)
    status = await Scripts(rds).publish_result(
        plan_id=PLAN, symbol="SOLUSDT", fields=RESULT_FIELDS, proposal_entry_id="", result_maxlen=1000
    )
    assert status == "published" and await rds.xlen(keys.RESULT_STREAM) == 1


async def test_a_permit_its_claim_and_its_in_flight_mark_expire(rds: aioredis.Redis) -> None:
    assert await issue_p33(rds, "hh01") == (True, "p33:test:1-0")
    assert await expires_within(rds, keys.p33_permit("hh01"), 60_000)  # permit_ttl_s
    assert await expires_within(rds, keys.p33_symbol_in_flight("SOLUSDT"), 15_000)  # mark_ttl_s
    assert await expires_within(rds, keys.decision_claim("p33", "hh01"), DAY_MS)


def p33_write(plan_id: str, **extra: Any) -> PermitWrite:
    return PermitWrite(
        claim_key=keys.decision_claim("p33", plan_id),
        claim_value="p33:test:1-0",
        permit_key=keys.p33_permit(plan_id),
        permit_json="{}",
        permit_ttl_s=60,
        audit_fields={"plan_id": plan_id, "issuer": "p33", "decision": "allow"},
        audit_maxlen=1000,
        **extra,
    )


async def test_a_mark_lasts_at_least_a_second(rds: aioredis.Redis) -> None:
    """A mark_ttl_s of 0 would be an invalid EX: it is raised to one second, not more."""
    mark = keys.p33_symbol_in_flight("SOLUSDT")
    assert await Scripts(rds).issue_permits([p33_write("hh02", mark_key=mark, mark_value="hh02")]) == [
        (True, "p33:test:1-0")
    ]
    assert await rds.get(mark) == "hh02" and await expires_within(rds, mark, 1000)


async def test_a_mark_value_without_a_mark_key_marks_nothing(rds: aioredis.Redis) -> None:
    """Without ``mark_key`` the script's mark key is the claim key: the claim must keep its value and expiry."""
    await Scripts(rds).issue_permits([p33_write("hh03", mark_value="hh03", mark_ttl_s=15)])
    claim = keys.decision_claim("p33", "hh03")
    assert await rds.get(claim) == "p33:test:1-0" and await expires_within(rds, claim, DAY_MS)
    assert set(await store_state(rds)) == {claim, keys.p33_permit("hh03"), keys.AUDIT_STREAM}


async def test_a_governor_allow_is_counted_in_a_window_trimmed_to_its_start_that_expires(
    rds: aioredis.Redis,
) -> None:
    now = 1_700_000_000.0
    await rds.zadd(keys.GOVERNOR_GRANTS, {"old-plan": now - 61, "recent-plan": now - 59})
    write = PermitWrite(
        claim_key=keys.decision_claim("governor", "hh04"),
        claim_value="governor:test:1-0",
        permit_key=keys.governor_permit("hh04"),
        permit_json="{}",
        permit_ttl_s=60,
        audit_fields={"plan_id": "hh04", "issuer": "governor", "decision": "allow"},
        audit_maxlen=1000,
        count=GrantCount((keys.GOVERNOR_GRANTS,), "hh04", now, now - 60, 120),
    )
    assert await Scripts(rds).issue_permits([write]) == [(True, "governor:test:1-0")]
    assert await rds.zrange(keys.GOVERNOR_GRANTS, 0, -1, withscores=True) == [
        ("recent-plan", now - 59),
        ("hh04", now),
    ]
    assert await expires_within(rds, keys.GOVERNOR_GRANTS, 120_000)


async def test_the_consumed_audit_lines_carry_each_permits_exact_bytes(rds: aioredis.Redis) -> None:
    await both_permits(rds)
    assert await consume(rds) == "ok"
    audit = [fields for _, fields in await rds.xrange(keys.AUDIT_STREAM)]
    assert [(f["subject"], f["permit"]) for f in audit] == [
        ("governor", GOV_RAW.decode()),
        ("p33", P33_RAW.decode()),
    ]
    assert [(f["at"], f["latency_ms"]) for f in audit] == [(repr(1_700_000_000.25), "12.500")] * 2


async def test_the_hold_for_an_intent_whose_record_never_expires_lasts_the_bookkeeping_time(
    rds: aioredis.Redis,
) -> None:
    await rds.zadd(keys.APPLY_INTENTS, {PLAN: 1.0})
    await rds.hset(keys.plan_record(PLAN), mapping={"plan_id": PLAN})  # no expiry (written by hand, say)
    assert await Scripts(rds).hold_for_intent(plan_id=PLAN, symbol="SOLUSDT") is True
    hold = keys.symbol_in_flight("SOLUSDT")
    assert await rds.get(hold) == PLAN and await expires_within(rds, hold, DAY_MS)


async def test_permits_written_together_are_one_pipeline_of_scripts_not_a_transaction(embedded_store: str) -> None:
    """issue_permits runs each script once, all in one pipeline: no MULTI/EXEC around them, no NOSCRIPT and
    second run while the script is loaded. Counted on the embedded store, which only this test process uses
    (the shared Redis counts other clients' commands too)."""
    client = make_client(embedded_store)
    try:
        await client.flushdb()
        scripts = Scripts(client)
        await scripts.issue_permits([p33_write("ii00")])  # one write: loads the script if it is not
        before = await client.info("commandstats")
        errors_before = await client.info("errorstats")
        writes = [p33_write(f"ii0{n}") for n in (1, 2, 3)]
        assert await scripts.issue_permits(writes) == [(True, "p33:test:1-0")] * 3
        after = await client.info("commandstats")
        errors_after = await client.info("errorstats")
    finally:
        await client.aclose()

    def calls(stats: dict[str, Any], command: str) -> int:
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    assert calls(after, "evalsha") - calls(before, "evalsha") == 3
    assert calls(after, "exec") == calls(before, "exec") and calls(after, "multi") == calls(before, "multi")
    noscript = "errorstat_NOSCRIPT"
    assert errors_after.get(noscript, {}).get("count", 0) == errors_before.get(noscript, {}).get("count", 0)


# --- the instance check: a step decided on one store instance's word is refused on another ------------------

EPOCH_KEY = "run-1|repl-1|1700000000000-0|1700000000.5"
EPOCH_RECORD = {
    "run_id": "run-1",
    "replid": "repl-1",
    "floor": "1700000000000-0",
    "since": "1700000000.5",
    "key": EPOCH_KEY,
}


def new_epoch(**fields: str) -> dict[str, str]:
    """The record of an epoch begun by another instance (or the same one again): another key."""
    record = {**EPOCH_RECORD, **fields}
    return {**record, "key": "|".join(record[name] for name in ("run_id", "replid", "floor", "since"))}


@pytest.mark.parametrize(
    "change",
    [
        new_epoch(run_id="run-2"),
        new_epoch(replid="repl-2"),
        new_epoch(floor="1700000000001-0"),
        new_epoch(since="1700000000.6"),
        None,
    ],
    ids=["restarted", "promoted", "another_floor", "another_since", "no_record"],
)
async def test_consume_refuses_when_the_store_is_not_the_instance_expected(
    rds: aioredis.Redis, change: dict[str, str] | None
) -> None:
    if change is not None:
        await rds.hset(keys.STORE_EPOCH, mapping={**EPOCH_RECORD, **change})
    await both_permits(rds)
    before = await store_state(rds)
    assert await consume(rds, expected_epoch=EPOCH_KEY) == "store_changed"
    assert await store_state(rds) == before


async def test_consume_on_the_instance_expected_consumes(rds: aioredis.Redis) -> None:
    await rds.hset(keys.STORE_EPOCH, mapping=EPOCH_RECORD)
    await both_permits(rds)
    assert await consume(rds, expected_epoch=EPOCH_KEY) == "ok"
    assert await rds.get(keys.executed_marker(PLAN)) == MARKER


async def test_consume_on_an_instance_that_continues_the_epoch_consumes(rds: aioredis.Redis) -> None:
    """A restart that lost nothing (bus/identity.py CLAIM_EPOCH): another instance, the same epoch key. A plan
    vouched on the instance before it is consumed; before continuity it was refused, and answered store_changed."""
    await rds.hset(keys.STORE_EPOCH, mapping={**EPOCH_RECORD, "run_id": "run-2", "replid": "repl-2"})
    await both_permits(rds)
    assert await consume(rds, expected_epoch=EPOCH_KEY) == "ok"
    assert await rds.get(keys.executed_marker(PLAN)) == MARKER


@pytest.mark.parametrize("no_order", [True, False])
async def test_a_result_is_refused_when_the_store_is_not_the_instance_expected(
    rds: aioredis.Redis, no_order: bool
) -> None:
    """Nothing published, nothing freed, nothing acknowledged: the exchange is asked first."""
    entry = await pending_entry(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP)
    await rds.hset(keys.STORE_EPOCH, mapping=new_epoch(run_id="run-2"))
    await rds.set(keys.symbol_in_flight("SOLUSDT"), PLAN)
    before = await store_state(rds)
    assert await publish_result(rds, entry, no_order=no_order, expected_epoch=EPOCH_KEY) == "store_changed"
    assert await store_state(rds) == before
    assert await pending(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP) == 1


async def test_a_result_already_published_is_acknowledged_whatever_the_instance(rds: aioredis.Redis) -> None:
    """The one result exists: a redelivery only acknowledges, even on another instance (nothing is decided)."""
    entry = await pending_entry(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP)
    await rds.set(keys.result_marker(PLAN), "5-0", ex=600)
    await rds.hset(keys.STORE_EPOCH, mapping=new_epoch(run_id="run-2"))
    assert await publish_result(rds, entry, expected_epoch=EPOCH_KEY) == "exists"
    assert await pending(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP) == 0


async def test_a_result_on_the_instance_expected_is_published(rds: aioredis.Redis) -> None:
    entry = await pending_entry(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP)
    await rds.hset(keys.STORE_EPOCH, mapping=EPOCH_RECORD)
    assert await publish_result(rds, entry, no_order=True, expected_epoch=EPOCH_KEY) == "published"
    assert await rds.exists(keys.result_marker(PLAN))
