"""Which store instance a client's connections reach, checked on every new connection.

Each new connection asks the server who it is (``INFO``: role, ``run_id``, ``master_replid``) before it is
used. A server that is not a primary is refused (a replica would answer reads with data that may be behind).
With ``record_epoch`` (Apply), the connection also reads or creates the instance's epoch record (the floor of
domain/trust.py) in the same round trip as nothing else can interleave: one short script.

When a connection reaches an instance other than the one before (or the first), ``on_change(previous, now,
new_epoch)`` is called: Apply starts distrusting older plans, and when it has just recorded the instance's
epoch (nobody had used the instance before) searches the exchange for orders the store may have forgotten;
P3.3 reconciles its ledger.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from quantum_trader.bus import keys
from quantum_trader.domain.trust import Epoch, StoreIdentity, stream_id

# The instance's epoch: kept if it names this instance, else replaced by a new one whose floor is the proposal
# stream's last generated id (XINFO; the stream travels as an argument: Apply may only consume it).
CLAIM_EPOCH = """
local cur = redis.call('HMGET', KEYS[1], 'run_id', 'replid', 'floor', 'since')
if cur[1] == ARGV[1] and cur[2] == ARGV[2] then return {cur[3], cur[4], 0} end
local floor = '0-0'
local info = redis.pcall('XINFO', 'STREAM', ARGV[4])
if type(info) == 'table' and not info.err then
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then floor = info[i + 1] end
  end
end
redis.call('HSET', KEYS[1], 'run_id', ARGV[1], 'replid', ARGV[2], 'floor', floor, 'since', ARGV[3],
           'previous_run_id', cur[1] or '', 'previous_replid', cur[2] or '')
return {floor, ARGV[3], 1}
"""


OnChange = Callable[[StoreIdentity | None, StoreIdentity, bool], None]


class NotPrimary(RedisConnectionError):  # type: ignore[misc]
    """The connection reached a replica (or a server in the middle of a failover): not used."""


def parse_info(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


class StoreWatch:
    """The identity (and for Apply the epoch) of the store instance one client talks to."""

    def __init__(
        self,
        *,
        record_epoch: bool = False,
        clock: Callable[[], float] = time.time,
        on_change: OnChange | None = None,
    ) -> None:
        self.record_epoch = record_epoch
        self.identity: StoreIdentity | None = None
        self.epoch: Epoch | None = None
        self.changes = 0  # instances seen after the first
        self._clock = clock
        self._on_change = on_change

    def subscribe(self, on_change: OnChange) -> None:
        self._on_change = on_change

    async def on_connect(self, conn: Any) -> None:
        """redis-py's ``redis_connect_func``: the usual handshake, then who is this server."""
        await conn.on_connect()
        identity, began = await self._identify(conn)
        epoch, new_epoch = await self._claim(conn, identity, began) if self.record_epoch else (None, False)
        previous = self.identity
        if previous == identity and not new_epoch:
            return
        self.identity = identity
        if epoch is not None:
            self.epoch = epoch
        if previous is not None and previous != identity:
            self.changes += 1
        if self._on_change is not None:
            self._on_change(previous, identity, new_epoch)

    async def _identify(self, conn: Any) -> tuple[StoreIdentity, float]:
        """The server's identity, and the earliest it can have become that instance: its start when it has
        been a primary since (``second_repl_offset`` -1: never promoted), else now (promoted at some point)."""
        try:
            await conn.send_command("INFO", "server", "replication")
            info = parse_info(str(await conn.read_response()))
        except NoPermissionError:
            raise NoPermissionError(
                "this store account may not run INFO, which the services need to tell store instances apart "
                "(run `qt acl` again)"
            ) from None
        if info.get("role") != "master":
            raise NotPrimary(f"the store answered as {info.get('role', 'unknown role')}, not a primary")
        now = self._clock()
        began = now
        if info.get("second_repl_offset") == "-1":
            try:
                # whole seconds, rounded down: ``now - uptime`` is at or after the start, never before it
                began = now - float(info.get("uptime_in_seconds", ""))
            except ValueError:
                began = now
        return StoreIdentity(info.get("run_id", ""), info.get("master_replid", "")), min(began, now)

    async def _claim(self, conn: Any, identity: StoreIdentity, began: float) -> tuple[Epoch, bool]:
        """The instance's epoch, and whether this call created it (no Apply had used the instance before)."""
        await conn.send_command(
            "EVAL",
            CLAIM_EPOCH,
            1,
            keys.STORE_EPOCH,
            identity.run_id,
            identity.replid,
            repr(began),
            keys.PROPOSAL_STREAM,
        )
        floor, since, created = await conn.read_response()
        return Epoch(identity, stream_id(str(floor)), float(since)), bool(int(created))
