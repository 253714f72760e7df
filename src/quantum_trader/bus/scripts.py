"""The steps that must be atomic, as Lua scripts (one round trip each, nothing can interleave).

publish_plan: a plan is published once: its record and its stream entry together, or nothing if the record
    exists (a second handler of the same proposal resumes the plan instead of publishing it again). An
    executing plan first takes its symbol (Apply's one-close-per-symbol hold); if another plan holds it,
    nothing is published and Apply publishes a SKIP plan instead.
consume_permits: both permits are exactly the ones Apply verified, the plan was never executed and has no
    result yet (a result ends a plan: nothing may be executed after it) → delete
    both permits, set the executed marker, record the order intent, audit two ``consumed`` entries (each with
    the consumed permit's exact bytes, ``permit``: what was consumed can be verified afterwards by anyone with
    the key, without trusting Apply's check). Any other state → nothing changes.
issue_permit: the first decision per issuer and plan wins (claim key, SET NX); the winner's permit, its audit
    entry, an optional marker (P3.3's order-in-flight key) and, for a Governor allow, its rate-limit count are
    written together, and the plan entry is acknowledged in the same script. A later decision only
    acknowledges. The marker is not set when the key ``mark_unless`` exists (P3.3: its ledger follower has
    already seen the plan's result).
hold_for_intent: an order whose outcome is unknown holds its symbol for as long as its intent is recorded
    (the intent lives as long as the plan's bookkeeping): the hold cannot outlive the intent it stands for.
publish_result: the plan has no result yet → publish it, set the result marker, free the symbol, close the
    order intent, and acknowledge the proposal, in one script. A second publisher (a redelivery, a racing
    Apply) changes nothing but the acknowledgement. A result that says no order was sent (``no_order``: a
    timeout, a deny, a skip) is refused while the plan's executed marker exists: another handler consumed
    its permits and may have sent it, and only the order's outcome may be the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from quantum_trader.bus import keys

PUBLISH_PLAN = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if ARGV[4] ~= '0' then
  local held = redis.call('SET', KEYS[3], ARGV[5], 'NX', 'PX', ARGV[4])
  if not held and redis.call('GET', KEYS[3]) ~= ARGV[5] then return 2 end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 6))
redis.call('HSET', KEYS[2], 'proposal_entry_id', ARGV[3], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

CONSUME_PERMITS = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 'already_executed' end
if redis.call('EXISTS', KEYS[6]) == 1 then return 'already_finished' end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'governor_permit_changed' end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 'p33_permit_changed' end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
local permits = {governor = ARGV[1], p33 = ARGV[2]}
for _, issuer in ipairs({'governor', 'p33'}) do
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'plan_id', ARGV[5], 'issuer', 'apply',
             'decision', 'consumed', 'reason', issuer, 'subject', issuer, 'at', ARGV[6],
             'latency_ms', ARGV[9], 'symbol', ARGV[7], 'permit', permits[issuer])
end
return 'ok'
"""

PUBLISH_RESULT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZREM', KEYS[4], ARGV[1])
  if ARGV[6] ~= '' then redis.call('XACK', ARGV[4], ARGV[5], ARGV[6]) end
  return {'exists', ''}
end
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[5]) == 1 then return {'executed', ''} end
local published = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 8))
redis.call('SET', KEYS[1], published, 'EX', ARGV[2])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[6] ~= '' then redis.call('XACK', ARGV[4], ARGV[5], ARGV[6]) end
return {'published', published}
"""

ISSUE_PERMIT = """
local function ack()
  if ARGV[11] ~= '' then redis.call('XACK', ARGV[9], ARGV[10], ARGV[11]) end
end
local claimed = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if not claimed then
  local owner = redis.call('GET', KEYS[1])
  if owner ~= ARGV[1] then
    ack()
    return {0, owner or ''}
  end
end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[5])
if ARGV[6] ~= '' and (ARGV[8] == '0' or redis.call('EXISTS', KEYS[5]) == 0) then
  redis.call('SET', KEYS[4], ARGV[6], 'EX', ARGV[7])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 16))
if ARGV[12] ~= '' then
  for i = 6, #KEYS do
    redis.call('ZADD', KEYS[i], ARGV[13], ARGV[12])
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[14])
    redis.call('EXPIRE', KEYS[i], ARGV[15])
  end
