"""`qt` as a user meets it: misuse gets one line and exit 2, an unreachable store or exchange one clear line
and exit 1, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantum_trader.system import free_port


def qt(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "quantum_trader", *args]
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    clean["QT_STATE_DIR"] = str(tmp_path / "state")
    return clean


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("qt: ") and "Traceback" not in done.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["propose", "BTCUSDT"], "--action"),
        (["propose", "BTCUSDT", "--action", "OPEN_LONG"], "OPEN_LONG"),
        (["propose", "BTCUSDT", "--action", "FULL_CLOSE", "--qty", "1"], "FULL_CLOSE"),
        (["propose", "BTCUSDT", "--action", "PARTIAL_CLOSE"], "exactly one of --qty or --pct"),
        (["propose", "BTCUSDT", "--action", "PARTIAL_CLOSE", "--qty", "abc"], "--qty must be a number"),
        (["propose", "BTCUSDT", "--action", "PARTIAL_CLOSE", "--pct", "nan"], "--pct must be a finite number"),
        (["permit", "grant", "xyz"], "16 lowercase hex"),
        (["permit", "deny", "0123456789abcdef"], "--reason"),
        (["governor", "kill-switch", "maybe"], "maybe"),
        (["explain", "no_such_code"], "unknown code"),
        (["no-such-command"], "No such command"),
    ],
)
def test_misuse_is_one_line_and_exit_2(args: list[str], words: str, env: dict[str, str]) -> None:
    done = qt(*args, env=env)
    assert done.returncode == 2
    assert words in one_line_error(done)


def test_bad_configuration_names_the_variable(env: dict[str, str]) -> None:
    env["QT_APPLY__PERMIT_WAIT_MS"] = "soon"
    done = qt("apply", env=env)
    assert done.returncode == 2
    assert "QT_APPLY__PERMIT_WAIT_MS" in one_line_error(done)


def test_no_running_system_is_one_clear_line(env: dict[str, str]) -> None:
    done = qt("propose", "BTCUSDT", "--action", "FULL_CLOSE", env=env)
    assert done.returncode == 1
    assert "no store" in one_line_error(done) and "qt up" in done.stderr


@pytest.mark.parametrize(
    "url",
    [
        "foo://127.0.0.1:6379/0",
        "127.0.0.1:6379",
        "redis+sentinel://h1:26379",  # no master name
        "redis+sentinel://h1,h2:26379/mymaster",  # a Sentinel without its port
        "redis+sentinel://h1:26379/mymaster?sentinel_pasword=x",  # a misspelt option
    ],
)
def test_a_store_url_redis_py_cannot_use_is_one_line_and_exit_2(env: dict[str, str], url: str) -> None:
    """Seen in issue 11: a raw ValueError traceback from redis-py in every service."""
    env["QT_REDIS_URL"] = url
    for args in (("apply",), ("brain",), ("governor",), ("status",)):
        done = qt(*args, env=env)
        assert done.returncode == 2, (args, done.stderr)
        assert "QT_REDIS_URL" in one_line_error(done)


def test_unreachable_store_is_one_clear_line_for_services_and_commands(env: dict[str, str]) -> None:
    env["QT_REDIS_URL"] = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    for args in (("apply",), ("governor",), ("governor", "kill-switch", "on")):
        done = qt(*args, env=env)
        assert done.returncode == 1, args
        line = one_line_error(done)
        assert "cannot reach the store" in line and "hunter2" not in done.stderr + done.stdout


@pytest.mark.integration
def test_unreachable_exchange_is_one_clear_line(env: dict[str, str], store_url: str) -> None:
    env.update(
        {
            "QT_REDIS_URL": store_url,
            "QT_EXCHANGE__SIM_URL": f"http://127.0.0.1:{free_port()}",
            "QT_EXCHANGE__API_KEY": "k",
            "QT_EXCHANGE__API_SECRET": "s",
            "QT_KEYS__GOVERNOR": "g" * 32,
            "QT_KEYS__P33": "p" * 32,
        }
    )
    done = qt("brain", env=env)
    assert done.returncode == 1
    assert "cannot use the exchange" in one_line_error(done)


def test_explain_prints_meaning_cause_and_action(env: dict[str, str]) -> None:
    done = qt("explain", "qty_mismatch", env=env)
    assert done.returncode == 0
    assert "meaning:" in done.stdout and "cause:" in done.stdout and "action:" in done.stdout
