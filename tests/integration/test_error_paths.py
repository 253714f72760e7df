"""Error paths that no other test reached (issue 11), each made to happen for the reason its handler exists:
a store that answers as a replica, an epoch record or a hash or a plan record someone wrote garbage into, a
store account from before the services needed INFO, a simulator port already taken, a stop signal or Ctrl-C
while a command runs, a process with no user name, a system started by another user, a simulator that refuses
its admin calls, a dashboard flip that is not JSON. Every one asserts what the handler promises: the exit code
and the one line for commands, the value shown or decided, and that nothing crashed.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from programs import program_env, qt, start_qt
from starlette.testclient import TestClient

from conftest import Chain, set_position, sim_orders
from quantum_trader import __version__, ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import StoreNotReady, connect
from quantum_trader.bus.embedded import EmbeddedStore
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.cli.scenarios import run_cases
from quantum_trader.cli.status import render
from quantum_trader.domain import reasons
from quantum_trader.exchange.sim.server import SimServer
from quantum_trader.runtime import RUNTIME_FILE
from quantum_trader.settings import Settings
from quantum_trader.system import SimAdmin, free_port
from quantum_trader.views.status import collect
from quantum_trader.web.app import create_app

pytestmark = pytest.mark.integration

PLAN = "0123456789abcdef"
WEB_TOKEN = "web-test-token-0123456789"
PR_CAPBSET_DROP, CAP_KILL = 24, 5  # linux/prctl.h, linux/capability.h


@pytest.fixture
def own_store() -> Iterator[str]:
    """A Valkey of this test's own, for what changes the whole server (its role, its users)."""
    data = Path(tempfile.mkdtemp(prefix="qt-errors-"))
    store = EmbeddedStore(data, persist=False)
    url = store.start()
    yield url
    store.stop()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return program_env(tmp_path) | {"PYTHONUNBUFFERED": "1"}


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qt: "), done.stderr
    return lines[0]


# --- the store refuses, or holds what cannot be read -----------------------------------------------------


async def test_a_replica_is_waited_for_not_used(own_store: str) -> None:
    """bus/connection.connect: a server that answers but cannot serve (here a replica) is StoreNotReady, which
    the services wait out (services/runner.connect_when_ready) instead of exiting."""
    control = redis.Redis.from_url(own_store)
    control.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a primary that is not there
    control.close()
    watch = StoreWatch()
    with pytest.raises(StoreNotReady, match="cannot serve yet: the store answered as slave, not a primary"):
        await connect(own_store, watch)
    assert watch.identity is None  # the replica was never taken for the store


async def test_an_unreadable_epoch_record_fails_the_connection_and_is_left_alone(
    rds: aioredis.Redis, store_url: str
) -> None:
    """bus/identity.StoreWatch.on_connect: an epoch record that names this instance but holds garbage fails
    the connection as an outage; it is never used, and never overwritten by this connection either."""
    info = await rds.info("server")
    replication = await rds.info("replication")
    garbage = {"floor": "not-an-id", "since": "then", "last_id": "x-y"}
    await rds.hset(
        keys.STORE_EPOCH,
        mapping={"run_id": info["run_id"], "replid": replication["master_replid"], **garbage},
    )
    watch = StoreWatch(record_epoch=True)
    with pytest.raises(StoreNotReady, match="the store's identity or epoch record is unreadable"):
        await connect(store_url, watch)
    assert watch.identity is None and watch.epoch is None
    record = await rds.hgetall(keys.STORE_EPOCH)
    assert {name: record[name] for name in garbage} == garbage


