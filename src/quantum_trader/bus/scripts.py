"""The steps that must be atomic, as Lua scripts (one round trip each, nothing can interleave).

publish_plan: a plan is published once: its record and its stream entry together, or nothing if the record
    exists (a second handler of the same proposal resumes the plan instead of publishing it again). An
    executing plan first takes its symbol (Apply's one-close-per-symbol hold); if another plan holds it,
    nothing is published and Apply publishes a SKIP plan instead.
consume_permits: the store is still the instance the plan was vouched for on (``expected_epoch``: its epoch
    record, which every new Apply connection writes for the instance it reaches), both permits are exactly the
    ones Apply verified, the plan was never executed and has no result yet (a result ends a plan: nothing may
    be executed after it) → delete
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
    its permits and may have sent it, and only the order's outcome may be the result. A result the store's
    records decided (``expected_epoch``) is refused when the store is another instance than the one that
    vouched for them: they may be forgotten, and the exchange must be asked first.
Every key a script touches is declared in KEYS (the acknowledged stream too), so the server checks each one
against the caller's ACL (bus/acl.py) and a Cluster could check their slots. Each script names its keys and
arguments once (``Layout``, bus/lua.py): the Python wrapper passes them by name, and the Lua body reads them by the same
names (a prologue generated from the layout binds ``KEYS[i]`` and ``ARGV[i]`` to them). An optional key is left
out of KEYS when unused, never replaced by a dummy.

EVALSHA, not Redis 7 Functions: a function library is shared, mutable code in the store (FUNCTION LOAD REPLACE
by any user allowed to load would change what every service runs, under their own rights), and a store that
comes back without its data comes back without the library, until an operator loads it again. Each service
carries its scripts' text and loads them itself on NOSCRIPT, so it always runs exactly the code it ships.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from quantum_trader.bus import keys
from quantum_trader.bus.lua import Layout, LuaScript, one_of
from quantum_trader.journal import Journal

PUBLISH_PLAN_LAYOUT = Layout(
    keys=("plans", "record", "hold?"),
    args=("maxlen", "record_ttl_s", "proposal_entry_id", "request", "hold_ms", "plan_id", "fields*"),
)
PUBLISH_PLAN = """
if redis.call('EXISTS', record) == 1 then return 0 end
if hold then
  local held = redis.call('SET', hold, plan_id, 'NX', 'PX', hold_ms)
  if not held and redis.call('GET', hold) ~= plan_id then return 2 end
end
redis.call('XADD', plans, 'MAXLEN', '~', maxlen, '*', unpack(fields))
redis.call('HSET', record, 'proposal_entry_id', proposal_entry_id, 'request', request, unpack(fields))
redis.call('EXPIRE', record, record_ttl_s)
return 1
"""

# The check both scripts make when given the epoch the caller relies on: is the store still that instance, or
# one that continues it? The epoch record's key is run_id|replid|floor|since of the instance that began the
# epoch (bus/identity.py CLAIM_EPOCH writes it before a connection is used); a restart that lost nothing keeps
# it, any other change begins a new one, so a script running on an instance that may have forgotten finds
# another key.
INSTANCE_CHECK = """
local function instance_changed()
  if not epoch then return false end
  return (redis.call('HGET', epoch, 'key') or '') ~= expected_epoch
end
"""

CONSUME_PERMITS_LAYOUT = Layout(
    keys=("governor_permit", "p33_permit", "executed", "audit", "intents", "result_marker", "epoch?"),
    args=(
        "governor_raw",
        "p33_raw",
        "marker",
        "marker_ttl_s",
        "plan_id",
        "now",
        "symbol",
        "audit_maxlen",
        "latency_ms",
        "expected_epoch",
    ),
)
CONSUME_PERMITS = (
    INSTANCE_CHECK
    + """
