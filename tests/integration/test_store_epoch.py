"""The store instance's epoch as Apply records it (bus/identity.py CLAIM_EPOCH), on real stores: its floor, and
the newest proposal it kept of what came before it, from which the search for forgotten orders starts.

Issue 20, point 2 of what was seen: the search started a minute before ``min(last id, floor)``, which is the
instance's start as soon as anything was added after it, so after a long reboot it missed the order of a
proposal the store forgot (the proposal stream's newest kept entry lies before the start).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client, record_epoch
from quantum_trader.bus.embedded import EmbeddedStore
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.bus.streams import ensure_topology
from quantum_trader.domain.trust import Epoch, StoreIdentity

pytestmark = pytest.mark.integration


async def claimed(store_url: str) -> StoreWatch:
    watch = StoreWatch(record_epoch=True)
    client = make_client(store_url, watch)
    try:
        await client.ping()
    finally:
        await client.aclose()
    return watch


@pytest.fixture
async def rds(store_url: str) -> aioredis.Redis:
    client = make_client(store_url)
    await ensure_topology(client)
    yield client
    await client.aclose()


async def test_kept_is_the_newest_proposal_before_the_instance_not_one_added_after_it(
    store_url: str, rds: aioredis.Redis
) -> None:
    """Proposals at 1000 and 2000 ms (before the store started), then one added after its start (as a strategy
    does while Apply is still down after a reboot): the floor is the start, and kept is the 2000 ms one."""
    await rds.xadd(keys.PROPOSAL_STREAM, {"proposal_id": "old-1"}, id="1000-0")
    await rds.xadd(keys.PROPOSAL_STREAM, {"proposal_id": "old-2"}, id="2000-5")
    after_start_ms = round(time.time() * 1000) + 60_000
    await rds.xadd(keys.PROPOSAL_STREAM, {"proposal_id": "new"}, id=f"{after_start_ms}-0")
    epoch = (await claimed(store_url)).epoch
    assert epoch is not None
    assert 2000 < epoch.floor[0] < after_start_ms  # the instance's start (plus its margin), not the new entry
    assert epoch.kept == (2000, 5)
    assert await rds.hget(keys.STORE_EPOCH, "kept") == "2000-5"


async def test_with_nothing_before_the_instance_kept_is_zero(store_url: str, rds: aioredis.Redis) -> None:
    epoch = (await claimed(store_url)).epoch
    assert epoch is not None and epoch.kept == (0, 0)


async def test_an_epoch_recorded_before_kept_existed_gets_it_and_stays_the_same_epoch(
    store_url: str, rds: aioredis.Redis
) -> None:
    """An Apply of the previous version recorded the instance's epoch without ``kept``: the next claim keeps
    the epoch (floor, since: plans stay vouched for) and adds ``kept`` to it."""
    await rds.xadd(keys.PROPOSAL_STREAM, {"proposal_id": "old-1"}, id="1000-0")
    first = (await claimed(store_url)).epoch
    assert first is not None
    await rds.hdel(keys.STORE_EPOCH, "kept")
    await rds.hset(keys.STORE_EPOCH, "floor", "1500-0")  # so that kept is computed from the recorded floor
    again = (await claimed(store_url)).epoch
    assert again is not None
    assert (again.floor, again.since, again.kept) == ((1500, 0), first.since, (1000, 0))
    assert await rds.hget(keys.STORE_EPOCH, "kept") == "1000-0"


# --- a restart that lost nothing continues the epoch (issue 20, point 2: "a store restart that lost nothing
# should refuse nothing") ---------------------------------------------------------------------------------------

OLD_KEY = "old-run|old-repl|1000-0|1700000000.5"
OLD_SINCE = 1700000000.5


@pytest.fixture
async def aof_store(tmp_path: Path) -> AsyncIterator[str]:
    """A store of the test's own that keeps an append-only file (fsynced on every write), as the deployed one."""
    store = EmbeddedStore(tmp_path / "aof", persist=True, appendfsync="always")
    url = store.start()
    try:
        yield url
    finally:
        store.stop()


