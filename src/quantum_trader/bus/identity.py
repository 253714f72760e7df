"""Which store instance a client's connections reach, checked on every new connection.

Each new connection asks the server who it is (``INFO``: role, ``run_id``, ``master_replid``) before it is
used. A server that is not a primary is refused (a replica would answer reads with data that may be behind).
With ``record_epoch`` (Apply), the connection also reads or creates the instance's epoch record (the floor of
domain/trust.py) in the same round trip as nothing else can interleave: one short script.

When a connection reaches an instance other than the one before (or the first), ``on_change(previous, now,
epoch_unsearched)`` is called: Apply starts distrusting older plans, and while nobody has searched the exchange
for orders the instance may have forgotten, does so; P3.3 reconciles its ledger.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from redis.exceptions import NoPermissionError

from quantum_trader.bus import keys
from quantum_trader.bus.errors import StoreUnavailableReply
from quantum_trader.bus.scripts import INSTANCE_CHECK
from quantum_trader.domain.trust import Epoch, StoreIdentity, started_before_ms, stream_id

# The instance's epoch: kept if it names this instance (and is whole), else replaced by a new one, or continued.
# ``last`` is the proposal stream's last generated id now (XINFO; the stream travels as an argument: Apply may
# only consume it; only a missing stream means "none": any other error refuses the claim). A new epoch's floor
# is that, or the instance's start on its own clock (``time_floor``, ms; "" when not known) if lower: an
# instance that has been a primary since it started gave every entry added since an id past its start.
# ``kept`` is the newest entry at or below the floor: the newest proposal the instance kept of what came
# before it (a store that forgot writes forgot what came after it; an epoch written before ``kept`` existed
# gets it now, and one whose floor is unreadable is returned as it is, to be refused as unreadable).
# ``searched`` is set once an Apply has searched the exchange for orders the instance forgot. ``key`` is what
# the scripts compare (bus/scripts.py INSTANCE_CHECK): run_id|replid|floor|since of the instance that began
# the epoch.
#
# Continued (docs/reliability.md, "A restart that lost nothing"): a restarted instance (``time_floor`` set: a
# primary since it started) that loaded its data from its own append-only file (``aof_enabled``), has no
# replicas, and whose record names the instance before it, stamped durable (``appendfsync always``, no
# replicas, by an admin that read the config: STAMP_DURABILITY), keeps that epoch's floor, since, kept,
# searched and key: it holds every write the old one acknowledged, so its word stands for them, and the plans
# vouched on the old one stay vouched. Only the identity changes, and the stamp goes: this instance is stamped
# for itself. A store with replicas loses its stamp (a replica's copy of it would travel with the data).
#
# The claiming Apply's witness: the epoch it last read on (key, since) and the newest proposal and audit entry
# it read there. The store lost acknowledged writes (a backup restored, a lying disk, a demoted primary back on
# its own data) when its streams end below what was read on the same epoch, or when it holds an older epoch
# than the one read on: then nothing is continued, and a new epoch begins, even on the same instance (the
# scripts refuse from then on what was vouched before). A new epoch's key ends with a nonce, so that it can
# never equal one before it. ``promoted_at``: when the latest promotion this data knows of was first seen (a
# promoted replica's own since, inherited by the epochs after it): the failover fence runs from it.
CLAIM_EPOCH = """
local epoch, claimed_run_id, claimed_replid, began, proposals = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local time_floor, witness_key, witness_since, witness_proposal = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local audit, witness_audit, aof_enabled, replicas, nonce = ARGV[9], ARGV[10], ARGV[11], ARGV[12], ARGV[13]
local function kept_at_or_below(floor)
  local newest = redis.pcall('XREVRANGE', proposals, floor, '-', 'COUNT', 1)
  if type(newest) == 'table' and newest.err then return nil, newest.err end
  if newest[1] then return newest[1][1] end
  return '0-0'