if instance_changed() then return 'store_changed' end
if redis.call('EXISTS', executed) == 1 then return 'already_executed' end
if redis.call('EXISTS', result_marker) == 1 then return 'already_finished' end
if redis.call('GET', governor_permit) ~= governor_raw then return 'governor_permit_changed' end
if redis.call('GET', p33_permit) ~= p33_raw then return 'p33_permit_changed' end
redis.call('DEL', governor_permit, p33_permit)
redis.call('SET', executed, marker, 'EX', marker_ttl_s)
redis.call('ZADD', intents, now, plan_id)
local permits = {governor = governor_raw, p33 = p33_raw}
for _, issuer in ipairs({'governor', 'p33'}) do
  redis.call('XADD', audit, 'MAXLEN', '~', audit_maxlen, '*', 'plan_id', plan_id, 'issuer', 'apply',
             'decision', 'consumed', 'reason', issuer, 'subject', issuer, 'at', now,
             'latency_ms', latency_ms, 'symbol', symbol, 'permit', permits[issuer])
end
return 'ok'
"""
)

PUBLISH_RESULT_LAYOUT = Layout(
    keys=("result_marker", "results", "hold", "intents", "executed", "proposals?", "epoch?"),
    args=("plan_id", "marker_ttl_s", "results_maxlen", "group", "entry_id", "no_order", "expected_epoch", "fields*"),
)
PUBLISH_RESULT = (
    INSTANCE_CHECK
    + """
local function ack()
  if proposals then redis.call('XACK', proposals, group, entry_id) end
end
if redis.call('EXISTS', result_marker) == 1 then
  redis.call('ZREM', intents, plan_id)
  ack()
  return {'exists', ''}
end
if instance_changed() then return {'store_changed', ''} end
if no_order == '1' and redis.call('EXISTS', executed) == 1 then return {'executed', ''} end
local published = redis.call('XADD', results, 'MAXLEN', '~', results_maxlen, '*', unpack(fields))
redis.call('SET', result_marker, published, 'EX', marker_ttl_s)
if redis.call('GET', hold) == plan_id then redis.call('DEL', hold) end
redis.call('ZREM', intents, plan_id)
ack()
return {'published', published}
"""
)

ISSUE_PERMIT_LAYOUT = Layout(
    keys=("claim", "permit", "audit", "plans?", "mark?", "mark_unless?", "counts*"),
    args=(
        "claim_value",
        "claim_ttl_s",
        "permit_json",
        "audit_maxlen",
        "permit_ttl_s",
        "mark_value",
        "mark_ttl_s",
        "group",
        "entry_id",
        "count_member",
        "count_at",
        "count_window_start",
        "count_expire_s",
        "audit_fields*",
    ),
)
ISSUE_PERMIT = """
local function ack()
  if plans then redis.call('XACK', plans, group, entry_id) end
end
local claimed = redis.call('SET', claim, claim_value, 'NX', 'EX', claim_ttl_s)
if not claimed then
  local owner = redis.call('GET', claim)
  if owner ~= claim_value then
    ack()
    return {0, owner or ''}
  end
end
redis.call('SET', permit, permit_json, 'EX', permit_ttl_s)
if mark and mark_value ~= '' and (not mark_unless or redis.call('EXISTS', mark_unless) == 0) then
  redis.call('SET', mark, mark_value, 'EX', mark_ttl_s)
end
redis.call('XADD', audit, 'MAXLEN', '~', audit_maxlen, '*', unpack(audit_fields))
if count_member ~= '' then
  for _, counted in ipairs(counts) do
    redis.call('ZADD', counted, count_at, count_member)
    redis.call('ZREMRANGEBYSCORE', counted, '-inf', count_window_start)
    redis.call('EXPIRE', counted, count_expire_s)
  end
