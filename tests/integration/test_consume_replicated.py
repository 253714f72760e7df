"""The consume of a plan's permits is on a replica before its order can be sent (issue 21, fencing): with
``replicas``, CONSUME_PERMITS is followed by ``WAIT`` on the same connection, on a real primary with two real
replicas (bus/embedded_ha.py). Paused replicas (SIGSTOP: they neither apply nor acknowledge) make it
"unreplicated" within the bound; a WAIT on another connection than the script's would count nothing of the
script and say "ok" (the paused test fails that way).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.bus.acl import ROLES, acl_file
from quantum_trader.bus.connection import make_client
from quantum_trader.bus.embedded_ha import EmbeddedHA
from quantum_trader.bus.scripts import ConsumeStatus, Scripts

pytestmark = pytest.mark.integration

PLAN = "a" * 32
WAIT_MS = 300


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedHA, str]]:
    """A primary, two replicas (one Sentinel, which the set needs to start); the admin's password."""
    tmp = tmp_path_factory.mktemp("replicated")
    passwords = {role: secrets.token_hex(8) for role in ROLES}
    aclfile = tmp / "users.acl"
    aclfile.write_text(acl_file(passwords, with_admin=True))
    ha_set = EmbeddedHA(tmp / "ha", aclfile, passwords["replica"], passwords["sentinel"], sentinels=1, quorum=1)
    try:
        ha_set.start()
        yield ha_set, passwords["admin"]
    finally:
        ha_set.stop()


def _url(port: int, password: str) -> str:
    return f"redis://qt-admin:{password}@127.0.0.1:{port}/0"


async def _consume(url: str, plan_id: str, replicas: int) -> tuple[ConsumeStatus, float]:
    rds: aioredis.Redis = make_client(url)
    try:
        await rds.set(keys.governor_permit(plan_id), b"gov", ex=60)
        await rds.set(keys.p33_permit(plan_id), b"p33", ex=60)
        started = time.monotonic()
        status = await Scripts(rds).consume_permits(
            plan_id=plan_id,
            symbol="SOLUSDT",
            governor_raw=b"gov",
            p33_raw=b"p33",
            marker='{"at": 1}',
            now=time.time(),
            latency_ms=1.0,
            audit_maxlen=1000,
            replicas=replicas,
            replicas_wait_ms=WAIT_MS,
        )
        return status, time.monotonic() - started
    finally:
        await rds.aclose()


def _replica_has(port: int, password: str, key: str) -> bool:
    with redis.Redis.from_url(_url(port, password), socket_timeout=2) as replica:
        return bool(replica.exists(key))


def test_a_consume_acknowledged_by_a_replica_is_there_when_it_returns(ha: tuple[EmbeddedHA, str]) -> None:
    ha_set, password = ha
    primary, *replicas = (node.port for node in ha_set.nodes)
    assert primary is not None
    status, _ = asyncio.run(_consume(_url(primary, password), PLAN[:-1] + "1", replicas=2))
    assert status == "ok"
    for port in replicas:  # acknowledged means applied: both replicas hold the executed marker already
        assert port is not None and _replica_has(port, password, keys.executed_marker(PLAN[:-1] + "1"))


@pytest.mark.parametrize("paused", [1, 2])
def test_a_consume_the_replicas_do_not_acknowledge_in_time_is_unreplicated(
    ha: tuple[EmbeddedHA, str], paused: int
) -> None:
    """Two replicas asked for and ``paused`` of them stopped: "unreplicated" after about the bound (the primary
    still takes the write: min-replicas-max-lag is 5 s). Without replicas asked for, the same consume is "ok"."""
    ha_set, password = ha
    primary, *replicas = (node.port for node in ha_set.nodes)
    assert primary is not None
    stopped = [port for port in replicas[:paused] if port is not None]
    for port in stopped:
        ha_set.pause_node(port)
    try:
        status, took_s = asyncio.run(_consume(_url(primary, password), PLAN[:-1] + f"{paused}2", replicas=2))
        unfenced, _ = asyncio.run(_consume(_url(primary, password), PLAN[:-1] + f"{paused}3", replicas=0))
    finally:
        for port in stopped:
            ha_set.resume_node(port)
    assert status == "unreplicated"
    assert took_s >= WAIT_MS / 1000 * 0.9  # it waited for the acknowledgements, it did not give up at once
    assert unfenced == "ok"


def test_a_refused_consume_does_not_wait(ha: tuple[EmbeddedHA, str]) -> None:
    """A consume the script refuses (its permit changed) is that refusal, with no WAIT, even with every replica
    paused."""
    ha_set, password = ha
    primary, *replicas = (node.port for node in ha_set.nodes)
    assert primary is not None

    async def refused() -> tuple[str, float]:
        rds: aioredis.Redis = make_client(_url(primary, password))
        plan_id = PLAN[:-1] + "4"
        try:
            await rds.set(keys.governor_permit(plan_id), b"other", ex=60)
            await rds.set(keys.p33_permit(plan_id), b"p33", ex=60)
            started = time.monotonic()
            status = await Scripts(rds).consume_permits(
                plan_id=plan_id,
                symbol="SOLUSDT",
                governor_raw=b"gov",
                p33_raw=b"p33",
                marker="{}",
                now=time.time(),
                latency_ms=1.0,
                audit_maxlen=1000,
                replicas=2,
                replicas_wait_ms=4000,
            )
            return status, time.monotonic() - started
        finally:
            await rds.aclose()

    for port in replicas:
        assert port is not None
        ha_set.pause_node(port)
    try:
        status, took_s = asyncio.run(refused())
    finally:
        for port in replicas:
            assert port is not None
            ha_set.resume_node(port)
    assert status == "governor_permit_changed"
    assert took_s < 3.0  # no 4 s WAIT behind it
