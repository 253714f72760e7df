"""The atomic steps (Lua scripts) on a real store, where a race between services is decided."""

from __future__ import annotations

import pytest

from quantum_trader.bus import keys
from quantum_trader.bus.scripts import Scripts
from quantum_trader.services.brain import RELEASE_IN_FLIGHT

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
    release = rds.register_script(RELEASE_IN_FLIGHT)

    async def result_seen(plan_id: str) -> None:
        args = [plan_id, keys.PLAN_BOOKKEEPING_TTL_S]
        await release(keys=[keys.p33_symbol_in_flight("SOLUSDT"), keys.p33_result_seen(plan_id)], args=args)

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
