"""Least privilege: each service runs as its own ACL user that can do its job and nothing else."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from conftest import Chain, make_settings, set_position, sim_orders
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.acl import ROLES, USERS, acl_file, apply_acl, without
from quantum_trader.bus.embedded import EmbeddedStore, free_port

pytestmark = pytest.mark.integration

PLAN = "0123456789abcdef"


@pytest.fixture(scope="module")
def locked_store() -> Iterator[tuple[str, dict[str, str]]]:
    """A Valkey of its own with the service users on and the password-less default user off."""
    store = EmbeddedStore(Path(tempfile.mkdtemp(prefix="qt-acl-")), persist=False)
    url = store.start()
    passwords = {role: secrets.token_hex(16) for role in ROLES}

    async def lock() -> None:
        client = aioredis.Redis.from_url(url)
        await apply_acl(client, passwords, disable_default=True)
        await client.aclose()

    import asyncio

    asyncio.run(lock())
    yield url, passwords
    store.stop()


def user_url(base: str, role: str, passwords: dict[str, str]) -> str:
    name = USERS[role].name if role in USERS else "qt-admin"
    return base.replace("redis://", f"redis://{name}:{passwords[role]}@")


@pytest.fixture
def accounts(locked_store) -> Iterator[dict[str, redis.Redis]]:
    base, passwords = locked_store
    admin = redis.Redis.from_url(user_url(base, "admin", passwords))
    admin.flushdb()
    clients = {role: redis.Redis.from_url(user_url(base, role, passwords)) for role in ROLES}
    yield clients
    for client in clients.values():
        client.close()


def refused(call) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


def script_refused(call) -> bool:
    """Refused by the ACL: the script as a whole (its keys), or a command inside it."""
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    except redis.exceptions.ResponseError as exc:
        return "ACL failure in script" in str(exc)
    return False


def dry_run_refused(admin: redis.Redis, user: str, *command: str) -> bool:
    """ACL DRYRUN: would ``user`` be allowed ``command``? (Without running it: SHUTDOWN stays a dry run.)"""
    verdict = admin.execute_command("ACL", "DRYRUN", user, *command)
    return verdict != b"OK" and b"no permissions" in verdict


def test_the_password_less_default_user_is_off(locked_store) -> None:
    base, _ = locked_store
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(base).ping()


@pytest.mark.parametrize("role", sorted(USERS))
def test_no_service_account_can_flush_configure_or_administer(role: str, accounts) -> None:
    assert accounts[role].ping()
    user = USERS[role].name
    for command in (
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("CONFIG", "GET", "*"),
        ("CONFIG", "SET", "appendonly", "no"),
        ("KEYS", "*"),
        ("DEBUG", "SLEEP", "0"),
        ("ACL", "LIST"),
        ("SHUTDOWN",),
        ("SCRIPT", "FLUSH"),
        ("MONITOR",),
    ):
        assert dry_run_refused(accounts["admin"], user, *command), f"{role} may run {command}"


def test_the_brain_cannot_write_a_governor_permit_nor_the_governor_a_p33_one(accounts) -> None:
    assert refused(lambda: accounts["brain"].set(keys.governor_permit(PLAN), "{}"))
    assert refused(lambda: accounts["governor"].set(keys.p33_permit(PLAN), "{}"))
    assert accounts["governor"].set(keys.governor_permit(PLAN), "{}")
    assert accounts["brain"].set(keys.p33_permit(PLAN), "{}")


def test_only_apply_publishes_plans_and_results_and_consumes_permits(accounts) -> None:
    for role in ("brain", "governor", "operator"):
        assert refused(lambda r=role: accounts[r].xadd(keys.RESULT_STREAM, {"plan_id": PLAN})), role
        assert refused(lambda r=role: accounts[r].xadd(keys.PLAN_STREAM, {"plan_id": PLAN})), role
        assert refused(lambda r=role: accounts[r].set(keys.executed_marker(PLAN), "x")), role
    for role in ("governor", "operator"):
        assert refused(lambda r=role: accounts[r].delete(keys.p33_permit(PLAN))), role
    assert accounts["apply"].xadd(keys.RESULT_STREAM, {"plan_id": PLAN})
    assert accounts["apply"].xadd(keys.PLAN_STREAM, {"plan_id": PLAN})
    # Apply consumes proposals but cannot inject one
    assert refused(lambda: accounts["apply"].xadd(keys.PROPOSAL_STREAM, {"symbol": "BTCUSDT"}))


def test_a_script_declaring_its_consumed_stream_still_cannot_publish_into_it(accounts) -> None:
    """The bus scripts declare the stream they acknowledge in (KEYS), which needs EVALSHA rights on it: those
    rights cover running scripts only; a command inside a script is checked on its own."""
    forge = "return redis.call('XADD', KEYS[1], '*', 'plan_id', ARGV[1])"
    drop = "return redis.call('DEL', KEYS[1])"
    for role, stream in (("brain", keys.RESULT_STREAM), ("brain", keys.PLAN_STREAM), ("governor", keys.PLAN_STREAM)):
        assert script_refused(lambda r=role, s=stream: accounts[r].eval(forge, 1, s, PLAN)), (role, stream)
        assert script_refused(lambda r=role, s=stream: accounts[r].eval(drop, 1, s)), (role, stream)
    assert script_refused(lambda: accounts["apply"].eval(forge, 1, keys.PROPOSAL_STREAM, PLAN))
    # what the scripts do there is allowed: acknowledge an entry of the group
    ack = "return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])"
    assert accounts["governor"].eval(ack, 1, keys.PLAN_STREAM, keys.GOVERNOR_GROUP, "1-1") == 0
    assert accounts["apply"].eval(ack, 1, keys.PROPOSAL_STREAM, keys.APPLY_GROUP, "1-1") == 0


def test_services_cannot_flip_the_kill_switch_or_touch_the_ledger_of_others(accounts) -> None:
    for role in ("apply", "governor", "brain"):
        assert refused(lambda r=role: accounts[r].set(keys.KILL_SWITCH, "0")), role
    assert refused(lambda: accounts["governor"].hset(keys.ledger("BTCUSDT"), "last_known_amt", "0"))
    assert refused(lambda: accounts["apply"].hset(keys.ledger("BTCUSDT"), "last_known_amt", "0"))
    assert accounts["operator"].set(keys.KILL_SWITCH, "1")
    assert accounts["governor"].get(keys.KILL_SWITCH) == b"1"


def test_the_dashboard_reads_and_flips_the_kill_switch_and_nothing_else(accounts) -> None:
    web = accounts["web"]
    assert web.set(keys.KILL_SWITCH, "1") and web.xadd(keys.OPS_AUDIT_STREAM, {"action": "kill_switch"})
    assert web.get(keys.KILL_SWITCH) == b"1" and web.xrevrange(keys.AUDIT_STREAM, count=1) == []
    assert refused(lambda: web.set(keys.governor_permit(PLAN), "{}"))
    assert refused(lambda: web.set(keys.p33_permit(PLAN), "{}"))
    assert refused(lambda: web.xadd(keys.PROPOSAL_STREAM, {"symbol": "BTCUSDT"}))
    assert refused(lambda: web.xadd(keys.AUDIT_STREAM, {"plan_id": PLAN}))
    assert refused(lambda: web.set(keys.GOVERNOR_MODE, "manual"))


@pytest.fixture
async def locked_rds(locked_store, accounts) -> AsyncIterator[aioredis.Redis]:
    base, passwords = locked_store
    client = aioredis.Redis.from_url(user_url(base, "operator", passwords), decode_responses=True)
    yield client
    await client.aclose()


async def test_the_whole_chain_works_under_least_privilege(locked_store, locked_rds, sim, tmp_path: Path) -> None:
    base, passwords = locked_store
    settings = make_settings(tmp_path, user_url(base, "admin", passwords), sim.url)
    chain = Chain(settings, urls={role: user_url(base, role, passwords) for role in ("apply", "governor", "brain")})
    set_position(sim, "BTCUSDT", "0.010")
    # each account creates the consumer groups it may: together, all of them
    await chain.start()
    try:
        sub = await ops.propose(locked_rds, "BTCUSDT", "FULL_CLOSE")
        result = await ops.wait_result(locked_rds, sub.plan_id, 10, sub.result_cursor)
        assert result is not None and result.executed
        assert len(sim_orders(sim, "BTCUSDT")) == 1
        await ops.set_kill_switch(locked_rds, True, "test")
        await ops.set_kill_switch(locked_rds, False, "test")
    finally:
        await chain.stop()


REDIS_SERVER = os.environ.get("QT_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.mark.parametrize("before_7_2", [True, False])
def test_the_acl_file_for_a_redis_7_0_loads_there_and_the_newer_one_is_refused(
    tmp_path: Path, before_7_2: bool
) -> None:
    """Debian 12's redis-server is 7.0, which has no CLIENT SETINFO: a file naming it stops the server at start.
    `qt acl --before-7-2` leaves it out; `qt acl --apply` asks the server (see test_store_tls's set)."""
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("Debian's redis-server is not installed (`make test` installs it)")
    version = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, check=True).stdout
    if "v=7.0." not in version and "v=7.1." not in version:
        pytest.skip(f"this redis-server is not a 7.0/7.1: {version.strip()}")
    passwords = {role: secrets.token_hex(8) for role in ROLES}
    aclfile = tmp_path / "users.acl"
    aclfile.write_text(acl_file(passwords, with_admin=True, before_7_2=before_7_2))
    port = free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--aclfile", str(aclfile), "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        if not before_7_2:
            assert process.wait(timeout=10) != 0  # refused at start
            assert b"setinfo" in (process.stdout.read() if process.stdout else b"").lower()
            return
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(port=port, username="qt-governor", password=passwords["governor"]) as governor:
                    assert governor.ping()
                    break
            except redis.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
    finally:
        process.kill()
        process.wait(timeout=10)


def test_rules_for_commands_a_server_lacks_are_left_out_everywhere_selectors_included() -> None:
    rules = ["~a", "+client|setinfo", "+client|setname", "(~b +client|setinfo +xack)", "-client|SETINFO"]
    assert without(rules, frozenset({"client|setinfo"})) == ["~a", "+client|setname", "(~b +xack)"]
    assert without(rules, frozenset()) == rules
