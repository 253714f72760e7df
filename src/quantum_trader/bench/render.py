"""The bench's figures as tables, each step's as the step ends (``run_bench`` calls ``show_step``), so a run
that is killed still shows what it measured. ``qt bench`` prints the end of the run (cli/bench.py)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from quantum_trader.bench.report import (
    DECISION_HEADER,
    DURABILITY_HEADER,
    FENCING_HEADER,
    LIMITS_HEADER,
    LOAD_HEADER,
    PUSH_HEADER,
    BenchReport,
    decision_rows,
    durability_rows,
    durability_summary,
    fencing_rows,
    fencing_summary,
    latency_rows,
    limits_notes,
    limits_rows,
    load_rows,
    push_rows,
)

# As cli/render.py's: a table piped to a file or CI log would otherwise be folded to 80 columns and unreadable.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title, title_justify="left")
    for n, name in enumerate(header):
        t.add_column(name, justify="left" if n == 0 else "right")
    for row in rows:
        t.add_row(*row)
    console.print(t)


def show_step(event: str, r: BenchReport) -> None:
    """One part of the run has ended (``bench.run.Show``): print its figures now."""
    if event == "status":
        console.print(f"[bold red]{r.step_status[-1].line()}[/bold red]", highlight=False)
    elif event == "idle" and r.cpu_idle_pct:
        cpu = ", ".join(f"{name} {pct}" for name, pct in r.cpu_idle_pct.items())
        console.print(f"idle CPU % over {r.idle_window_s} s: {cpu}")
    elif event == "sequential":
        table("qt bench: sequential latency (ms)", ["measure", "samples", "p50", "p99", "max"], latency_rows(r))
        console.print(f"p50 ratio, seed design / chain: [bold]{r.p50_ratio_seed_over_chain}x[/bold]")
        console.print(f"exchange lookups per sequential plan (the store vouched for them): {r.truth_lookups_per_plan}")
    elif event == "durability" and r.durability:
        title = "durability: appendfsync (sequential chain per setting, in this order; ms, CPU ms per plan)"
        table(title, DURABILITY_HEADER, durability_rows(r))
        if summary := durability_summary(r):
            console.print(summary)
    elif event == "fencing" and r.fencing:
        title = "fencing: the single store, then HA with consume_replicas 0, 1, 0, 1 (sequential; ms, CPU ms/plan)"
        table(title, FENCING_HEADER, fencing_rows(r))
        if summary := fencing_summary(r):
            console.print(summary)
    elif event == "push" and r.push:
        title = "push: outside change -> P3.3's snapshot, with the stream, poll only, with the stream again"
        table(title, PUSH_HEADER, push_rows(r))
    elif event == "limits" and r.limits:
        table("at Binance's real limits: open loop, five symbols (the whole chain's REST weight)", LIMITS_HEADER,
              limits_rows(r))  # fmt: skip
        for note in limits_notes(r):
            console.print(note)
    elif event == "open-loop" and r.open_loop:
        step = r.open_loop[-1]
        title = f"open loop through the chain at {step.target_per_s:g}/s, and the seed design (ms)"
        table(title, LOAD_HEADER, load_rows(r, [step]))
    elif event == "decisions" and r.decisions:
        step = r.decisions[-1]
        table(f"decisions at {step.target_per_s:g} plans/s, straight onto the plan stream (ms)", DECISION_HEADER,
              decision_rows(r, [step]))  # fmt: skip
