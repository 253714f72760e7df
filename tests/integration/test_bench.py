"""`qt bench --quick` as a smoke test: it runs the private system and the seed baseline and writes its report.
No timing is asserted (shared machines make single absolute times noise); the structure and counts are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from programs import program_env, qt

pytestmark = pytest.mark.integration


def test_bench_quick_measures_the_chain_and_the_seed_design(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = qt("bench", "--quick", "--plans", "20", "--out", str(out), env=program_env(tmp_path), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "bench.json").read_text())
    assert report["plans"] == 20 and report["warmup"] == 2
    for name in ("chain_decided", "chain_result", "chain_client"):
        assert report[name]["samples"] == 20, name
        assert 0 < report[name]["p50_ms"] <= report[name]["p99_ms"] <= report[name]["max_ms"], name
    assert report["seed_decided"]["samples"] == 10
    assert report["p50_ratio_seed_over_chain"] > 0
    assert (
        set(report["cpu_idle_pct"])
        == set(report["cpu_load_pct"])
        == set(report["rss_mb"])
        == {
            "brain",
            "governor",
            "apply",
        }
    )
    assert "| chain: plan -> both permits consumed (Apply) | 20 |" in (out / "bench.md").read_text()