end
local function id_below(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then return false end
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
local function last_generated(stream)
  local info = redis.pcall('XINFO', 'STREAM', stream)
  if type(info) == 'table' and info.err then
    if not string.find(string.lower(info.err), 'no such key', 1, true) then return nil, info.err end
    return '0-0'
  end
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return info[i + 1] end
  end
  return '0-0'
end
local last, err = last_generated(proposals)
if not last then return redis.error_reply(err) end
local cur = redis.call('HMGET', epoch, 'run_id', 'replid', 'floor', 'since', 'kept', 'searched', 'key',
                       'durability', 'durable_run_id', 'continued', 'promoted_at')
local whole = cur[1] and cur[2] and cur[3] and cur[4]
local key = cur[7] or table.concat({cur[1] or '', cur[2] or '', cur[3] or '', cur[4] or ''}, '|')
local lost = false
if witness_key ~= '' then
  if witness_key == key then
    local audit_last = last_generated(audit) or '0-0'
    lost = id_below(last, witness_proposal) or id_below(audit_last, witness_audit)
  else
    lost = (tonumber(witness_since) or 0) > (tonumber(cur[4] or '') or 0)
  end
end
if replicas ~= '0' and cur[8] then redis.call('HDEL', epoch, 'durability', 'durable_run_id') end
local function kept_of_current()
  local kept = cur[5]
  if not kept then
    kept = kept_at_or_below(cur[3])
    if kept then redis.call('HSET', epoch, 'kept', kept) else kept = '' end
  end
  return kept
end
if whole and cur[1] == claimed_run_id and cur[2] == claimed_replid and not lost then
  local kept = kept_of_current()
  if not cur[7] and kept ~= '' then redis.call('HSET', epoch, 'key', key) end
  return {cur[3], cur[4], 0, kept, cur[6] or '', key, cur[10] or '0', cur[11] or '0'}
end
if whole and not lost and time_floor ~= '' and aof_enabled == '1' and replicas == '0' and cur[8] == 'always'
   and cur[9] == cur[1] then
  local kept = kept_of_current()
  local continued = tostring((tonumber(cur[10] or '0') or 0) + 1)
  redis.call('HDEL', epoch, 'durability', 'durable_run_id')
  redis.call('HSET', epoch, 'run_id', claimed_run_id, 'replid', claimed_replid, 'key', key,
             'continued', continued, 'previous_run_id', cur[1], 'previous_replid', cur[2])
  return {cur[3], cur[4], 1, kept, cur[6] or '', key, continued, cur[11] or '0'}
end
local floor = last
if time_floor ~= '' and tonumber(time_floor) < tonumber(string.match(last, '^(%d+)')) then
  floor = time_floor .. '-18446744073709551615'
end
local kept, kept_err = kept_at_or_below(floor)
if not kept then return redis.error_reply(kept_err) end
key = table.concat({claimed_run_id, claimed_replid, floor, began, nonce}, '|')
-- the latest promotion this data knows of: a promoted primary that restarts soon after still owes the fence
local promoted_at = cur[11] or '0'
if time_floor == '' then promoted_at = began end
redis.call('DEL', epoch)
redis.call('HSET', epoch, 'run_id', claimed_run_id, 'replid', claimed_replid, 'floor', floor, 'since', began,
           'last_id', last, 'kept', kept, 'key', key, 'previous_run_id', cur[1] or '',
           'previous_replid', cur[2] or '', 'lost', lost and '1' or '0', 'promoted_at', promoted_at)
return {floor, began, 1, kept, '', key, '0', promoted_at}
"""

# An admin read the instance's persistence config (CONFIG GET, which no service may run): recorded in the
# epoch if the record names that instance. ``always`` (appendonly on, appendfsync always, no replicas) lets
# the instance's successor after a restart continue its epoch (CLAIM_EPOCH).
STAMP_DURABILITY = """
if redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'durability', ARGV[2], 'durable_run_id', ARGV[1])
return 1
"""

# The search for forgotten orders is done: recorded in the epoch, if the record is still that epoch's (the
# scripts' own instance check, bus/scripts.py).
MARK_SEARCHED = (
    "local epoch, expected_epoch = KEYS[1], ARGV[1]\n"
    + INSTANCE_CHECK
    + """
