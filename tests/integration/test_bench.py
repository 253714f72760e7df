"""`qt bench --quick` as a smoke test: it runs the private system, the open-loop steps, the decisions step, the
durability step and the seed baseline, and writes its report and plot. No timing is asserted (shared machines make
single absolute times noise); the structure and the counts are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from programs import program_env, qt

from quantum_trader.bench import seed

pytestmark = pytest.mark.integration


def _ordered(latency: dict[str, float]) -> bool:
    return 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]


# make test runs these steps; the fencing (an HA set) and push (P3.3 restarted twice) steps run in make test-long
SMOKE_STEPS = ["idle", "sequential", "durability", "limits", "open-loop", "decisions"]


def _bench(tmp_path: Path, *options: str) -> tuple[dict, str, Path]:
    out = tmp_path / "bench"
    done = qt("bench", "--quick", "--plans", "20", "--out", str(out), *options, env=program_env(tmp_path), timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), out


def _check_limits(report: dict, markdown: str) -> None:
    """The chain at Binance's real limits: under the order limit the proposals execute with about one unit of
    weight each; over it (a whole 10 s window at 30/s: 300 proposals, 240 orders allowed) the rest are refused
    rate_limited, naming the limit; never for the chain's own load. (A proposal whose symbol's previous close
    is still under way is refused duplicate_in_flight, as always: a loaded CI machine may have a few.)"""
    under, over = report["limits"]
    assert (under["rate_per_s"], under["sent"], over["rate_per_s"], over["sent"]) == (15, 150, 30, 300)
    for part in (under, over):
        assert part["answered"] == part["sent"] and part["own_load"] == 0, part["outcomes"]
        others = {k: n for k, n in part["outcomes"].items() if k not in ("executed", "rate_limited")}
        assert set(others) <= {"skipped: duplicate_in_flight"}, part["outcomes"]
        assert part["requests"].get("GET /fapi/v2/positionRisk", 0) <= 2, part["requests"]  # safety polls only
    assert under["rate_limited"] == 0 and under["executed"] >= 0.9 * under["sent"], under["outcomes"]
    assert 1.0 <= under["weight_per_executed"] <= 1.5, under  # the order itself; nothing read per plan
    assert over["rate_limited"] >= 40 and over["limit_named"].startswith("orders per 10 s: "), over
    assert over["executed"] <= 250, over  # 80 % of 300 in the window (the last few may land in the next)
    assert "At Binance's real limits" in markdown and "a rate_limited reason: orders per 10 s" in markdown


def _check_core(report: dict, markdown: str, out: Path) -> None:
    assert report["plans"] == 20 and report["warmup"] == 2
    for name in ("chain_decided", "chain_result", "chain_client", "chain_governor", "chain_p33"):
        assert report[name]["samples"] == 20, name
        assert _ordered(report[name]), name
    assert report["seed_decided"]["samples"] == 10
    assert report["p50_ratio_seed_over_chain"] > 0
    # a steady run: the store vouches for every plan, none is looked up on the exchange; a lookup is timed apart
    assert report["truth_lookups_per_plan"] == 0
    assert report["truth_lookup"]["samples"] == 20 and _ordered(report["truth_lookup"])

    (step,) = report["open_loop"]
    assert step["target_per_s"] == 200 and step["sent"] == 400
    assert step["completed"] == 400, step["outcomes"]  # every proposal got its one result
    assert sum(step["outcomes"].values()) == 400 and step["executed"] == step["outcomes"].get("executed", 0) > 0
    assert _ordered(step["result"]) and _ordered(step["end_to_end"])
    (seed_step,) = report["seed_open_loop"]
    assert seed_step["decided"]["samples"] + seed_step["unanswered"] == 400

    (decisions,) = report["decisions"]
    assert decisions["completed"] == decisions["sent"] == 1000  # both issuers decided every plan
    assert sum(n for what, n in decisions["outcomes"].items() if what.startswith("governor ")) == 1000
    assert sum(n for what, n in decisions["outcomes"].items() if what.startswith("p33 ")) == 1000
    assert _ordered(decisions["decided"])

    parts = report["durability"]  # the store with the append-only file on, appendfsync set per part
    assert [p["appendfsync"] for p in parts] == ["everysec", "always", "everysec"]
    for p in parts:
        assert p["plans"] == 20 and p["decided"]["samples"] == p["result"]["samples"] == 20, p
        assert _ordered(p["decided"]) and _ordered(p["result"])
        assert {"store", "brain", "governor", "apply"} <= set(p["cpu_ms_per_plan"]), p
        assert p["aof_last_write_status"] == "ok" and (p["aof_written_bytes"] is None or p["aof_written_bytes"] > 0)
    assert set(report["cpu_idle_pct"]) == set(report["rss_mb"]) == {"brain", "governor", "apply", "sim", "store"}
    assert "| chain: plan -> both permits consumed (Apply) | 20 |" in markdown
    assert "Open loop through the whole chain" in markdown and "Decisions (plans straight" in markdown
    assert "| always | 20 |" in markdown and "appendfsync always against everysec" in markdown
    assert (out / "latency-vs-rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(420)
def test_bench_quick_measures_the_chain_the_load_steps_the_real_limits_and_the_seed_design(tmp_path: Path) -> None:
    report, markdown, out = _bench(tmp_path, "--only", ",".join(SMOKE_STEPS))
    assert report["steps"] == SMOKE_STEPS
    _check_core(report, markdown, out)
    _check_limits(report, markdown)


@pytest.mark.long  # make test-long: every step, the HA set's fencing and P3.3's push/poll parts too
@pytest.mark.timeout(600)
def test_bench_quick_runs_every_step(tmp_path: Path) -> None:
    report, markdown, out = _bench(tmp_path)
    assert report["steps"] == ["idle", "sequential", "durability", "fencing", "push", "limits", "open-loop",
                               "decisions"]  # fmt: skip
    _check_core(report, markdown, out)
    _check_limits(report, markdown)
    push = report["push"]  # P3.3 with the user-data stream, poll only, with the stream again
    assert [(p["push"], p["stream_healthy"], p["changes"]) for p in push] == [(True, True, 20), (False, False, 3),
                                                                            (True, True, 20)]  # fmt: skip
    for p in push:
        assert p["shown"]["samples"] == p["changes"] and _ordered(p["shown"]), p
        assert p["weight_per_min"] >= 0 and p["idle_s"] == 5.0, p
    fencing = report["fencing"]  # the single store, then the HA set with consume_replicas 0, 1, 0, 1
    assert [(p["store"], p["consume_replicas"]) for p in fencing] == [
        ("single", 0), ("ha", 0), ("ha", 1), ("ha", 0), ("ha", 1)
    ]  # fmt: skip
    for p in fencing:
        assert p["plans"] == 20 and p["decided"]["samples"] == p["result"]["samples"] == 20, p
        assert p["waits"] == (22 if p["consume_replicas"] else 0), p  # the store ran a WAIT per fenced plan
        assert {"store", "brain", "governor", "apply"} <= set(p["cpu_ms_per_plan"]), p

    assert "| ha | 1 | 20 | 22 |" in markdown and "The fence (WAIT for a replica) against HA unfenced" in markdown
    assert "| poll only | - | 3 |" in markdown and "Positions pushed by the exchange" in markdown


async def _our_clients(rds: aioredis.Redis, db: int) -> set[str]:
    return {c["id"] for c in await rds.client_list() if int(c.get("db", 0)) == db}


async def test_the_seed_open_loop_answers_every_plan_and_leaves_nothing_behind(
    store_url: str, rds: aioredis.Redis
) -> None:
    """The seed design's open loop at 400/s (issue 12: it hung at 1,000/s): every plan decided or given up on,
    none failed, its issuers stopped, its connections closed and its keys gone when it returns."""
    db = int(rds.connection_pool.connection_kwargs.get("db", 0))
    await rds.ping()
    before = await _our_clients(rds, db)
    run = await seed.run_seed_open_loop(store_url, 400.0, 0.5)
    assert len(run.latencies) + run.unanswered == 200 and run.errors == 0, run.first_error
    assert len(run.latencies) > 0
    assert await _our_clients(rds, db) <= before  # no client of the design is left connected
    assert [key async for key in rds.scan_iter(match=f"{seed.PREFIX}:*")] == []
