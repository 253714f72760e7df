"""The benchmark's pure parts: percentiles, what counts as sustained, the markdown and the plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from quantum_trader.bench.chain import RateStep
from quantum_trader.bench.measure import Latency
from quantum_trader.bench.report import BenchReport, SeedStep, highest_sustained, markdown, plot_json, sustained


def _step(rate: float, p99: float, *, completed: int = 100, answered: float | None = None) -> RateStep:
    latency = Latency(samples=90, p50_ms=p99 / 3, p99_ms=p99, max_ms=p99 * 1.2)
    return RateStep(
        target_per_s=rate,
        sent=100,
        offered_per_s=rate,
        completed_per_s=rate if answered is None else answered,
        completed=completed,
        decided=latency,
        result=latency,
        end_to_end=latency,
    )


def test_latency_percentiles_are_nearest_rank_over_every_sample() -> None:
    latency = Latency.of(float(n) for n in range(1, 101))
    assert (latency.samples, latency.p50_ms, latency.p99_ms, latency.max_ms) == (100, 50.0, 99.0, 100.0)
    assert Latency.of([]) == Latency()


def test_a_step_is_sustained_only_when_fast_complete_and_keeping_up() -> None:
    assert sustained(_step(500, 20.0), _step(500, 20.0).result)
    assert not sustained(_step(500, 60.0), _step(500, 60.0).result)  # p99 over 50 ms
    short = _step(500, 20.0, completed=99)
    assert not sustained(short, short.result)  # a plan left without its answer
    slow = _step(500, 20.0, answered=400.0)
    assert not sustained(slow, slow.result)  # answers fall behind the offered rate


def test_highest_sustained_rate_skips_the_failed_steps() -> None:
    steps = [_step(200, 10.0), _step(500, 30.0), _step(1000, 80.0)]
    assert highest_sustained(steps, "result") == 500
    assert highest_sustained([_step(1000, 80.0)], "result") is None


def test_markdown_and_plot_from_a_report(tmp_path: Path) -> None:
    report = BenchReport(machine={"cpus": 2, "python": "3.11"}, plans=10, warmup=1)
    report.open_loop = [_step(200, 10.0), _step(500, 30.0)]
    report.seed_open_loop = [SeedStep(200, 200.0, Latency(10, 101.0, 103.0, 104.0))]
    report.decisions = [_step(1000, 12.0)]
    report.sustained_plans_per_s = 500
    report.rss_mb, report.cpu_idle_pct = {"governor": 50.0}, {"governor": 0.1}
    text = markdown(report)
    assert "highest sustained (p99 result < 50 ms, answers keeping up): **500 plans/s**" in text
    assert "| 200 | 200 | 100/100 | 0 | 3.33 | 10.00 |" in text
    assert "| 200 | 200 | 100/100 | 0 | 3.33 | 10.00 | 3.33 | 10.00 | 3.33 | 10.00 | 101.00 | 103.00 |" in text
    source = tmp_path / "bench.json"
    source.write_text(json.dumps(asdict(report)))
    assert plot_json(source, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_no_plot_without_load_steps(tmp_path: Path) -> None:
    source = tmp_path / "bench.json"
    source.write_text(json.dumps(asdict(BenchReport())))
    assert not plot_json(source, tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()
