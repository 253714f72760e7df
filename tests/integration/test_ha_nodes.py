"""The nodes of a high-availability store (issue 21): ACL users on every node (`qt acl --apply` through the
Sentinels), and the fence on the consume.

The consume of a plan's permits is on a replica before its order can be sent (issue 21, fencing): with
``replicas``, CONSUME_PERMITS is followed by ``WAIT`` on the same connection, on a real primary with two real
replicas (bus/embedded_ha.py). Paused replicas (SIGSTOP: they neither apply nor acknowledge) make it
"unreplicated" within the bound; a WAIT on another connection than the script's would count nothing of the
script and say "ok" (the paused test fails that way).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from quantum_trader.bus import keys
from quantum_trader.bus.acl import ROLES, acl_file
from quantum_trader.bus.connection import acl_password_file, make_client, with_credentials
from quantum_trader.bus.embedded_ha import EmbeddedHA
from quantum_trader.bus.scripts import ConsumeStatus, Scripts
from quantum_trader.secrets import write_secret_file
from quantum_trader.settings import Settings

pytestmark = pytest.mark.integration

PLAN = "a" * 32
WAIT_MS = 300


PASSWORDS = {role: secrets.token_hex(8) for role in ROLES}


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedHA, str]]:
    """A primary, two replicas (one Sentinel, which the set needs to start); the admin's password."""
    tmp = tmp_path_factory.mktemp("replicated")
    passwords = PASSWORDS
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


async def _consume(
    url: str, plan_id: str, replicas: int, *, stored: bytes = b"gov", wait_ms: int = WAIT_MS
) -> tuple[ConsumeStatus, float]:
    """Store both permits (the Governor's as ``stored``), consume them as b"gov" and b"p33"; the status and
    how long the call took."""
    rds: aioredis.Redis = make_client(url)
    try:
        await rds.set(keys.governor_permit(plan_id), stored, ex=60)
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
            replicas_wait_ms=wait_ms,
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

    for port in replicas:
        assert port is not None
        ha_set.pause_node(port)
    try:
        status, took_s = asyncio.run(
            _consume(_url(primary, password), PLAN[:-1] + "4", 2, stored=b"other", wait_ms=4000)
        )
    finally:
        for port in replicas:
            assert port is not None
            ha_set.resume_node(port)
    assert status == "governor_permit_changed"
    assert took_s < 3.0  # no 4 s WAIT behind it


def test_qt_acl_apply_through_the_sentinels_creates_the_users_on_every_node(
    ha: tuple[EmbeddedHA, str], tmp_path: Path
) -> None:
    """ACL users are not replicated: `qt acl --apply` with a Sentinel URL finds the primary and both replicas
    and defines the users on each. A user deleted on every node can log in on every node again afterwards."""
    ha_set, password = ha
    settings = Settings(state_dir=tmp_path, _env_prefix="QT_IGNORED_")
    for role, secret in PASSWORDS.items():  # the operator's state dir holds the set's passwords
        write_secret_file(acl_password_file(settings, role), secret)
    ports = [node.port for node in ha_set.nodes if node.port is not None]
    for port in ports:
        with redis.Redis.from_url(_url(port, password)) as node:
            node.execute_command("ACL", "DELUSER", "qt-governor")
    url = with_credentials(ha_set.url, "qt-admin", acl_password_file(settings, "admin"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    env |= {"QT_STATE_DIR": str(tmp_path), "QT_REDIS_URL": url}
    done = subprocess.run(
        [sys.executable, "-m", "quantum_trader", "acl", "--apply"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ACL users created on redis://qt-admin:***@127.0.0.1:") == 3, done.stdout
    assert password not in done.stdout + done.stderr
    for port in ports:
        with redis.Redis(port=port, username="qt-governor", password=PASSWORDS["governor"]) as node:
            assert node.ping()


def test_a_fenced_consume_through_the_sentinels_keeps_the_clients_sentinel_connections(
    ha: tuple[EmbeddedHA, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consume's WAIT runs on a single-connection client sharing the pool; closing that one must not close
    the Sentinel connections every other task of the service shares (only the owning client's close does)."""
    ha_set, password = ha
    closed: list[object] = []
    real = Sentinel.aclose

    async def spy(self: Sentinel) -> None:
        closed.append(self)
        await real(self)

    monkeypatch.setattr(Sentinel, "aclose", spy)
    url = ha_set.url.replace("redis+sentinel://", f"redis+sentinel://qt-admin:{password}@")
    url += f"?sentinel_password={PASSWORDS['sentinel']}"

    async def run() -> list[ConsumeStatus]:
        rds: aioredis.Redis = make_client(url)
        try:
            statuses = []
            for n in range(3):
                plan_id = PLAN[:-1] + f"{5 + n}"
                await rds.set(keys.governor_permit(plan_id), b"gov", ex=60)
                await rds.set(keys.p33_permit(plan_id), b"p33", ex=60)
                statuses.append(
                    await Scripts(rds).consume_permits(
                        plan_id=plan_id, symbol="SOLUSDT", governor_raw=b"gov", p33_raw=b"p33", marker="{}",
                        now=time.time(), latency_ms=1.0, audit_maxlen=1000, replicas=1, replicas_wait_ms=WAIT_MS,
                    )
                )  # fmt: skip
            assert closed == []  # three fenced consumes, the Sentinels still open
            return statuses
        finally:
            await rds.aclose()

    assert asyncio.run(run()) == ["ok", "ok", "ok"]
    assert len(closed) == 1  # the client's own close
