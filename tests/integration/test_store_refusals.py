"""The store refusing, erring and hanging, for real: a primary that refuses writes until replicas it does not
have catch up (NOREPLICAS), one demoted to a replica and promoted again (READONLY, then a new replication id),
one busy with a long script (BUSY), and one whose process is stopped (the clients time out).

Every time: no service dies, nothing is decided while the store cannot serve (fail closed), nothing is lost,
and the chain serves again once the store does. The programs themselves (`qt apply`, `qt brain`, `qt governor`)
wait for a store that refuses writes at their start instead of dying on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from programs import program_env

from conftest import (
    GOVERNOR_KEY,
    P33_KEY,
    SIM_ADMIN,
    SIM_KEY,
    SIM_SECRET,
    Chain,
    make_settings,
    set_position,
    sim_orders,
    wait_key,
)
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.bus.embedded import EmbeddedStore
from quantum_trader.bus.errors import StoreUnavailableReply
from quantum_trader.domain import reasons
from quantum_trader.system import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def store():
    own = EmbeddedStore(Path(tempfile.mkdtemp(prefix="qt-refuse-")), persist=False)
    own.start()
    yield own
    own.stop()


def admin(store: EmbeddedStore) -> redis.Redis:
    return redis.Redis.from_url(store.url, decode_responses=True)


async def alive(chain: Chain) -> None:
    assert all(not task.done() for task in chain.tasks.values()), {
        name: task.exception() for name, task in chain.tasks.items() if task.done()
    }


async def test_a_store_refusing_writes_stops_every_decision_until_it_accepts_them_again(sim, store, tmp_path) -> None:
    set_position(sim, "SOLUSDT", "40")
    settings = make_settings(tmp_path, store.url, sim.url)
    chain = Chain(settings)
    rds = make_client(store.url)
    control = admin(store)
    try:
        control.config_set("min-replicas-to-write", "1")  # no replica exists: every write is NOREPLICAS
        # the services start while it refuses (Apply's store epoch, P3.3's reconcile, the groups all write)
        for name in ("brain", "governor", "apply"):
            await chain.start_one(name, wait_ready=False)
        await asyncio.sleep(2.0)
        await alive(chain)
        with pytest.raises(StoreUnavailableReply, match="NOREPLICAS"):
            await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")  # a producer gets a clean error, not a hang
        assert sim_orders(sim) == []
        control.config_set("min-replicas-to-write", "0")
        await _until_ready(chain)
        sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
        result = await ops.wait_result(rds, sub.plan_id, 20, sub.result_cursor)
        assert result is not None and result.executed
        await alive(chain)
    finally:
        control.config_set("min-replicas-to-write", "0")
        control.close()
        await chain.stop()
        await rds.aclose()


async def _until_ready(chain: Chain) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if all(name in chain.services for name in ("brain", "governor", "apply")):
            brain, apply = chain.services["brain"], chain.services["apply"]
            if brain.ready.is_set() and apply.waiter.ready.is_set():
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the services never became ready after the store accepted writes again")


async def test_a_primary_demoted_and_promoted_again_is_a_new_instance(sim, store, tmp_path) -> None:
    """REPLICAOF makes the store a replica (writes answer READONLY, new connections see a replica and are
    refused); REPLICAOF NO ONE makes it a primary again with a new replication id: another instance. A plan
    that waited across the change is never sent (the store cannot vouch for it any more); new plans are."""
    set_position(sim, "SOLUSDT", "40")
    set_position(sim, "ETHUSDT", "-0.5")
    settings = make_settings(tmp_path, store.url, sim.url, apply={"permit_wait_ms": 4000, "metrics_port": 0})
    chain = Chain(settings)
    rds = make_client(store.url)
    control = admin(store)
    try:
        await chain.start()
        await ops.set_governor_mode(rds, "manual", "test")
        waiting = await ops.propose(rds, "ETHUSDT", "FULL_CLOSE")
        await wait_key(rds, keys.plan_record(waiting.plan_id))
        replid = control.info("replication")["master_replid"]
        control.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a primary that is not there
        await asyncio.sleep(1.5)
        await alive(chain)
        with pytest.raises(StoreUnavailableReply, match="READONLY"):
            await rds.set(keys.KILL_SWITCH, "1")
        control.execute_command("REPLICAOF", "NO", "ONE")
        assert control.info("replication")["master_replid"] != replid
        await rds.connection_pool.disconnect()
        await ops.decide_manually(rds, settings, waiting.plan_id, grant=True, reason="", operator="test")
        result = await ops.wait_result(rds, waiting.plan_id, 30, waiting.result_cursor)
        assert result is not None and not result.executed and result.error == reasons.STORE_CHANGED, result
        assert sim_orders(sim) == []
        assert chain.services["apply"].watch.changes >= 1
        await ops.set_governor_mode(rds, "auto", "test")
        fresh = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
        result = await ops.wait_result(rds, fresh.plan_id, 20, fresh.result_cursor)
        assert result is not None and result.executed, result
        await alive(chain)
    finally:
        control.execute_command("REPLICAOF", "NO", "ONE")
        control.close()
        await chain.stop()
        await rds.aclose()


async def test_a_store_busy_with_a_long_script_answers_busy_and_nothing_breaks(sim, store, tmp_path) -> None:
    set_position(sim, "SOLUSDT", "40")
    settings = make_settings(tmp_path, store.url, sim.url)
    chain = Chain(settings)
    rds = make_client(store.url)
    control = admin(store)
    try:
        await chain.start()
        control.config_set("busy-reply-threshold", "100")  # others get BUSY once a script runs 100 ms
        spin = "local s = tonumber(redis.call('TIME')[1]) + 2 while tonumber(redis.call('TIME')[1]) < s do end return 1"
        busy = threading.Thread(target=lambda: admin(store).eval(spin, 0), daemon=True)
        busy.start()
        await asyncio.sleep(0.5)
        with pytest.raises(StoreUnavailableReply, match="BUSY"):
            await rds.get(keys.KILL_SWITCH)
        await asyncio.to_thread(busy.join, 10)
        await alive(chain)
        sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
        result = await ops.wait_result(rds, sub.plan_id, 20, sub.result_cursor)
        assert result is not None and result.executed
    finally:
        control.close()
        await chain.stop()
        await rds.aclose()


async def test_a_store_that_stops_answering_is_an_outage_and_the_chain_comes_back(sim, store, tmp_path) -> None:
    """SIGSTOP: the server process is frozen (a hung host). Clients time out after 5 s instead of waiting
    forever; a proposal sent before the freeze is served after SIGCONT."""
    set_position(sim, "SOLUSDT", "40")
    settings = make_settings(tmp_path, store.url, sim.url, apply={"permit_wait_ms": 8000, "metrics_port": 0})
    chain = Chain(settings)
    rds = make_client(store.url)
    try:
        await chain.start()
        await ops.set_governor_mode(rds, "manual", "test")
        sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
        await wait_key(rds, keys.plan_record(sub.plan_id))
        assert store.pid is not None
        os.kill(store.pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
                await rds.get(keys.KILL_SWITCH)
            assert 4.0 < time.monotonic() - started < 8.0  # the 5 s socket timeout, not a hang
            await alive(chain)
        finally:
            os.kill(store.pid, signal.SIGCONT)
        await rds.connection_pool.disconnect()
        await ops.decide_manually(rds, settings, sub.plan_id, grant=True, reason="", operator="test")
        result = await ops.wait_result(rds, sub.plan_id, 20, sub.result_cursor)
        assert result is not None and result.executed, result
        await alive(chain)
    finally:
        await chain.stop()
        await rds.aclose()


def test_the_programs_wait_for_a_store_that_refuses_writes_at_their_start(sim, store, tmp_path) -> None:
    """`qt apply`, `qt brain` and `qt governor` as systemd runs them, started while the store answers
    NOREPLICAS to every write: none dies (the crash of issue 11: a TypeError in the line meant to log it), and
    each becomes ready once the store accepts writes."""
    set_position(sim, "SOLUSDT", "40")
    control = admin(store)
    env = program_env(tmp_path)
    env.update(
        {
            "QT_REDIS_URL": store.url,
            "QT_EXCHANGE__SIM_URL": sim.url,
            "QT_EXCHANGE__API_KEY": SIM_KEY,
            "QT_EXCHANGE__API_SECRET": SIM_SECRET,
            "QT_KEYS__GOVERNOR": GOVERNOR_KEY,
            "QT_KEYS__P33": P33_KEY,
        }
    )
    control.config_set("min-replicas-to-write", "1")
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "quantum_trader", name],
            env={**env, "QT_CONSUMER_NAME": f"{name}-1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("brain", "governor", "apply")
    }
    try:
        time.sleep(4.0)
        for name, process in processes.items():
            assert process.poll() is None, f"{name} exited: {process.communicate()[0][-2000:]}"
        control.config_set("min-replicas-to-write", "0")
        deadline = time.monotonic() + 30
        for name, process in processes.items():
            service = "brain" if name == "brain" else name
            while control.hget(keys.health(service, f"{name}-1"), "ready") != "1":
                assert process.poll() is None, f"{name} exited: {process.communicate()[0][-2000:]}"
                assert time.monotonic() < deadline, f"{name} never became ready"
                time.sleep(0.1)
    finally:
        control.config_set("min-replicas-to-write", "0")
        control.close()
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for name, process in processes.items():
            output = process.communicate(timeout=20)[0]
            assert "Traceback" not in output, f"{name}:\n{output[-3000:]}"


async def test_a_result_the_store_refuses_is_published_once_it_accepts_writes_again(sim, store, tmp_path) -> None:
    """After the order is sent only the result's publication is retried: a store that refuses writes when the
    reply comes back delays the result, it does not start the plan over (one order, one result)."""
    set_position(sim, "SOLUSDT", "40")
    settings = make_settings(tmp_path, store.url, sim.url, exchange={"timeout_ms": 5000, "order_recv_window_ms": 5000})
    chain = Chain(settings)
    rds = make_client(store.url)
    control = admin(store)
    rule = {"kind": "latency", "ms": 1500, "path": "/fapi/v1/order", "method": "POST", "count": 1}
    httpx.post(f"{sim.url}/_sim/faults", json=rule, headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()
    try:
        await chain.start()
        sub = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
        await wait_key(rds, keys.executed_marker(sub.plan_id))  # permits consumed: the order is on its way
        control.config_set("min-replicas-to-write", "1")
        await asyncio.sleep(3.0)  # the reply has come back; every publication of its result is refused
        assert not await rds.exists(keys.result_marker(sub.plan_id))
        await alive(chain)
        control.config_set("min-replicas-to-write", "0")
        result = await ops.wait_result(rds, sub.plan_id, 20, sub.result_cursor)
        assert result is not None and result.executed, result
        assert len(sim_orders(sim)) == 1
        assert len([f for _, f in await rds.xrange(keys.RESULT_STREAM) if f["plan_id"] == sub.plan_id]) == 1
    finally:
        control.config_set("min-replicas-to-write", "0")
        control.close()
        await chain.stop()
        await rds.aclose()


def test_a_program_started_while_the_store_is_busy_waits_for_it(store, tmp_path) -> None:
    """A store busy with a long script answers BUSY even to PING: `qt governor` waits for it (one line saying
    so) instead of exiting, and becomes ready once the script is killed."""
    control = admin(store)
    control.config_set("busy-reply-threshold", "100")
    spin = "local s = tonumber(redis.call('TIME')[1]) + 60 while tonumber(redis.call('TIME')[1]) < s do end return 1"
    busy = threading.Thread(target=lambda: suppress_script_killed(admin(store), spin), daemon=True)
    busy.start()
    time.sleep(0.5)
    env = program_env(tmp_path)
    env.update({"QT_REDIS_URL": store.url, "QT_KEYS__GOVERNOR": GOVERNOR_KEY, "QT_CONSUMER_NAME": "governor-1"})
    process = subprocess.Popen(
        [sys.executable, "-m", "quantum_trader", "governor"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while not any("cannot serve yet" in line for line in lines):
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)[-2000:]
            time.sleep(0.1)
        control.script_kill()  # the script ends: the store serves again
        busy.join(10)
        while control.hget(keys.health("governor", "governor-1"), "ready") != "1":
            assert process.poll() is None, f"governor exited: {''.join(lines)[-2000:]}"
            assert time.monotonic() < deadline, "governor never became ready"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        reader.join(5)
        control.close()
    output = "".join(lines)
    assert "BUSY" in output, output[-2000:]
    assert "Traceback" not in output, output[-3000:]


def suppress_script_killed(client: redis.Redis, script: str) -> None:
    with contextlib.suppress(redis.ResponseError):  # "Script killed by user with SCRIPT KILL"
        client.eval(script, 0)


async def test_the_intent_sweep_rides_out_a_store_that_cannot_serve_reads(sim, store, tmp_path, capsys) -> None:
    """A replica cut off from its primary with `replica-serve-stale-data no` cannot serve even reads (MASTERDOWN;
    a new connection is refused as a replica): the intent sweep logs the outage and goes on sweeping; once the
    store serves again the chain does too."""
    set_position(sim, "SOLUSDT", "40")
    settings = make_settings(tmp_path, store.url, sim.url, apply={"order_resolve_timeout_s": 1, "metrics_port": 0})
    chain = Chain(settings)
    rds = make_client(store.url)
    control = admin(store)
    seen = ""
    try:
        await chain.start()
        control.config_set("replica-serve-stale-data", "no")
        control.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a primary that is not there
        deadline = time.monotonic() + 20
        while "intent sweep: store unavailable" not in seen:
            assert time.monotonic() < deadline, seen[-3000:]
            await asyncio.sleep(0.2)
            captured = capsys.readouterr()
            seen += captured.out + captured.err
        await alive(chain)
        control.execute_command("REPLICAOF", "NO", "ONE")
        await rds.connection_pool.disconnect()
        await asyncio.sleep(1.0)  # past the new instance's trust floor (entries right at its start: store_changed)
        fresh = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
        result = await ops.wait_result(rds, fresh.plan_id, 30, fresh.result_cursor)
        assert result is not None and result.executed, result
        await alive(chain)
    finally:
        control.execute_command("REPLICAOF", "NO", "ONE")
        control.close()
        await chain.stop()
        await rds.aclose()
