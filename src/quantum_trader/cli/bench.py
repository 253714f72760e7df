"""``qt bench``: the report as tables (the measuring is in ``quantum_trader.bench``).

``show_step`` prints each step's table as the step ends (``run_bench`` calls it), so a run that is killed still
shows what it measured; ``print_bench`` prints what needs the whole run (the sustained rates, the cost table,
the steps that did not finish) and writes the files. A run with a step that did not finish exits 1.
"""

from __future__ import annotations

from pathlib import Path

import typer

from quantum_trader.bench.report import (
    DECISION_HEADER,
    DURABILITY_HEADER,
    LOAD_HEADER,
    BenchReport,
    cost_header,
    cost_rows,
    decision_rows,
    durability_rows,
    durability_summary,
    latency_rows,
    load_rows,
    write,
)

EXIT_INCOMPLETE = 1  # as cli.main's EXIT_FAILED: the report is written, but a step did not finish


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    from quantum_trader.cli.render import console

    t = Table(title=title, title_justify="left")
    for n, name in enumerate(header):
        t.add_column(name, justify="left" if n == 0 else "right")
    for row in rows:
        t.add_row(*row)
    console.print(t)


def show_step(event: str, r: BenchReport) -> None:
    """One part of the run has ended (``bench.run.Show``): print its figures now."""
    from quantum_trader.cli.render import console

    if event == "status":
        console.print(f"[bold red]{r.step_status[-1].line()}[/bold red]", highlight=False)
    elif event == "idle" and r.cpu_idle_pct:
        cpu = ", ".join(f"{name} {pct}" for name, pct in r.cpu_idle_pct.items())
        console.print(f"idle CPU % over {r.idle_window_s} s: {cpu}")
    elif event == "sequential":
        _table("qt bench: sequential latency (ms)", ["measure", "samples", "p50", "p99", "max"], latency_rows(r))
        console.print(f"p50 ratio, seed design / chain: [bold]{r.p50_ratio_seed_over_chain}x[/bold]")
        console.print(f"exchange lookups per sequential plan (the store vouched for them): {r.truth_lookups_per_plan}")
    elif event == "durability" and r.durability:
        title = "durability: appendfsync (sequential chain per setting, in this order; ms, CPU ms per plan)"
        _table(title, DURABILITY_HEADER, durability_rows(r))
        if summary := durability_summary(r):
            console.print(summary)
    elif event == "open-loop" and r.open_loop:
        step = r.open_loop[-1]
        title = f"open loop through the chain at {step.target_per_s:g}/s, and the seed design (ms)"
        _table(title, LOAD_HEADER, load_rows(r, [step]))
    elif event == "decisions" and r.decisions:
        step = r.decisions[-1]
        _table(f"decisions at {step.target_per_s:g} plans/s, straight onto the plan stream (ms)", DECISION_HEADER,
               decision_rows(r, [step]))  # fmt: skip


def print_bench(r: BenchReport, out: Path | None) -> None:
    """The end of the run (the steps' tables were printed as they ended): exit 1 if a step did not finish."""
    from quantum_trader.cli.render import console

    if r.open_loop:
        console.print(f"open loop, highest sustained: [bold]{r.sustained_plans_per_s} plans/s[/bold]")
    if r.decisions:
        console.print(f"decisions, highest sustained: [bold]{r.sustained_decisions_per_s} plans/s[/bold] (two each)")
    if r.rss_mb:
        _table("cost per process", cost_header(r), cost_rows(r))
    if out is not None:
        console.print("written: " + ", ".join(str(p) for p in write(r, out)))
    if unfinished := r.unfinished():
        console.print(f"[bold red]{len(unfinished)} step(s) did not finish:[/bold red]")
        for status in unfinished:
            console.print(f"  {status.line()}", highlight=False)
        raise typer.Exit(EXIT_INCOMPLETE)