if instance_changed() then return 0 end
redis.call('HSET', epoch, 'searched', '1')
return 1
"""
)


# How far the store's clock may stand behind the clock that wrote the entries it loaded, at its start: NTP
# slews rather than steps, and after a power loss the boot takes longer than any battery clock's error, so
# only a restore onto a host whose clock is behind by more than the downtime plus this could make older
# entries look newer than the start (docs/reliability.md states the assumption).
START_MARGIN_MS = 250

OnChange = Callable[[StoreIdentity | None, StoreIdentity, bool], None]


class NotPrimary(StoreUnavailableReply):
    """The connection reached a replica (or a server in the middle of a failover): not used."""


def parse_info(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


class StoreWatch:
    """The identity (and for Apply the epoch) of the store instance one client talks to.

    ``on_change(previous, now, epoch_unsearched)`` is called when a connection reaches another instance than
    before, or the first; a change seen before anyone subscribed (the first connection of a service is made
    before the service exists) is delivered on ``subscribe``."""

    def __init__(self, *, record_epoch: bool = False, clock: Callable[[], float] = time.time) -> None:
        self.record_epoch = record_epoch
        self.identity: StoreIdentity | None = None
        self.epoch: Epoch | None = None
        self.changes = 0  # instances seen after the first
        self._clock = clock
        self._on_change: OnChange | None = None
        self._undelivered: tuple[StoreIdentity | None, StoreIdentity, bool] | None = None
        self.witness = Witness()  # what this process read on the epoch it last read on: saw(), saw_audit()

    def subscribe(self, on_change: OnChange) -> None:
        self._on_change = on_change
        if self._undelivered is not None:
            undelivered, self._undelivered = self._undelivered, None
            on_change(*undelivered)

    async def on_connect(self, conn: Any) -> None:
        """redis-py's ``redis_connect_func``: the usual handshake, then who is this server. Anything unreadable
        in the answer fails the connection (a RedisError: redis-py then drops it, never uses it unchecked)."""
        await conn.on_connect()
        try:
            server = await self._identify(conn)
            identity = server.identity
            epoch = await self._claim(conn, server) if self.record_epoch else None
        except (ValueError, TypeError) as exc:
            raise StoreUnavailableReply(f"the store's identity or epoch record is unreadable: {exc}") from None
        previous = self.identity
        same_epoch = epoch is None or epoch.same_as(self.epoch)
        if previous == identity and same_epoch:
            if epoch is not None:
                self.epoch = epoch  # e.g. now marked searched
            return
        self.identity = identity
        if epoch is not None:
            self.epoch = epoch
        if previous is not None and previous != identity:
            self.changes += 1
        unsearched = epoch is not None and not epoch.searched
        if self._on_change is None:
            before = self._undelivered[0] if self._undelivered else previous
            self._undelivered = (before, identity, unsearched)
        else:
            self._on_change(previous, identity, unsearched)

    async def mark_searched(self, redis: Any, epoch: Epoch) -> bool:
        """Record in the store that ``epoch``'s forgotten orders were searched for, if its record is still that
        epoch's (a search that began on one instance never marks another searched). Whether it was recorded."""
        return bool(await redis.eval(MARK_SEARCHED, 1, keys.STORE_EPOCH, epoch.key))

    async def stamp_durability(self, redis: Any) -> str:
        """As an admin (CONFIG GET, which no service may run): how the instance keeps what it acknowledged,
        recorded in its epoch (STAMP_DURABILITY), so that its successor after a restart can tell whether it
        lost anything. ``always`` (appendonly on, appendfsync always: every write on disk before its reply),
        ``everysec``, ``no``, or ``none`` (no append-only file). Returns what was recorded ("" if the record
        names another instance: a restart in between; the new instance is stamped by its own start)."""
        info = await redis.info("server")
        replication = await redis.info("replication")
        config = await redis.config_get("appendonly", "appendfsync")
        durability = "none" if config.get("appendonly") != "yes" else str(config.get("appendfsync", ""))
        if replication.get("role") != "master" or int(replication.get("connected_slaves", 0)) > 0:
            durability = "replicated"  # a replica's copy of the stamp would travel with the data
        stamped = await redis.eval(STAMP_DURABILITY, 1, keys.STORE_EPOCH, str(info["run_id"]), durability)
        return durability if stamped else ""

    async def _identify(self, conn: Any) -> _Server:
        """The server's identity; the latest it can have become that instance (its start if it has been a
        primary since, ``second_repl_offset`` -1: never promoted; else now, as a promotion is not dated); that
        start on the server's own clock plus ``START_MARGIN_MS`` (ms, "" when not known), from when on every
        stream id it gives is its own; and whether it loaded its data from an append-only file, and has
        replicas (CLAIM_EPOCH continues an epoch only then, and only without)."""
        try:
            await conn.send_command("INFO", "server", "replication", "persistence")
            info = parse_info(str(await conn.read_response()))
        except NoPermissionError:
            raise NoPermissionError(
                "this store account may not run INFO, which the services need to tell store instances apart "
                "(run `qt acl` again)"
            ) from None
        if info.get("role") != "master":
            raise NotPrimary(f"the store answered as {info.get('role', 'unknown role')}, not a primary")
        now = self._clock()
        began, time_floor = now, ""
        if info.get("second_repl_offset") == "-1":  # a primary since it started: its start bounds everything
            try:
                uptime_s, server_us = int(info.get("uptime_in_seconds", "")), int(info.get("server_time_usec", ""))
            except ValueError:
                pass
            else:
                latest_start_ms = started_before_ms(server_us // 1000, uptime_s)
                began = now - (server_us // 1000 - latest_start_ms) / 1000
                time_floor = str(latest_start_ms + START_MARGIN_MS)
        return _Server(
            StoreIdentity(info.get("run_id", ""), info.get("master_replid", "")),
            min(began, now),
            time_floor,
            "1" if info.get("aof_enabled") == "1" else "0",
            info.get("connected_slaves", "") or "unknown",
        )

    async def _claim(self, conn: Any, server: _Server) -> Epoch:
        """The instance's epoch (created now if no Apply had used the instance before, or continued)."""
        witness = self.witness
        await conn.send_command(
            "EVAL",
            CLAIM_EPOCH,
            1,
            keys.STORE_EPOCH,
            server.identity.run_id,
            server.identity.replid,
            repr(server.began),
            keys.PROPOSAL_STREAM,
            server.time_floor,
            witness.key,
            repr(witness.since),
            witness.proposal,
            keys.AUDIT_STREAM,
            witness.audit,
            server.aof_enabled,
            server.replicas,
            secrets.token_hex(4),
        )
        floor, since, _, kept, searched, key, continued, promoted_at = await conn.read_response()
        return Epoch(
            server.identity,
            stream_id(str(floor)),
            float(since),
            stream_id(str(kept)),
            searched == "1",
            str(key),
            int(continued),
            promoted=server.time_floor == "",  # not a primary since it started
            promoted_at=float(promoted_at),
        )

    def saw(self, entry_id: str) -> None:
        """A proposal entry this process read from the store (Apply): part of its witness (Witness)."""
        self._see(entry_id, audit=False)

    def saw_audit(self, entry_id: str) -> None:
        """An audit entry this process read from the store (Apply's permit waiter): part of its witness."""
        self._see(entry_id, audit=True)

    def _see(self, entry_id: str, *, audit: bool) -> None:
        epoch = self.epoch
        if epoch is None:
            return
        witness = self.witness
        if witness.key != epoch.key:
            witness = Witness(epoch.key, epoch.since)
        try:
            newest = witness.audit if audit else witness.proposal
            if stream_id(entry_id) <= stream_id(newest):
                return
        except ValueError:
            return
        self.witness = replace(witness, audit=entry_id) if audit else replace(witness, proposal=entry_id)


@dataclass(frozen=True, slots=True)
class Witness:
    """What one Apply process read on the epoch it last read on: the store lost acknowledged writes if it holds
    an older epoch than that, or that epoch with its streams ending below what was read (CLAIM_EPOCH)."""

    key: str = ""  # "": nothing read yet (no witness)
    since: float = 0.0
    proposal: str = "0-0"  # the newest proposal entry read
    audit: str = "0-0"  # the newest audit entry read


@dataclass(frozen=True, slots=True)
class _Server:
    identity: StoreIdentity
    began: float
    time_floor: str
    aof_enabled: str  # "1": it loaded its data from its append-only file
    replicas: str  # connected_slaves