async def an_old_instance_recorded(url: str, **fields: str) -> aioredis.Redis:
    """The record the instance before this one left in the data this one loaded (as a restart finds it)."""
    rds = make_client(url)
    await rds.xadd(keys.PROPOSAL_STREAM, {"proposal_id": "old-1"}, id="900-0")
    await rds.xadd(keys.AUDIT_STREAM, {"plan_id": "p"}, id="950-0")
    record = {
        "run_id": "old-run",
        "replid": "old-repl",
        "floor": "1000-0",
        "since": repr(OLD_SINCE),
        "kept": "900-0",
        "searched": "1",
        "key": OLD_KEY,
        "durability": "always",
        "durable_run_id": "old-run",
    }
    await rds.hset(keys.STORE_EPOCH, mapping={**record, **fields})
    return rds


async def claimed_by(url: str, watch: StoreWatch) -> Epoch:
    client = make_client(url, watch)
    try:
        await client.ping()
    finally:
        await client.aclose()
    assert watch.epoch is not None
    return watch.epoch


def witness_of(key: str, since: float, proposal: str = "0-0", audit: str = "0-0") -> StoreWatch:
    """An Apply's watch that last read on epoch ``key`` (begun at ``since``): these newest entries."""
    watch = StoreWatch(record_epoch=True)
    watch.epoch = Epoch(StoreIdentity("old-run", "old-repl"), (1000, 0), since, key=key)
    for entry in ("1-0", proposal):
        watch.saw(entry)
    watch.saw_audit(audit)
    return watch


async def test_a_restart_of_an_instance_stamped_always_continues_its_epoch(aof_store: str) -> None:
    """The instance before this one wrote every write to disk before its reply: this one holds all it
    acknowledged, so its epoch goes on (floor, since, kept, searched and the key the scripts compare): proposals
    in flight across the restart stay vouched for. The stamp goes (this instance is stamped for itself). So it
    does for an Apply that read up to the streams' ends on that epoch."""
    rds = await an_old_instance_recorded(aof_store)
    epoch = await claimed_by(aof_store, witness_of(OLD_KEY, OLD_SINCE, proposal="900-0", audit="950-0"))
    assert (epoch.floor, epoch.since, epoch.kept, epoch.searched) == ((1000, 0), OLD_SINCE, (900, 0), True)
    assert (epoch.key, epoch.continued) == (OLD_KEY, 1)
    assert epoch.identity.run_id == (await rds.info("server"))["run_id"]
    record = await rds.hgetall(keys.STORE_EPOCH)
    assert (record["key"], record["previous_run_id"], record["continued"]) == (OLD_KEY, "old-run", "1")
    assert "durability" not in record and "durable_run_id" not in record
    await rds.aclose()


@pytest.mark.parametrize(
    "fields",
    [{"durability": "everysec"}, {"durable_run_id": "another-run"}, {"durability": "none"}, {"floor": ""}],
    ids=["everysec", "stamp_of_another_instance", "no_aof", "record_not_whole"],
)
async def test_a_restart_that_may_have_lost_writes_begins_a_new_epoch(aof_store: str, fields: dict[str, str]) -> None:
    """Not stamped ``always`` for the instance the record names (or the record is not whole): whatever that
    instance acknowledged last may be gone, so a new epoch begins here (everything older is looked up)."""
    rds = await an_old_instance_recorded(aof_store, **fields)
    if fields.get("floor") == "":
        await rds.hdel(keys.STORE_EPOCH, "floor")
    epoch = await claimed_by(aof_store, StoreWatch(record_epoch=True))
    assert epoch.continued == 0
    assert epoch.key != OLD_KEY and epoch.floor == (900, 0)  # the stream's last id, not the old floor
    assert await rds.hget(keys.STORE_EPOCH, "key") == epoch.key
    await rds.aclose()


