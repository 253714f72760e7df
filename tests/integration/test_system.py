"""The programs as an operator runs them: `qt up` in one process, `qt propose --wait` and `qt proof` in
others, found through the state directory; then Ctrl-C stops everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from quantum_trader.system import free_port

pytestmark = pytest.mark.integration


def qt(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quantum_trader", *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    base.update(
        {
            "QT_STATE_DIR": str(tmp_path / "state"),
            "QT_EXCHANGE__SIM_PORT": str(free_port()),
            "QT_APPLY__METRICS_PORT": str(free_port()),
            "QT_GOVERNOR__METRICS_PORT": str(free_port()),
            "QT_BRAIN__METRICS_PORT": str(free_port()),
            "QT_BRAIN__SNAPSHOT_INTERVAL_S": "1",
            "QT_GOVERNOR__COOLDOWN_S": "2",  # proof waits out cooldowns of symbols the test just traded
        }
    )
    return base


class Up:
    """`qt up` in the background, its output collected line by line (the pipe must be drained)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "quantum_trader", "up"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"`qt up` never printed {text!r}; output:\n" + "\n".join(self.lines[-60:]))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=5)
        return code


def test_up_then_propose_from_another_process_closes_the_position(env: dict[str, str], tmp_path: Path) -> None:
    up = Up(env)
    try:
        up.wait_for("is up")
        runtime = json.loads((tmp_path / "state" / "runtime.json").read_text())
        assert runtime["sim_url"].endswith(env["QT_EXCHANGE__SIM_PORT"])

        done = qt("propose", "BTCUSDT", "--action", "FULL_CLOSE", "--wait", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "executed" in done.stdout and "0.010" in done.stdout

        metrics = httpx.get(f"http://127.0.0.1:{env['QT_APPLY__METRICS_PORT']}/metrics").text
        assert 'qt_apply_results_total{outcome="executed"} 1.0' in metrics
        assert "qt_apply_permit_wait_seconds_bucket" in metrics
        p33 = httpx.get(f"http://127.0.0.1:{env['QT_BRAIN__METRICS_PORT']}/metrics").text
        assert 'p33_permits_total{decision="allow",reason="sanity_checks_passed"} 1.0' in p33
        governor = httpx.get(f"http://127.0.0.1:{env['QT_GOVERNOR__METRICS_PORT']}/metrics").text
        assert 'qt_governor_permits_total{decision="allow",reason="policy_passed"} 1.0' in governor

        status = json.loads(qt("status", "--json", env=env).stdout)
        assert sorted(s["service"] for s in status["services"] if s["ready"]) == ["apply", "brain", "governor"]
        btc = next(row for row in status["symbols"] if row["symbol"] == "BTCUSDT")
        assert Decimal(btc["exchange"]) == 0 and Decimal(btc["ledger"]) == 0 and Decimal(btc["drift"]) == 0
        assert status["kill_switch"] is False and status["unresolved_orders"] == 0

        again = qt("propose", "BTCUSDT", "--action", "FULL_CLOSE", "--wait", env=env)
        assert again.returncode == 1 and "no_position" in again.stdout  # nothing left to close

        proof = qt("proof", "--json", env=env, timeout=300)
        report = json.loads(proof.stdout)
        failed = [
            (c["name"], c["outcome"], c["governor"], c["p33"], c["detail"]) for c in report["cases"] if not c["ok"]
        ]
        assert proof.returncode == 0 and not failed, f"{failed}\n" + "\n".join(up.lines[-150:])
        assert report["system"].startswith("running")
    finally:
        code = up.stop()
    assert code == 0, "\n".join(up.lines[-40:])
    assert any("stopped" in line for line in up.lines)
    assert not (tmp_path / "state" / "runtime.json").exists()
    refused = qt("propose", "BTCUSDT", "--action", "FULL_CLOSE", env=env)
    assert refused.returncode == 1 and refused.stderr.startswith("qt: no store")


def test_a_second_up_on_the_same_state_dir_is_refused(env: dict[str, str]) -> None:
    up = Up(env)
    try:
        up.wait_for("is up")
        second = qt("up", env=env)
        assert second.returncode == 1 and "already running" in second.stderr
    finally:
        assert up.stop() == 0


def test_a_short_chaos_run_keeps_every_promise(env: dict[str, str]) -> None:
    """`qt chaos` with real processes: SIGKILLs of services and a store restart while plans flow."""
    done = qt("chaos", "--plans", "60", "--rate", "15", "--seed", "3", "--json", env=env, timeout=300)
    report = json.loads(done.stdout)
    assert done.returncode == 0, report
    assert report["ok"] and report["plans"] == report["results"] >= 60
    assert report["lost_plans"] == report["duplicate_orders"] == report["executions_without_two_permits"] == 0
    assert report["store_restarts"] == 1 and report["max_recovery_s"] <= 2.0
