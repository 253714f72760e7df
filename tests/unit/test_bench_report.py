"""The benchmark's pure parts: percentiles, what counts as sustained, the markdown and the plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from quantum_trader.bench.bounds import StepStatus
from quantum_trader.bench.chain import RateStep
from quantum_trader.bench.durability import DurabilityPart, part
from quantum_trader.bench.fencing import FencingPart
from quantum_trader.bench.limits import POLL, PUSH, LimitsPart, mode_env
from quantum_trader.bench.measure import Latency
from quantum_trader.bench.report import (
    BenchReport,
    SeedStep,
    decision_rows,
    durability_rows,
    durability_summary,
    fencing_rows,
    fencing_summary,
    highest_sustained,
    limits_rows,
    load_rows,
    markdown,
    plot_json,
    sustained,
)


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


def _part(setting: str, decided_ms: list[float], store_cpu_s: float, *, rewrite: bool = False) -> DurabilityPart:
    """10 plans after 2 warm-up (12 sent), their raw measurements as the step takes them."""
    after = {"aof_delayed_fsync": 5, "aof_current_size": 121_000, "aof_rewrites": 2 if rewrite else 1}
    return part(
        setting,
        10,
        2,
        decided_ms,
        [d + 2 for d in decided_ms],
        {"store": store_cpu_s, "brain": 0.12, "governor": 0.03, "apply": 0.15, "sim": 0.06},
        0.5004,
        {"aof_delayed_fsync": 3, "aof_current_size": 1_000, "aof_rewrites": 1, "aof_rewrite_in_progress": 0},
        {**after, "aof_rewrite_in_progress": 0, "aof_last_write_status": "ok"},
    )


def test_a_durability_part_from_its_raw_measurements() -> None:
    p = _part("always", [float(n) for n in range(1, 11)], 0.06)
    assert (p.appendfsync, p.plans, p.warmup, p.window_s) == ("always", 10, 2, 0.5)
    assert p.decided == Latency(10, 5.0, 10.0, 10.0) and p.result == Latency(10, 7.0, 12.0, 12.0)
    # CPU over the window / every plan sent in it (warm-up included): 60 ms / 12 plans
    assert p.cpu_ms_per_plan == {"store": 5.0, "brain": 10.0, "governor": 2.5, "apply": 12.5, "sim": 5.0}
    assert (p.aof_delayed_fsync, p.aof_written_bytes, p.aof_rewrites, p.aof_last_write_status) == (2, 120_000, 0, "ok")
    rewritten = _part("always", [1.0], 0.06, rewrite=True)
    assert (rewritten.aof_rewrites, rewritten.aof_written_bytes) == (1, None)  # the file was replaced meanwhile


def test_durability_rows_and_summary() -> None:
    report = BenchReport(plans=10, warmup=1)
    report.durability = [
        _part("everysec", [2.0] * 5 + [4.0] * 5, 0.03),
        _part("always", [5.0] * 5 + [9.0] * 5, 0.06, rewrite=True),
        _part("everysec", [2.5] * 5 + [3.0] * 5, 0.036),
    ]
    assert durability_rows(report) == [
        ["everysec", "10", "2.00", "4.00", "4.00", "6.00", "2.50", "10.00", "2.50", "12.50", "10000", "2"],
        ["always", "10", "5.00", "9.00", "7.00", "11.00", "5.00", "10.00", "2.50", "12.50", "-", "2"],
        ["everysec", "10", "2.50", "3.00", "4.50", "5.00", "3.00", "10.00", "2.50", "12.50", "10000", "2"],
    ]
    assert durability_summary(report) == (
        "appendfsync always against everysec (mean of 2 parts): decided p50 +2.75 ms, p99 +5.50 ms; "
        "result p50 +2.75 ms, p99 +5.50 ms; store CPU +2.25 ms/plan. "
        "The everysec parts are 0.50 ms apart in decided p50 (drift)."
    )
    text = markdown(report)
    assert "| appendfsync | plans | decided p50 | p99 | result p50 | p99 | CPU ms/plan: store |" in text
    assert "| always | 10 | 5.00 | 9.00 | 7.00 | 11.00 | 5.00 | 10.00 | 2.50 | 12.50 | - | 2 |" in text
    assert "10 plans per part after 2 warm-up" in text and durability_summary(report) in text
    assert durability_summary(BenchReport(durability=report.durability[:1])) is None  # nothing to compare


def test_markdown_of_a_durability_only_run_has_only_that_section() -> None:
    report = BenchReport(machine={"cpus": 2, "python": "3.11"}, plans=400, warmup=40, steps=["durability"])
    report.durability = [_part("everysec", [2.0], 0.03), _part("always", [3.0], 0.06)]
    text = markdown(report)
    assert text.startswith("qt bench ") and "event loop asyncio; steps: durability only\n" in text
    assert "sequential plans" not in text and "latency (ms)" not in text and "RSS MB" not in text
    assert "| everysec | 10 | 2.00 | 2.00 |" in text
    assert "sequential plans after 1 warm-up\n" in markdown(BenchReport(plans=10, warmup=1))  # a whole run


def test_a_step_that_did_not_finish_shows_in_its_row_and_under_the_tables() -> None:
    report = BenchReport(machine={"cpus": 2, "python": "3.11"}, plans=10, warmup=1)
    report.open_loop = [_step(200, 10.0), _step(1000, 30.0)]
    report.seed_open_loop = [
        SeedStep(200, 200.0, Latency(99, 101.0, 103.0, 104.0), unanswered=1),
        SeedStep(1000, outcome="timed out"),
    ]
    report.decisions = [RateStep(target_per_s=2000, outcome="failed")]
    waited = (
        "1,412 of 3,000 plans decided, 1,588 still polling, waiting for results from group p33 (1,412 permits written)"
    )
    report.step_status = [
        StepStatus("open loop 1000/s", 95.0, 12.5),
        StepStatus("seed open loop 1000/s", 64.2, 64.2, "timed out", waited),
        StepStatus("decisions 2000/s", 95.6, 0.4, "failed", "RuntimeError: boom"),
    ]
    assert [s.name for s in report.unfinished()] == ["seed open loop 1000/s", "decisions 2000/s"]
    rows = load_rows(report)
    assert rows[0][-3:] == ["101.00", "103.00", "99/100"]  # the seed's plans decided, of those it published
    assert rows[1][-3:] == ["-", "-", "timed out"] and rows[1][2] == "100/100"  # the chain's part was measured
    assert decision_rows(report)[0][:4] == ["2000", "-", "-", "failed"]
    text = markdown(report)
    assert "Steps that did not finish (their figures above are missing or partial):" in text
    assert f"- seed open loop 1000/s: timed out after 64.2 s, {waited}" in text
    assert "- decisions 2000/s: failed after 0.4 s: RuntimeError: boom" in text
    assert "open loop 1000/s: done" not in text
    assert report.step_status[0].line() == "open loop 1000/s: done in 12.5 s"
    assert highest_sustained(report.decisions, "decided") is None  # a step that did not finish is not sustained


def _fencing(store: str, replicas: int, p50: float, apply_ms: float) -> FencingPart:
    return FencingPart(
        store=store,
        consume_replicas=replicas,
        plans=10,
        warmup=1,
        decided=Latency(10, p50, p50 + 1, p50 + 2),
        result=Latency(10, p50 + 2, p50 + 4, p50 + 5),
        waits=11 if replicas else 0,
        cpu_ms_per_plan={"store": 1.0, "brain": 2.0, "governor": 1.0, "apply": apply_ms},
    )


def test_fencing_rows_and_summary() -> None:
    """The HA store against the single one, and the fenced part against the mean of the unfenced HA parts."""
    report = BenchReport(plans=10, warmup=1)
    report.fencing = [
        _fencing("single", 0, 4.0, 5.0),
        _fencing("ha", 0, 5.0, 5.0),
        _fencing("ha", 1, 6.5, 5.5),
        _fencing("ha", 0, 6.0, 6.0),
    ]
    assert fencing_rows(report)[2] == ["ha", "1", "10", "11", "6.50", "7.50", "8.50", "10.50", "1.00", "2.00", "1.00",
                                       "5.50"]  # fmt: skip
    assert fencing_summary(report) == (
        "HA unfenced against the single store: decided p50 +1.50 ms, result p50 +1.50 ms, p99 +1.50 ms; "
        "Apply CPU +0.50 ms/plan, store CPU +0.00 ms/plan. The fence (WAIT for a replica) against HA unfenced: "
        "decided p50 +1.00 ms, result p50 +1.00 ms, p99 +1.00 ms; Apply CPU +0.00 ms/plan, store CPU +0.00 ms/plan. "
        "The unfenced HA parts are 1.00 ms apart in result p50 (drift)."
    )
    text = markdown(report)
    assert "| ha | 1 | 10 | 11 | 6.50 |" in text and fencing_summary(report) in text
    assert fencing_summary(BenchReport(fencing=report.fencing[:2])) is None  # no fenced part: nothing to compare


def test_the_limits_step_runs_the_design_before_the_stream_as_poll_only_with_a_rest_read_per_plan() -> None:
    """The "before" of the limits step is the chain with push off and every plan reading its position over REST;
    its rows say which chain they measured."""
    env = {"QT_LOG_LEVEL": "warning"}
    assert mode_env(env, PUSH) == env
    assert mode_env(env, POLL) == {**env, "QT_STREAM__PUSH": "false", "QT_APPLY__SNAPSHOT_MAX_AGE_S": "0"}
    with pytest.raises(ValueError, match="limits mode: push or poll, not 'both'"):
        mode_env(env, "both")
    report = BenchReport(plans=10, warmup=1, steps=["limits"])
    report.limits = [
        LimitsPart(rate_per_s=20, seconds=60, mode=PUSH, sent=1200, answered=1200, executed=960, rate_limited=240,
                   weight=970, weight_per_min=970, weight_per_executed=1.01),
        LimitsPart(rate_per_s=20, seconds=60, mode=POLL, sent=1200, answered=1200, executed=150, own_load=1050,
                   weight=2400, weight_per_min=2400, weight_per_executed=16),
    ]  # fmt: skip
    rows = limits_rows(report)
    assert [row[:2] for row in rows] == [["push (as shipped)", "20"], ["poll only (before the stream)", "20"]]
    assert [row[7] for row in rows] == ["0", "1050"]  # own-load refusals
    assert [row[10] for row in rows] == ["970", "2400"]  # weight per minute