async def test_an_instance_without_an_append_only_file_is_not_continued(store_url: str) -> None:
    """The test store keeps no append-only file: it loaded whatever it loaded from a snapshot (or nothing), so
    even a record stamped ``always`` by the instance before it is not continued."""
    rds = await an_old_instance_recorded(store_url)
    assert (await rds.info("persistence"))["aof_enabled"] == 0
    epoch = await claimed_by(store_url, StoreWatch(record_epoch=True))
    assert epoch.continued == 0 and epoch.key != OLD_KEY
    await rds.aclose()


@pytest.mark.parametrize(
    "witness",
    [
        {"proposal": "2000-0"},  # a proposal read on the epoch that the stream lacks
        {"audit": "3000-0"},  # an audit entry (a decision, a consume) read on the epoch that the stream lacks
    ],
    ids=["proposal_stream_behind", "audit_stream_behind"],
)
async def test_a_store_without_what_this_apply_read_on_the_epoch_is_not_continued(
    aof_store: str, witness: dict[str, str]
) -> None:
    """Stamped ``always``, yet the streams end below what this Apply read on the epoch (a backup restored, a
    disk that lied about its fsync): the store forgot what it had acknowledged, so nothing is continued."""
    rds = await an_old_instance_recorded(aof_store)
    epoch = await claimed_by(aof_store, witness_of(OLD_KEY, OLD_SINCE, **witness))
    assert epoch.continued == 0 and epoch.key != OLD_KEY
    assert await rds.hget(keys.STORE_EPOCH, "lost") == "1"
    await rds.aclose()


async def test_a_store_holding_an_older_epoch_than_this_apply_read_on_is_not_continued(aof_store: str) -> None:
    """A demoted primary back on its own data (or a backup of an earlier epoch): its record is an epoch older
    than the one this Apply last read on (which began later, on another instance), so whatever that later
    epoch wrote is missing here. An Apply that last read on an older epoch than the record's is no witness of
    anything missing (the record's epoch began after it)."""
    rds = await an_old_instance_recorded(aof_store)
    later = await claimed_by(aof_store, witness_of("a-later-epoch", OLD_SINCE + 60))
    assert later.continued == 0 and later.key != OLD_KEY
    await rds.delete(keys.STORE_EPOCH, keys.PROPOSAL_STREAM, keys.AUDIT_STREAM)
    await (await an_old_instance_recorded(aof_store)).aclose()
    earlier = await claimed_by(aof_store, witness_of("an-earlier-epoch", OLD_SINCE - 60, proposal="99999-0"))
    assert (earlier.key, earlier.continued) == (OLD_KEY, 1)
    await rds.aclose()


async def test_the_same_instance_without_what_this_apply_read_begins_a_new_epoch(aof_store: str) -> None:
    """The epoch was continued before this Apply's connection came (the start hook claimed it), and the stream
    lacks what this Apply had read: the next connection begins a new epoch (plans vouched before are refused by
    the scripts from then on, its key being new); one that read nothing newer keeps the epoch."""
    rds = await an_old_instance_recorded(aof_store)
    first = await claimed_by(aof_store, StoreWatch(record_epoch=True))
    assert first.continued == 1
    reader = witness_of(OLD_KEY, OLD_SINCE, proposal="900-0")
    client = make_client(aof_store, reader)
    try:
        await client.ping()
        assert reader.epoch is not None and reader.epoch.same_as(first)  # nothing missing: the same epoch
        reader.saw("5000-0")
        await client.connection_pool.disconnect()
        await client.ping()
    finally:
        await client.aclose()
    assert reader.epoch is not None and not reader.epoch.same_as(first)
    assert await rds.hget(keys.STORE_EPOCH, "key") == reader.epoch.key
    await rds.aclose()


