"""The steps that must be atomic, as Lua scripts (one round trip each, nothing can interleave).

publish_plan: a plan is published once: its record and its stream entry together, or nothing if the record
    exists (a second handler of the same proposal resumes the plan instead of publishing it again).
consume_permits: both permits are exactly the ones Apply verified, the plan was never executed → delete
    both permits, set the executed marker, record the order intent, audit two ``consumed`` entries. Any other
    state → nothing changes.
issue_permit: the first decision per issuer and plan wins (claim key, SET NX); the winner's permit, its audit
    entry and an optional marker (P3.3's order-in-flight key) are written together, and the plan entry is
    acknowledged in the same transaction. A later decision only acknowledges. The marker is not set when the
    key ``mark_unless`` exists (P3.3: its ledger follower has already seen the plan's result).
publish_result: the plan has no result yet → publish it, set the result marker, free the symbol; always
    close the order intent; the proposal is acknowledged in the same transaction. A second publisher (a
    redelivery, a racing Apply) changes nothing.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys

PUBLISH_PLAN = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 4))
redis.call('HSET', KEYS[2], 'proposal_entry_id', ARGV[3], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

CONSUME_PERMITS = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 'already_executed' end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'governor_permit_changed' end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 'p33_permit_changed' end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
for _, issuer in ipairs({'governor', 'p33'}) do
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'plan_id', ARGV[5], 'issuer', 'apply',
             'decision', 'consumed', 'reason', issuer, 'subject', issuer, 'at', ARGV[6],
             'latency_ms', ARGV[9], 'symbol', ARGV[7])
end
return 'ok'
"""

PUBLISH_RESULT = """
local published = false
if redis.call('EXISTS', KEYS[1]) == 0 then
  published = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
  redis.call('SET', KEYS[1], published, 'EX', ARGV[2])
  if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
end
redis.call('ZREM', KEYS[4], ARGV[1])
return published
"""

ISSUE_PERMIT = """
local claimed = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if not claimed then
  local owner = redis.call('GET', KEYS[1])
  if owner ~= ARGV[1] then return {0, owner or ''} end
end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[5])
if ARGV[6] ~= '' and (ARGV[8] == '0' or redis.call('EXISTS', KEYS[5]) == 0) then
  redis.call('SET', KEYS[4], ARGV[6], 'EX', ARGV[7])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 9))
return {1, ARGV[1]}
"""

# Acknowledging a stream entry is not part of the scripts but of the same MULTI/EXEC as the script: a service may
# only consume its input streams (ACL selectors: XREADGROUP, XACK, ...), and a script would have to declare them.


def flatten(fields: dict[str, str]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, value]
    return flat


class Scripts:
    """The scripts registered on one client (redis-py reloads them after a store restart: NOSCRIPT)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._consume = redis.register_script(CONSUME_PERMITS)
        self._publish = redis.register_script(PUBLISH_RESULT)
        self._issue = redis.register_script(ISSUE_PERMIT)
        self._plan = redis.register_script(PUBLISH_PLAN)

    async def publish_plan(self, *, plan_id: str, fields: dict[str, str], proposal_entry_id: str, maxlen: int) -> bool:
        """Publish the plan unless it already was. True when this call published it."""
        reply: Any = await self._plan(
            keys=[keys.PLAN_STREAM, keys.plan_record(plan_id)],
            args=[maxlen, keys.PLAN_BOOKKEEPING_TTL_S, proposal_entry_id, *flatten(fields)],
        )
        return bool(int(reply))

    async def issue_permit(
        self,
        *,
        claim_key: str,
        claim_value: str,
        permit_key: str,
        permit_json: str,
        permit_ttl_s: int,
        audit_fields: dict[str, str],
        audit_maxlen: int,
        group: str = "",
        entry_id: str = "",
        mark_key: str = "",
        mark_value: str = "",
        mark_ttl_s: int = 0,
        mark_unless: str = "",
    ) -> tuple[bool, str]:
        """Write the permit if this issuer's claim on the plan is ours; ack the plan entry either way (one
        MULTI). ``mark_key`` is set unless the key ``mark_unless`` exists. Returns (written, claim owner)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            await self._issue(
                keys=[claim_key, permit_key, keys.AUDIT_STREAM, mark_key or claim_key, mark_unless or claim_key],
                args=[
                    claim_value,
                    keys.PLAN_BOOKKEEPING_TTL_S,
                    permit_json,
                    audit_maxlen,
                    permit_ttl_s,
                    mark_value if mark_key else "",
                    max(mark_ttl_s, 1),
                    "1" if mark_unless else "0",  # only then is KEYS[5] a real key to test
                    *flatten(audit_fields),
                ],
                client=pipe,
            )
            if entry_id:
                pipe.xack(keys.PLAN_STREAM, group, entry_id)
            reply: Any = (await pipe.execute())[0]
        return bool(int(reply[0])), str(reply[1])

    async def consume_permits(
        self,
        *,
        plan_id: str,
        symbol: str,
        governor_raw: str,
        p33_raw: str,
        marker: str,
        now: float,
        latency_ms: float,
        audit_maxlen: int,
    ) -> str:
        result: Any = await self._consume(
            keys=[
                keys.governor_permit(plan_id),
                keys.p33_permit(plan_id),
                keys.executed_marker(plan_id),
                keys.AUDIT_STREAM,
                keys.APPLY_INTENTS,
            ],
            args=[
                governor_raw,
                p33_raw,
                marker,
                keys.PLAN_BOOKKEEPING_TTL_S,
                plan_id,
                repr(now),
                symbol,
                audit_maxlen,
                f"{latency_ms:.3f}",
            ],
        )
        return str(result)

    async def publish_result(
        self,
        *,
        plan_id: str,
        symbol: str,
        fields: dict[str, str],
        proposal_entry_id: str,
        result_maxlen: int,
    ) -> str | None:
        """Publish the plan's one result (unless it has one) and ack its proposal, in one MULTI."""
        async with self._redis.pipeline(transaction=True) as pipe:
            await self._publish(
                keys=[
                    keys.result_marker(plan_id),
                    keys.RESULT_STREAM,
                    keys.symbol_in_flight(symbol),
                    keys.APPLY_INTENTS,
                ],
                args=[plan_id, keys.PLAN_BOOKKEEPING_TTL_S, result_maxlen, *flatten(fields)],
                client=pipe,
            )
            if proposal_entry_id:
                pipe.xack(keys.PROPOSAL_STREAM, keys.APPLY_GROUP, proposal_entry_id)
            published: Any = (await pipe.execute())[0]
        return str(published) if published else None