def test_a_store_account_without_info_is_told_to_run_qt_acl_again(own_store: str, env: dict[str, str]) -> None:
    """bus/identity.StoreWatch._identify: an ACL account from before the services needed INFO. A service, which
    must tell store instances apart, exits with the fix in one line; an operator command, which need not, works
    on it (bus/connection.connect assumes Redis >= 7 for an account that may not run INFO)."""
    control = redis.Redis.from_url(own_store)
    control.execute_command("ACL", "SETUSER", "qt-old-apply", "on", ">old-password", "~*", "&*", "+@all", "-info")
    control.close()
    env["QT_REDIS_URL"] = own_store.replace("redis://", "redis://qt-old-apply:old-password@")
    done = qt("apply", env=env)
    assert done.returncode == 1
    line = one_line_error(done)
    assert "may not run INFO" in line and "run `qt acl` again" in line
    assert "old-password" not in done.stderr + done.stdout
    done = qt("governor", "kill-switch", "on", env=env)
    assert (done.returncode, done.stdout.strip()) == (0, "kill switch on"), done.stderr
    control = redis.Redis.from_url(own_store)
    assert control.get(keys.KILL_SWITCH) == b"1"
    control.close()


async def test_status_shows_what_it_cannot_read_as_unknown(
    rds: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """cli/status: heartbeat, snapshot and ledger hashes anyone may write into, with values that are no number."""
    await rds.hset(keys.health("apply", "apply-1"), mapping={"pid": "42", "updated_at": "soon", "lag": "many"})
    await rds.hset(keys.snapshot("BTCUSDT"), mapping={"position_amt": "lots", "ts": "yesterday"})
    await rds.hset(keys.ledger("BTCUSDT"), mapping={"last_known_amt": "0x10"})
    status = await collect(rds, ["BTCUSDT"], "auto")
    service = status.services[0]
    assert (service["service"], service["lag"], service["pending"]) == ("apply", 0, 0)
    assert service["heartbeat_age_s"] > 1e9  # "soon" counts as never: the oldest heartbeat there is
    assert status.symbols == [
        {"symbol": "BTCUSDT", "exchange": "", "ledger": "", "drift": "", "snapshot_age_s": None, "in_flight": ""}
    ]
    render(status)  # and shown, without a crash
    shown = capsys.readouterr().out
    assert "BTCUSDT" in shown and "apply-1" in shown


def test_a_plan_record_that_cannot_be_read_is_one_line_for_permit_grant(store_url: str, env: dict[str, str]) -> None:
    """ops.load_plan: a plan record in the store that is not a plan (a broken writer, a hand edit)."""
    store = redis.Redis.from_url(store_url)
    fields = {"plan_id": PLAN, "symbol": "BTCUSDT", "side": "LONG", "action": "FULL_CLOSE", "qty": "lots"}
    store.hset(keys.plan_record(PLAN), mapping={**fields, "decision": "EXECUTE", "created_at": "0"})
    env["QT_REDIS_URL"] = store_url
    done = qt("permit", "grant", PLAN, env=env)
    assert done.returncode == 1
    assert f"plan {PLAN} record is unreadable" in one_line_error(done)
    assert not store.exists(keys.governor_permit(PLAN))  # nothing was granted
    store.close()


async def test_the_governor_denies_when_the_snapshot_price_is_unreadable(
    chain: Chain, rds: aioredis.Redis, sim: SimServer
) -> None:
    """services/governor: the snapshot hash's price and its time are garbage; the notional limit cannot be
    checked, so the plan is denied (price_unavailable), and the Governor lives on. No brain runs here, so no
    snapshot poll overwrites the garbage."""
    set_position(sim, "BTCUSDT", "0.010")
    await rds.hset(keys.snapshot("BTCUSDT"), mapping={"mark_price": "n/a", "ts": "yesterday"})
    await chain.start("governor", "apply")
    sub = await ops.propose(rds, "BTCUSDT", "FULL_CLOSE")
    result = await ops.wait_result(rds, sub.plan_id, 20, sub.result_cursor)
    assert result is not None and not result.executed
    assert (result.error, result.denied_by) == (reasons.PERMIT_DENIED, "Governor")
    assert result.reason == reasons.PRICE_UNAVAILABLE
    assert sim_orders(sim, "BTCUSDT") == []
    assert not chain.tasks["governor"].done()


async def test_a_broken_case_fails_alone_and_the_other_cases_still_run(
    chain: Chain, rds: aioredis.Redis, store_url: str, sim: SimServer
) -> None:
    """cli/scenarios.run_cases (`qt proof` against a running system): the simulator refuses every admin call
    (the state dir's admin token is not the simulator's). Each case that needs it fails with the error; the
    cases that do not (symbol not allowed, malformed proposal) still run and pass; the kill switch is off."""
    await chain.start("apply")
    admin = SimAdmin(sim.url, "not-the-admin-token")
    try:
        rows = await run_cases(store_url, chain.settings, admin)
    finally:
        admin.close()
    by_name = {row.name: row for row in rows}
    assert by_name["not_allowed"].ok and by_name["malformed"].ok
    broken = [row for row in rows if row.name not in ("not_allowed", "malformed")]
    assert len(broken) == 8  # seven cases, one of which has two rows
    assert not any(row.ok for row in broken)
    # the error is told on the case's last row (manual_timeout and duplicate are one case: on duplicate's)
    for row in broken:
        if row.name != "manual_timeout":
            assert row.detail.startswith("error: ") and "_sim/position" in row.detail, row
    assert await rds.get(keys.KILL_SWITCH) is None


def test_a_flip_that_is_not_json_is_refused(tmp_path: Path, store_url: str) -> None:
    """web/app: the kill-switch body is not JSON at all (nor UTF-8): 400, and the switch is left as it was."""
    settings = Settings(redis_url=store_url, state_dir=tmp_path, web={"operator_token": WEB_TOKEN})
    auth = {"Authorization": f"Bearer {WEB_TOKEN}", "Content-Type": "application/json"}
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for body in (b"on, please", b"\xff\xfe{"):
            reply = client.post("/api/kill-switch", content=body, headers=auth)
            assert reply.status_code == 400 and "send" in reply.json()["error"]
        assert client.get("/api/state").json()["kill_switch"] is False


# --- the programs ----------------------------------------------------------------------------------------


def test_up_with_the_simulator_port_taken_says_so_in_one_line_and_stops(env: dict[str, str], tmp_path: Path) -> None:
    """`qt up` (cli/main.up_cmd, system._wait_http): something else holds the simulator's port and never
    answers. The wait for the simulator gets HTTP errors until the simulator exits (it cannot bind); `qt up`
    then stops what it started and exits 1 with one line."""
    port = int(env["QT_EXCHANGE__SIM_PORT"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(8)  # connections queue but are never answered: each request times out
        done = qt("up", "--no-open-positions", env=env)
    assert done.returncode == 1, done.stderr
    assert last_line(done.stderr) == "qt: sim exited with code 1 while starting"
    assert not (tmp_path / "state" / RUNTIME_FILE).exists()  # nothing left claiming a running system


def wait_for_output(process: subprocess.Popen[bytes], output: Path, text: str, bound_s: float = 60) -> None:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline and process.poll() is None:
        if text in output.read_text(errors="replace"):
            return
        time.sleep(0.02)
    raise AssertionError(f"never printed {text!r}:\n{output.read_text(errors='replace')}")


def test_a_stop_signal_while_demo_starts_exits_with_128_plus_it(env: dict[str, str], tmp_path: Path) -> None:
    """cli/main.until_stopped: SIGTERM while `qt demo` starts its private system."""
    output = tmp_path / "demo.txt"
    env["TMPDIR"] = str(tmp_path)  # the private system's state dir
    demo = start_qt("demo", env=env, output=output)
    try:
        wait_for_output(demo, output, "starting a private system")
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    text = output.read_text(errors="replace")
    assert code == 128 + signal.SIGTERM, text
    assert last_line(text) == "qt: stopped by SIGTERM" and "Traceback" not in text


@pytest.mark.parametrize("attempt", range(3))  # the lost cancellation came 4 times in 6 before with_store re-cancelled
def test_ctrl_c_while_propose_waits_exits_130_without_a_traceback(
    store_url: str, env: dict[str, str], attempt: int
) -> None:
    """Ctrl-C in a command that starts no system (`qt propose --wait`, no Apply to answer): exit 130, no
    traceback. (typer turns the KeyboardInterrupt into Exit(130), which cli/main.run passes on; its own
    `except KeyboardInterrupt` is for one that lands outside typer's command, at start-up.)"""
    env["QT_REDIS_URL"] = store_url
    # Ctrl-C as in a terminal, even when the test runner was started with SIGINT ignored (a child inherits that)
    code = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('quantum_trader')"
    )
    args = ["propose", "BTCUSDT", "--action", "FULL_CLOSE", "--wait", "--timeout", "100"]
    waiting = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert waiting.stdout is not None
        first = waiting.stdout.readline()  # printed once the proposal is in; then it waits for the result
        assert first.startswith("proposal "), first
        # Right after the line it is still sending commands: on Python 3.11 a cancellation landing as redis-py's
        # asyncio.wait_for finishes a send is dropped (CPython gh-86296); cli/main.with_store cancels again
        # until the command stops, so a Ctrl-C at any moment ends it.
        waiting.send_signal(signal.SIGINT)
        _, errors = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 130
    assert "Traceback" not in errors


def unknown_uid() -> int:
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command under a uid with no user name")
def test_a_uid_with_no_user_name_is_audited_as_operator(store_url: str, env: dict[str, str]) -> None:
    """cli/main.operator_name: a container run under an arbitrary uid (no passwd entry) and no USER/LOGNAME:
    the operator action still happens, audited as "operator". Only the real uid changes (what getpass looks
    up); the effective one stays, so the interpreter under /root can still be read."""
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME", "QT_OPERATOR"):
        env.pop(name, None)
    env["QT_REDIS_URL"] = store_url
    uid = unknown_uid()
    code = f"import os, runpy; os.setresuid({uid}, 0, 0); runpy.run_module('quantum_trader')"
    done = subprocess.run(
        [sys.executable, "-c", code, "governor", "kill-switch", "on"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "kill switch on"
    store = redis.Redis.from_url(store_url, decode_responses=True)
    audit = [(f["action"], f["value"], f["who"]) for _, f in store.xrange(keys.OPS_AUDIT_STREAM)]
    store.close()
    assert audit == [("kill_switch", "on", "operator")]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_a_system_started_by_another_user_is_found(store_url: str, env: dict[str, str], tmp_path: Path) -> None:
    """runtime.read_runtime: runtime.json names a process of another user, which this one may not signal
    (os.kill(pid, 0) is refused: another uid, no CAP_KILL). That process is alive: the system is found."""
    other = subprocess.Popen(["sleep", "120"], user=65534, group=65534, extra_groups=[])
    try:
        state = tmp_path / "state"
        state.mkdir(parents=True, exist_ok=True)
        record = {
            "redis_url": store_url,
            "sim_url": "http://127.0.0.1:1",
            "pid": other.pid,
            "started_at": time.time(),
            "version": __version__,
        }
        (state / RUNTIME_FILE).write_text(json.dumps(record), encoding="utf-8")
        store = redis.Redis.from_url(store_url)
        store.set(keys.KILL_SWITCH, "1")
        store.close()
        env.pop("QT_REDIS_URL", None)  # found through runtime.json only
        # drop CAP_KILL from the bounding set, then exec: the command runs as root without the right to signal
        # another user's processes, as any other user would
        drop = (
            "import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
            f"assert libc.prctl({PR_CAPBSET_DROP}, {CAP_KILL}, 0, 0, 0) == 0, os.strerror(ctypes.get_errno()); "
            "os.execv(sys.executable, [sys.executable, '-m', 'quantum_trader', *sys.argv[1:]])"
        )
        done = subprocess.run(
            [sys.executable, "-c", drop, "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        other.kill()
        other.wait()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kill_switch"] is True


def test_a_command_whose_credentials_are_missing_is_one_line_and_exit_2(env: dict[str, str]) -> None:
    """cli/main.run: a ConfigError from within a command (no exchange credentials configured for the mode)."""
    done = qt("exchange", "check", env=env)
    assert done.returncode == 2
    line = one_line_error(done)
    assert "no exchange API key" in line and "QT_EXCHANGE__API_KEY" in line


def test_up_with_a_store_that_does_not_answer_says_so_in_one_line(env: dict[str, str], tmp_path: Path) -> None:
    env["QT_REDIS_URL"] = f"redis://:s3cret@127.0.0.1:{free_port()}/0"  # nothing listens there
    done = qt("up", "--no-open-positions", env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "does not answer" in last_line(done.stderr) and "s3cret" not in done.stderr, done.stderr
    assert not (tmp_path / "state" / RUNTIME_FILE).exists()


def test_the_simulator_on_a_port_that_is_taken_says_so_in_one_line(env: dict[str, str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        done = qt("sim-exchange", "--port", str(port), env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert last_line(done.stderr).startswith(f"qt: the simulator cannot listen on 127.0.0.1:{port}"), done.stderr


def test_up_with_a_store_url_redis_cannot_read_says_so_in_one_line(env: dict[str, str]) -> None:
    env["QT_REDIS_URL"] = "redis://127.0.0.1:notaport/0"
    done = qt("up", "--no-open-positions", env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert last_line(done.stderr).startswith("qt: QT_REDIS_URL is not a store URL:"), done.stderr


def test_bench_rates_that_are_not_numbers_are_a_usage_error(env: dict[str, str]) -> None:
    done = qt("bench", "--rates", "100,fast", env=env)
    assert done.returncode == 2, done.stderr
    assert one_line_error(done) == "qt: --rates: not a comma-separated list of numbers: '100,fast'"


@pytest.mark.parametrize(
    ("option", "given", "bad"),
    [
        ("--limits", "15:60,30", "30"),
        ("--limits-poll", "20:2", "20:2"),
        ("--limits", "fast:60", "fast:60"),
        ("--limits", "15:inf", "15:inf"),
    ],
)
def test_bench_limits_parts_that_are_not_rate_and_seconds_are_a_usage_error(
    env: dict[str, str], option: str, given: str, bad: str
) -> None:
    done = qt("bench", option, given, env=env)
    assert done.returncode == 2, done.stderr
    assert one_line_error(done) == (
        f"qt: {option}: RATE:SECONDS parts, comma-separated (0 < rate <= 1000 proposals/s, 5 s to a day), "
        f"not {bad!r} in {given!r}"
    )


def test_qt_store_stamp_records_the_epoch_and_how_durable_the_store_is(own_store: str, env: dict[str, str]) -> None:
    """`qt store-stamp` (the deployed store's ExecStartPost): with an admin account it records the epoch and
    stamps the instance's durability (this store: no append-only file); with a service's account it is refused
    in one line, and the record is left unstamped."""
    env["QT_REDIS_URL"] = own_store
    done = qt("store-stamp", env=env)
    assert done.returncode == 0, done.stderr
    assert "durability: none (a restart begins a new epoch)" in done.stdout
    control = redis.Redis.from_url(own_store, decode_responses=True)
    try:
        record = control.hgetall(keys.STORE_EPOCH)
        assert (record["durability"], record["durable_run_id"]) == ("none", control.info("server")["run_id"])
        control.hdel(keys.STORE_EPOCH, "durability")
        control.execute_command("ACL", "SETUSER", "qt-no-config", "on", ">pw", "~*", "&*", "+@all", "-config")
        env["QT_REDIS_URL"] = own_store.replace("redis://", "redis://qt-no-config:pw@")
        refused = qt("store-stamp", "--wait", "1", env=env)
        assert refused.returncode == 1
        assert "may not stamp the store (an admin's is needed)" in one_line_error(refused)
        assert "durability" not in control.hgetall(keys.STORE_EPOCH)
    finally:
        control.close()
