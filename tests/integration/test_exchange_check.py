"""`qt exchange check` against the simulator, healthy and broken; services refuse Hedge Mode at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import SIM_ADMIN, SIM_KEY, SIM_SECRET

pytestmark = pytest.mark.integration


def qt(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "quantum_trader", *args]
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def env(tmp_path: Path, sim) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    base.update(
        {
            "QT_STATE_DIR": str(tmp_path),
            "QT_EXCHANGE__SIM_URL": sim.url,
            "QT_EXCHANGE__API_KEY": SIM_KEY,
            "QT_EXCHANGE__API_SECRET": SIM_SECRET,
        }
    )
    return base


def admin(sim, path: str, body: dict) -> None:
    httpx.post(f"{sim.url}{path}", json=body, headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()


def checks(done: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    return {c["check"]: c for c in json.loads(done.stdout)}


def test_check_passes_against_the_simulator(env: dict[str, str]) -> None:
    done = qt("exchange", "check", "--json", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    found = checks(done)
    assert all(c["ok"] for c in found.values())
    assert "step 0.001, min 0.001, max 120" in found["filters BTCUSDT"]["detail"]
    assert "one-way" in found["position mode"]["detail"]


def test_check_fails_in_hedge_mode_and_says_how_to_fix_it(env: dict[str, str], sim) -> None:
    admin(sim, "/_sim/position-mode", {"dual": True})
    done = qt("exchange", "check", "--json", env=env)
    assert done.returncode == 1
    mode = checks(done)["position mode"]
    assert not mode["ok"] and "Hedge Mode is on" in mode["detail"] and "One-way" in mode["detail"]


def test_check_fails_on_a_skewed_clock(env: dict[str, str], sim) -> None:
    admin(sim, "/_sim/clock", {"offset_ms": 5000})
    done = qt("exchange", "check", "--json", env=env)
    assert done.returncode == 1
    clock = checks(done)["clock"]
    assert not clock["ok"] and "5.0 s behind" in clock["detail"] and "NTP" in clock["detail"]
    # compensated: the signed requests themselves still work
    assert checks(done)["keys"]["ok"]


def test_check_fails_with_wrong_keys(env: dict[str, str]) -> None:
    env["QT_EXCHANGE__API_SECRET"] = "not-the-secret"
    done = qt("exchange", "check", "--json", env=env)
    assert done.returncode == 1
    keys = checks(done)["keys"]
    assert not keys["ok"] and "signature rejected" in keys["detail"]
    assert "not-the-secret" not in done.stdout + done.stderr


def test_services_refuse_to_start_in_hedge_mode(env: dict[str, str], sim, store_url: str) -> None:
    admin(sim, "/_sim/position-mode", {"dual": True})
    env.update({"QT_REDIS_URL": store_url, "QT_KEYS__GOVERNOR": "g" * 32, "QT_KEYS__P33": "p" * 32})
    for service in ("apply", "brain"):
        done = qt(service, env=env)
        assert done.returncode == 1, service
        assert "refusing to start" in done.stderr and "Hedge Mode" in done.stderr
