"""The store instance's epoch as Apply records it (bus/identity.py CLAIM_EPOCH), on real stores: its floor, and
the newest proposal it kept of what came before it, from which the search for forgotten orders starts.

Issue 20, point 2 of what was seen: the search started a minute before ``min(last id, floor)``, which is the
instance's start as soon as anything was added after it, so after a long reboot it missed the order of a
proposal the store forgot (the proposal stream's newest kept entry lies before the start).
"""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.bus.streams import ensure_topology

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