async def test_a_store_with_a_replica_is_neither_stamped_always_nor_continued(aof_store: str, tmp_path: Path) -> None:
    """A replica's copy of the record (and its stamp) travels with the data: restarted as a primary it could be
    continued with whatever it had not received. So a primary with a replica is stamped ``replicated``, and a
    claim that sees a replica drops a stamp and continues nothing."""
    rds = await an_old_instance_recorded(aof_store)
    replica = EmbeddedStore(tmp_path / "replica", persist=False)
    replica_url = replica.start()
    control = make_client(replica_url)
    try:
        port = int(aof_store.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
        await control.execute_command("REPLICAOF", "127.0.0.1", str(port))
        deadline = time.monotonic() + 10
        while int((await rds.info("replication"))["connected_slaves"]) == 0:
            assert time.monotonic() < deadline, "the replica never connected"
            await asyncio.sleep(0.05)
        epoch = await claimed_by(aof_store, StoreWatch(record_epoch=True))
        assert epoch.continued == 0 and epoch.key != OLD_KEY
        assert "durability" not in await rds.hgetall(keys.STORE_EPOCH)
        assert await record_epoch(aof_store) == "replicated"
    finally:
        await control.aclose()
        replica.stop()
        await rds.aclose()


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
async def test_a_real_restart_continues_the_epoch_only_when_every_write_was_fsynced(
    tmp_path: Path, appendfsync: str
) -> None:
    """A real store killed (SIGKILL) and started again on its append-only file, stamped at each start as
    ``qt store-stamp`` does after the deployed store's start: with ``always`` the epoch goes on, with
    ``everysec`` (a host crash could have lost its last second) a new one begins."""
    store = EmbeddedStore(tmp_path / "data", persist=True, appendfsync=appendfsync)
    url = store.start()
    try:
        assert await record_epoch(url) == appendfsync
        before = (await claimed(url)).epoch
        client = make_client(url)
        await client.xadd(keys.PROPOSAL_STREAM, {"proposal_id": "in-flight"})
        await client.aclose()
        store.kill()
        store = EmbeddedStore(tmp_path / "data", persist=True, port=store.port, appendfsync=appendfsync)
        store.start()
        await record_epoch(url)
        after = (await claimed(url)).epoch
    finally:
        store.stop()
    assert before is not None and after is not None and after.identity != before.identity
    assert after.same_as(before) is (appendfsync == "always")
    assert after.continued == (1 if appendfsync == "always" else 0)


async def test_a_promoted_replica_is_an_epoch_of_its_own_marked_promoted(aof_store: str, tmp_path: Path) -> None:
    """A replica made primary (REPLICAOF NO ONE, as a Sentinel does) has not been a primary since it started:
    its epoch begins when an Apply first sees it, and is marked promoted (its old primary, cut off, may have taken
    writes a while longer: the failover fence, domain/trust.py). A primary since its start is not."""
    assert not (await claimed_by(aof_store, StoreWatch(record_epoch=True))).promoted
    replica = EmbeddedStore(tmp_path / "replica", persist=False)
    replica_url = replica.start()
    control = make_client(replica_url)
    try:
        port = int(aof_store.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
        await control.execute_command("REPLICAOF", "127.0.0.1", str(port))
        deadline = time.monotonic() + 10
        while (await control.info("replication")).get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            await asyncio.sleep(0.05)
        await control.execute_command("REPLICAOF", "NO", "ONE")
        epoch = await claimed_by(replica_url, StoreWatch(record_epoch=True))
    finally:
        await control.aclose()
        replica.stop()
    assert epoch.promoted and epoch.continued == 0 and epoch.promoted_at == epoch.since


async def test_a_restart_after_a_promotion_keeps_when_the_promotion_was_seen(store_url: str) -> None:
    """The record this instance loaded is a promoted replica's (promoted_at set): the new epoch begun by the
    restart keeps it, so the failover fence still runs from the promotion (domain/trust.py)."""
    rds = await an_old_instance_recorded(store_url, durability="everysec", promoted_at="1700000000.5")
    epoch = await claimed_by(store_url, StoreWatch(record_epoch=True))
    assert epoch.key != OLD_KEY and not epoch.promoted and epoch.promoted_at == 1700000000.5
    assert await rds.hget(keys.STORE_EPOCH, "promoted_at") == "1700000000.5"
    await rds.aclose()