end
ack()
return {1, ARGV[1]}
"""

HOLD_FOR_INTENT = """
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local left = redis.call('PTTL', KEYS[3])
if left == -2 then return 0 end
if left == -1 then left = ARGV[2] end
redis.call('SET', KEYS[1], ARGV[1], 'PX', left)
return 1
"""

# Each script is one EVALSHA: one round trip, nothing interleaves, and the entry it finishes is acknowledged
# inside it. The acknowledged stream is passed as an argument, not declared in KEYS: a service may only consume
# its input stream (an ACL selector allowing XREADGROUP, XACK, ...), and declaring the stream would need write
# access to it for EVALSHA itself. The XACK inside is checked against that selector like any command.
# (No MULTI around the scripts: redis-py checks SCRIPT EXISTS before every transaction holding a script, an extra
# round trip per plan; outside a transaction it sends EVALSHA and loads the script only on NOSCRIPT.)


def flatten(fields: dict[str, str]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, value]
    return flat


@dataclass(frozen=True, slots=True)
class GrantCount:
    """Count an allow in these sorted sets (score ``at``, member the plan id), trimmed to ``window_start``."""

    keys: tuple[str, ...]
    member: str
    at: float
    window_start: float
    expire_s: int


@dataclass(frozen=True, slots=True)
class PermitWrite:
    """One issuer's decision on one plan, as the permit script writes it.

    The claim (``claim_key`` = ``claim_value``, first decision per issuer and plan wins) guards the permit
    (``permit_key``, ``permit_ttl_s``) and its audit entry; ``group``/``entry_id`` is the plan entry to ack;
    ``mark_key`` = ``mark_value`` (P3.3's order-in-flight key) is set unless ``mark_unless`` exists; ``count``
    records a Governor allow in the rate-limit sets.
    """

    claim_key: str
    claim_value: str
    permit_key: str
    permit_json: str
    permit_ttl_s: int
    audit_fields: dict[str, str]
    audit_maxlen: int
    group: str = ""
    entry_id: str = ""
    mark_key: str = ""
    mark_value: str = ""
    mark_ttl_s: int = 0
    mark_unless: str = ""
    count: GrantCount | None = None

    def keys_and_args(self) -> tuple[list[str], list[Any]]:
        count = self.count
        script_keys = [
            self.claim_key,
            self.permit_key,
            keys.AUDIT_STREAM,
            self.mark_key or self.claim_key,
            self.mark_unless or self.claim_key,
            *(count.keys if count else ()),
        ]
        args = [
            self.claim_value,
            keys.PLAN_BOOKKEEPING_TTL_S,
            self.permit_json,
            self.audit_maxlen,
            self.permit_ttl_s,
            self.mark_value if self.mark_key else "",
            max(self.mark_ttl_s, 1),
            "1" if self.mark_unless else "0",  # only then is KEYS[5] a real key to test
            keys.PLAN_STREAM,
            self.group,
            self.entry_id,
            count.member if count else "",
            repr(count.at) if count else "0",
            repr(count.window_start) if count else "0",
            count.expire_s if count else 0,
            *flatten(self.audit_fields),
        ]
        return script_keys, args


def _issued(reply: Any) -> tuple[bool, str]:
    return bool(int(reply[0])), str(reply[1])


class Scripts:
    """The scripts registered on one client (redis-py reloads them after a store restart: NOSCRIPT)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._consume = redis.register_script(CONSUME_PERMITS)
        self._publish = redis.register_script(PUBLISH_RESULT)
        self._issue = redis.register_script(ISSUE_PERMIT)
        self._plan = redis.register_script(PUBLISH_PLAN)
        self._hold = redis.register_script(HOLD_FOR_INTENT)

    async def hold_for_intent(self, *, plan_id: str, symbol: str) -> bool:
        """Hold ``symbol`` for the plan while its intent is recorded; False when it no longer is (resolved).
        The hold expires with the plan's record: the intent sweep drops an intent whose record is gone, so a
        hold that lived longer would stand for nothing."""
        held: Any = await self._hold(
            keys=[keys.symbol_in_flight(symbol), keys.APPLY_INTENTS, keys.plan_record(plan_id)],
            args=[plan_id, keys.PLAN_BOOKKEEPING_TTL_S * 1000],
        )
        return bool(held)

    async def publish_plan(
        self,
        *,
        plan_id: str,
        fields: dict[str, str],
        proposal_entry_id: str,
        maxlen: int,
        hold_key: str = "",
        hold_ms: int = 0,
    ) -> Literal["published", "exists", "busy"]:
        """Publish the plan unless it already was. With ``hold_key``, take that key for the plan first (SET NX,
        or find it already the plan's); "busy" when another plan holds it, and then nothing is published."""
        reply: Any = await self._plan(
            keys=[keys.PLAN_STREAM, keys.plan_record(plan_id), hold_key or keys.plan_record(plan_id)],
            args=[
                maxlen,
                keys.PLAN_BOOKKEEPING_TTL_S,
                proposal_entry_id,
                hold_ms if hold_key else 0,
                plan_id,
                *flatten(fields),
            ],
        )
        outcomes: tuple[Literal["exists", "published", "busy"], ...] = ("exists", "published", "busy")
        return outcomes[int(reply)]

    async def issue_permit(self, **write: Any) -> tuple[bool, str]:
        """Write one permit (see :class:`PermitWrite` for the arguments). Returns (written, claim owner)."""
        return (await self.issue_permits([PermitWrite(**write)]))[0]

    async def issue_permits(self, writes: Sequence[PermitWrite]) -> list[tuple[bool, str]]:
        """Run the permit script for each write, all in one round trip (a pipeline, not a transaction: each
        script is atomic on its own). Returns (written, claim owner) per write, in order."""
        if len(writes) == 1:
            keys_, args = writes[0].keys_and_args()
            return [_issued(await self._issue(keys=keys_, args=args))]
        calls = [w.keys_and_args() for w in writes]
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys_, args in calls:
                pipe.evalsha(self._issue.sha, len(keys_), *keys_, *args)
            replies = await pipe.execute(raise_on_error=False)
        issued = []
        for (keys_, args), reply in zip(calls, replies, strict=True):
            if isinstance(reply, NoScriptError):  # the store restarted without its scripts: load, run again
                issued.append(_issued(await self._issue(keys=keys_, args=args)))
            elif isinstance(reply, Exception):
                raise reply
            else:
                issued.append(_issued(reply))
        return issued

    async def consume_permits(
        self,
        *,
        plan_id: str,
        symbol: str,
        governor_raw: bytes,
        p33_raw: bytes,
        marker: str,
        now: float,
        latency_ms: float,
        audit_maxlen: int,
    ) -> str:
        """Consume both permits if they are still ``governor_raw`` / ``p33_raw`` (see CONSUME_PERMITS); each
        ``consumed`` audit line carries its permit's bytes (``permit``). Returns "ok" or why not."""
        result: Any = await self._consume(
            keys=[
                keys.governor_permit(plan_id),
                keys.p33_permit(plan_id),
                keys.executed_marker(plan_id),
                keys.AUDIT_STREAM,
                keys.APPLY_INTENTS,
                keys.result_marker(plan_id),
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
        no_order: bool = False,
    ) -> Literal["published", "exists", "executed"]:
        """Publish the plan's one result (unless it has one) and ack its proposal, in one script. "executed":
        refused, the result says no order was sent (``no_order``) and the plan's permits were consumed."""
        status, _ = await self._publish(
            keys=[
                keys.result_marker(plan_id),
                keys.RESULT_STREAM,
                keys.symbol_in_flight(symbol),
                keys.APPLY_INTENTS,
                keys.executed_marker(plan_id),
            ],
            args=[
                plan_id,
                keys.PLAN_BOOKKEEPING_TTL_S,
                result_maxlen,
                keys.PROPOSAL_STREAM,
                keys.APPLY_GROUP,
                proposal_entry_id,
                "1" if no_order else "0",
                *flatten(fields),
            ],
        )
        outcomes: dict[str, Literal["published", "exists", "executed"]] = {
            "published": "published",
            "exists": "exists",
            "executed": "executed",
        }
        return outcomes[str(status)]