end
ack()
return {1, claim_value}
"""

HOLD_FOR_INTENT_LAYOUT = Layout(keys=("hold", "intents", "record"), args=("plan_id", "default_ms"))
HOLD_FOR_INTENT = """
if not redis.call('ZSCORE', intents, plan_id) then return 0 end
local left = redis.call('PTTL', record)
if left == -2 then return 0 end
if left == -1 then left = default_ms end
redis.call('SET', hold, plan_id, 'PX', left)
return 1
"""

# Each script is one EVALSHA: one round trip, nothing interleaves, and the entry it finishes is acknowledged
# inside it. (No MULTI around the scripts: redis-py checks SCRIPT EXISTS before every transaction holding a
# script, an extra round trip per plan; outside a transaction it sends EVALSHA and loads the script only on
# NOSCRIPT.)


def flatten(fields: dict[str, str]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, value]
    return flat


class Issued(NamedTuple):
    """What the permit script did: ``written`` the permit, or not because ``owner`` had decided the plan first."""

    written: bool
    owner: str


ScriptConsumeStatus = Literal[
    "ok", "already_executed", "already_finished", "governor_permit_changed", "p33_permit_changed", "store_changed"
]
CONSUME_STATUSES: tuple[ScriptConsumeStatus, ...] = get_args(ScriptConsumeStatus)
# and one that is not the script's: consumed, but fewer replicas than asked acknowledged it in time (WAIT)
ConsumeStatus = Literal[ScriptConsumeStatus, "unreplicated"]
PlanPublished = Literal["published", "exists", "busy"]
ResultPublished = Literal["published", "exists", "executed", "store_changed"]
RESULT_STATUSES: tuple[ResultPublished, ...] = ("published", "exists", "executed", "store_changed")


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
        return ISSUE_PERMIT_LAYOUT.pack(
            {
                "claim": self.claim_key,
                "permit": self.permit_key,
                "audit": keys.AUDIT_STREAM,
                "plans": keys.PLAN_STREAM if self.entry_id else None,
                "mark": self.mark_key or None,
                "mark_unless": self.mark_unless or None,  # read only when there is a mark
                "counts": count.keys if count else (),
            },
            {
                "claim_value": self.claim_value,
                "claim_ttl_s": keys.PLAN_BOOKKEEPING_TTL_S,
                "permit_json": self.permit_json,
                "audit_maxlen": self.audit_maxlen,
                "permit_ttl_s": self.permit_ttl_s,
                "mark_value": self.mark_value,
                "mark_ttl_s": max(self.mark_ttl_s, 1),
                "group": self.group,
                "entry_id": self.entry_id,
                "count_member": count.member if count else "",
                "count_at": repr(count.at) if count else "0",
                "count_window_start": repr(count.window_start) if count else "0",
                "count_expire_s": count.expire_s if count else 0,
                "audit_fields": flatten(self.audit_fields),
            },
        )


def _issued(reply: Any) -> Issued:
    return Issued(bool(int(reply[0])), str(reply[1]))


class Scripts:
    """The scripts registered on one client, one typed wrapper each."""

    def __init__(self, redis: aioredis.Redis, journal: Journal | None = None) -> None:
        self._redis = redis
        # every audit and result line a script writes is also appended here (journal.py), once written
        self._journal = journal
        # The module's bodies as they are now (the Lua mutants of tools/lua_mutants.py replace them).
        self._consume = LuaScript(redis, CONSUME_PERMITS_LAYOUT, CONSUME_PERMITS)
        self._publish = LuaScript(redis, PUBLISH_RESULT_LAYOUT, PUBLISH_RESULT)
        self._issue = LuaScript(redis, ISSUE_PERMIT_LAYOUT, ISSUE_PERMIT)
        self._plan = LuaScript(redis, PUBLISH_PLAN_LAYOUT, PUBLISH_PLAN)
        self._hold = LuaScript(redis, HOLD_FOR_INTENT_LAYOUT, HOLD_FOR_INTENT)

    async def hold_for_intent(self, *, plan_id: str, symbol: str) -> bool:
        """Hold ``symbol`` for the plan while its intent is recorded; False when it no longer is (resolved).
        The hold expires with the plan's record: the intent sweep drops an intent whose record is gone, so a
        hold that lived longer would stand for nothing."""
        held = await self._hold(
            {"hold": keys.symbol_in_flight(symbol), "intents": keys.APPLY_INTENTS, "record": keys.plan_record(plan_id)},
            {"plan_id": plan_id, "default_ms": keys.PLAN_BOOKKEEPING_TTL_S * 1000},
        )
        return bool(held)

    async def publish_plan(
        self,
        *,
        plan_id: str,
        fields: dict[str, str],
        proposal_entry_id: str,
        maxlen: int,
        request: str = "",
        hold_key: str = "",
        hold_ms: int = 0,
    ) -> PlanPublished:
        """Publish the plan unless it already was; its record also keeps the proposal entry it came from and
        ``request`` (what the proposal asked: a later proposal with the same id must ask the same). With
        ``hold_key``, take that key for the plan first (SET NX, or find it already the plan's) for ``hold_ms``;
        "busy" when another plan holds it, and then nothing is published. No ``hold_ms``: no hold."""
        reply = await self._plan(
            {"plans": keys.PLAN_STREAM, "record": keys.plan_record(plan_id), "hold": hold_key if hold_ms else None},
            {
                "maxlen": maxlen,
                "record_ttl_s": keys.PLAN_BOOKKEEPING_TTL_S,
                "proposal_entry_id": proposal_entry_id,
                "request": request,
                "hold_ms": hold_ms,
                "plan_id": plan_id,
                "fields": flatten(fields),
            },
        )
        outcomes: tuple[PlanPublished, ...] = ("exists", "published", "busy")
        return outcomes[int(reply)]

    async def append(self, stream: str, fields: dict[str, str], maxlen: int) -> str:
        """A line no script writes (an audit line of a rejected permit, a duplicate decision, an operator's
        action): XADD, then the journal. Returns the entry id."""
        entry_id = str(await self._redis.xadd(stream, fields, maxlen=maxlen, approximate=True))
        if self._journal is not None:
            self._journal.append(stream, fields, entry_id)
        return entry_id

    async def issue_permit(self, **write: Any) -> Issued:
        """Write one permit (see :class:`PermitWrite` for the arguments)."""
        return (await self.issue_permits([PermitWrite(**write)]))[0]

    async def issue_permits(self, writes: Sequence[PermitWrite]) -> list[Issued]:
        """Run the permit script for each write, all in one round trip (a pipeline, not a transaction: each
        script is atomic on its own). Returns what each did, in order."""
        issued = await self._issue_all(writes)
        if self._journal is not None:
            for write, done in zip(writes, issued, strict=True):
                if done.written:
                    self._journal.append(keys.AUDIT_STREAM, write.audit_fields)
        return issued

    async def _issue_all(self, writes: Sequence[PermitWrite]) -> list[Issued]:
        calls = [w.keys_and_args() for w in writes]
        if len(calls) == 1:
            return [_issued(await self._issue.run_packed(*calls[0]))]
        async with self._redis.pipeline(transaction=False) as pipe:
            for script_keys, args in calls:
                pipe.evalsha(self._issue.sha, len(script_keys), *script_keys, *args)
            replies = await pipe.execute(raise_on_error=False)
        issued = []
        for (script_keys, args), reply in zip(calls, replies, strict=True):
            if isinstance(reply, NoScriptError):  # the store restarted without its scripts: load, run again
                issued.append(_issued(await self._issue.run_packed(script_keys, args)))
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
        expected_epoch: str = "",
        replicas: int = 0,
        replicas_wait_ms: int = 500,
    ) -> ConsumeStatus:
        """Consume both permits if they are still ``governor_raw`` / ``p33_raw`` (see CONSUME_PERMITS) and, with
        ``expected_epoch`` (``Epoch.key``), the store is still that instance; each ``consumed`` audit line carries
        its permit's bytes (``permit``). With ``replicas``, a consume is "ok" only once that many replicas
        acknowledged it (``WAIT``, within ``replicas_wait_ms``), else "unreplicated". Returns "ok" or why not."""
        named_keys = {
            "governor_permit": keys.governor_permit(plan_id),
            "p33_permit": keys.p33_permit(plan_id),
            "executed": keys.executed_marker(plan_id),
            "audit": keys.AUDIT_STREAM,
            "intents": keys.APPLY_INTENTS,
            "result_marker": keys.result_marker(plan_id),
            "epoch": keys.STORE_EPOCH if expected_epoch else None,
        }
        named_args: dict[str, Any] = {
            "governor_raw": governor_raw,
            "p33_raw": p33_raw,
            "marker": marker,
            "marker_ttl_s": keys.PLAN_BOOKKEEPING_TTL_S,
            "plan_id": plan_id,
            "now": repr(now),
            "symbol": symbol,
            "audit_maxlen": audit_maxlen,
            "latency_ms": f"{latency_ms:.3f}",
            "expected_epoch": expected_epoch,
        }
        if not replicas:
            status = one_of(CONSUME_STATUSES, str(await self._consume(named_keys, named_args)))
            self._journal_consumed(status, named_args, (governor_raw, p33_raw))
            return status
        # WAIT counts the writes of its own connection: the script and the WAIT share one
        async with self._redis.client() as conn:
            status = one_of(CONSUME_STATUSES, str(await self._consume(named_keys, named_args, conn)))
            self._journal_consumed(status, named_args, (governor_raw, p33_raw))  # kept even if the WAIT fails
            if status != "ok":
                return status
            acked = int(await conn.execute_command("WAIT", replicas, replicas_wait_ms))
        return "ok" if acked >= replicas else "unreplicated"

    def _journal_consumed(self, status: str, named_args: dict[str, Any], raws: tuple[bytes, bytes]) -> None:
        """The consume script's two audit lines, in the journal as the script wrote them."""
        if self._journal is None or status != "ok":
            return
        for issuer, raw in zip(("governor", "p33"), raws, strict=True):
            self._journal.append(
                keys.AUDIT_STREAM,
                {
                    "plan_id": named_args["plan_id"],
                    "issuer": "apply",
                    "decision": "consumed",
                    "reason": issuer,
                    "subject": issuer,
                    "at": named_args["now"],
                    "latency_ms": named_args["latency_ms"],
                    "symbol": named_args["symbol"],
                    "permit": raw,
                },
            )

    async def publish_result(
        self,
        *,
        plan_id: str,
        symbol: str,
        fields: dict[str, str],
        proposal_entry_id: str,
        result_maxlen: int,
        no_order: bool = False,
        expected_epoch: str = "",
    ) -> ResultPublished:
        """Publish the plan's one result (unless it has one) and ack its proposal, in one script. "executed":
        refused, the result says no order was sent (``no_order``) and the plan's permits were consumed.
        "store_changed": refused, the store is no longer the instance ``expected_epoch`` names."""
        status, entry_id = await self._publish(
            {
                "result_marker": keys.result_marker(plan_id),
                "results": keys.RESULT_STREAM,
                "hold": keys.symbol_in_flight(symbol),
                "intents": keys.APPLY_INTENTS,
                "executed": keys.executed_marker(plan_id),
                "proposals": keys.PROPOSAL_STREAM if proposal_entry_id else None,
                "epoch": keys.STORE_EPOCH if expected_epoch else None,
            },
            {
                "plan_id": plan_id,
                "marker_ttl_s": keys.PLAN_BOOKKEEPING_TTL_S,
                "results_maxlen": result_maxlen,
                "group": keys.APPLY_GROUP,
                "entry_id": proposal_entry_id,
                "no_order": "1" if no_order else "0",
                "expected_epoch": expected_epoch,
                "fields": flatten(fields),
            },
        )
        if self._journal is not None and status == "published":
            self._journal.append(keys.RESULT_STREAM, fields, str(entry_id))
        return one_of(RESULT_STATUSES, str(status))
