"""The programs as an operator runs them: `qt up` in one process, `qt propose --wait` and `qt proof` in
others, found through the state directory; then Ctrl-C stops everything."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from programs import Up, program_env, qt

from quantum_trader.cli.chaos import RECOVERY_LIMIT_S

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return program_env(tmp_path)


@pytest.mark.timeout(330)  # `qt proof` inside has its own 300 s bound
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
        assert 'p33_ledger_drift{symbol="BTCUSDT"}' in p33 and "qt_build_info{python=" in governor
        for service in ("APPLY", "GOVERNOR", "BRAIN"):
            base = f"http://127.0.0.1:{env[f'QT_{service}__METRICS_PORT']}"
            assert httpx.get(f"{base}/healthz").status_code == 200
            ready = httpx.get(f"{base}/readyz")
            assert (ready.status_code, ready.text) == (200, "ok: deciding\n"), service

        deadline = time.monotonic() + 20  # the heartbeat that carries the stream's health comes every few s
        while True:
            status = json.loads(qt("status", "--json", env=env).stdout)
            streams = {s["service"]: s["stream"] for s in status["services"]}
            if {streams.get("brain"), streams.get("apply")} == {"healthy"} or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert streams == {"apply": "healthy", "brain": "healthy", "governor": "off"}
        assert "brain" in (shown := qt("status", env=env).stdout) and "healthy · reconnects" in shown
        p33 = httpx.get(f"http://127.0.0.1:{env['QT_BRAIN__METRICS_PORT']}/metrics").text
        assert "p33_stream_healthy 1.0" in p33 and "p33_stream_resyncs_total" in p33  # P3.3 follows the stream
        assert sorted(s["service"] for s in status["services"] if s["ready"]) == ["apply", "brain", "governor"]
        btc = next(row for row in status["symbols"] if row["symbol"] == "BTCUSDT")
        assert Decimal(btc["exchange"]) == 0 and Decimal(btc["ledger"]) == 0 and Decimal(btc["drift"]) == 0
        assert status["kill_switch"] is False and status["unresolved_orders"] == 0

        again = qt("propose", "BTCUSDT", "--action", "FULL_CLOSE", "--wait", env=env)
        assert again.returncode == 1 and "no_position" in again.stdout  # nothing left to close

        # the audit trail of that close, as an operator reads it back
        consumed = json.loads(qt("audit", "--json", "--decision", "consumed", env=env).stdout)
        assert {e["subject"] for e in consumed} == {"governor", "p33"}
        plan_id = consumed[0]["plan_id"]
        story = json.loads(qt("audit", plan_id, "--json", env=env).stdout)
        steps = [(e["step"], e["actor"]) for e in story["events"]]
        assert steps[:2] == [("proposal", "cli"), ("plan", "apply")] and steps[-2:] == [
            ("result", "apply"),
            ("ledger", "p33"),
        ]
        assert {a for s, a in steps if s == "decision"} == {"governor", "p33"}
        table = qt("audit", plan_id, env=env).stdout
        assert "EXECUTED: filled 0.010" in table and "ledger 0.010 -> 0.000 (result)" in table
        day = json.loads(qt("report", "--since", "24h", "--json", env=env).stdout)
        assert day["plans"] == 2 and day["executed"] == 1 and day["not_executed"] == {"skipped": 1}
        assert day["allows"] == 2 and day["denies"] == 0 and day["wait_p50_ms"] > 0
        assert day["service_starts"] == {"brain": 1, "governor": 1, "apply": 1}
        assert "| executed | 1 |" in qt("report", "--markdown", env=env).stdout
        bad = qt("report", "--since", "yesterday", env=env)
        assert bad.returncode == 2 and "use a number and a unit" in bad.stderr

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


# its own bound: the program's 300 s (pytest's default 120 s would cut it short on a loaded machine)
@pytest.mark.long  # make test-long; store losses: test_store_loss.py, test_long_reboot.py stay in make test
@pytest.mark.timeout(330)
def test_a_short_chaos_run_with_store_losses_keeps_every_promise(env: dict[str, str]) -> None:
    """`qt chaos --store-loss`: the store also comes back three times with older data only (failover and host
    crash): judged from the exchange and the observer's own copy, nothing doubled, nothing contradicted."""
    done = qt("chaos", "--plans", "60", "--rate", "15", "--seed", "4", "--store-loss", "--json", env=env, timeout=300)
    report = json.loads(done.stdout)
    assert done.returncode == 0, report
    assert report["ok"] and report["store_losses"] == 3 and report["executions"] > 0
    assert report["duplicate_orders"] == report["results_disagreeing_with_exchange"] == 0
    assert report["lost_plans"] == report["executions_without_two_permits"] == report["resent_closed_twice"] == 0


# its own bound: the program's 300 s (pytest's default 120 s would cut it short on a loaded machine)
@pytest.mark.timeout(330)
def test_a_short_chaos_run_keeps_every_promise(env: dict[str, str]) -> None:
    """`qt chaos --stream-faults` with real processes: SIGKILLs of services, a store restart and faults of the
    exchange's user-data stream (the first armed at once) while plans flow; P3.3's snapshots are checked
    against the exchange throughout."""
    done = qt(
        "chaos", "--plans", "60", "--rate", "15", "--seed", "3", "--stream-faults", "--json", env=env, timeout=300
    )
    report = json.loads(done.stdout)
    assert done.returncode == 0, report
    assert report["ok"] and report["plans"] == report["results"] >= 60
    assert report["lost_plans"] == report["duplicate_orders"] == report["executions_without_two_permits"] == 0
    assert report["store_restarts"] == 1 and report["max_recovery_s"] <= RECOVERY_LIMIT_S
    assert report["stream_faults_run"] and sum(report["stream_faults"].values()) >= 1
    assert report["snapshot_disagreements_at_end"] == 0 and report["snapshot_lag_max_s"] <= 15.0
    # every fill of the run timed into its snapshot (P3.3's downtime from the kills not counted)
    assert report["fills_timed"] >= 1 and report["fills_never_shown"] == 0
    assert report["fill_shown_ms"]["max"] <= 15_000


# its own bound: the program's 300 s (pytest's default 120 s would cut it short on a loaded machine)
@pytest.mark.long  # make test-long; failovers under load: test_sentinel_failover.py stays in make test
@pytest.mark.timeout(330)
def test_a_short_chaos_run_through_failovers_keeps_every_promise(env: dict[str, str]) -> None:
    """`qt chaos --failover`: the store a primary, two replicas and three Sentinels; the primary killed twice and
    paused once past a promotion (each aimed at a plan in the order path), a Sentinel restarted."""
    done = qt("chaos", "--plans", "300", "--rate", "20", "--seed", "5", "--failover", "--json", env=env, timeout=300)
    report = json.loads(done.stdout)
    assert done.returncode == 0, report
    assert report["ok"] and report["failovers"] == 3 and report["writes_taken_by_a_resumed_primary"] == 0
    assert report["duplicate_orders"] == report["results_disagreeing_with_exchange"] == report["lost_plans"] == 0
