"""``qt bench``: the end of the run (the measuring is in ``quantum_trader.bench``, and each step's table is
printed by ``bench.render.show_step`` as the step ends, so a run that is killed still shows what it measured).

``print_bench`` prints what needs the whole run (the sustained rates, the cost table, the steps that did not
finish) and writes the files. A run with a step that did not finish exits 1.
"""

from __future__ import annotations

from pathlib import Path

import typer

from quantum_trader.bench.render import console, table
from quantum_trader.bench.report import BenchReport, cost_header, cost_rows, write

EXIT_INCOMPLETE = 1  # as cli.app's EXIT_FAILED: the report is written, but a step did not finish


def print_bench(r: BenchReport, out: Path | None) -> None:
    """The end of the run (the steps' tables were printed as they ended): exit 1 if a step did not finish."""
    if r.open_loop:
        console.print(f"open loop, highest sustained: [bold]{r.sustained_plans_per_s} plans/s[/bold]")
    if r.decisions:
        console.print(f"decisions, highest sustained: [bold]{r.sustained_decisions_per_s} plans/s[/bold] (two each)")
    if r.rss_mb:
        table("cost per process", cost_header(r), cost_rows(r))
    if out is not None:
        console.print("written: " + ", ".join(str(p) for p in write(r, out)))
    if unfinished := r.unfinished():
        console.print(f"[bold red]{len(unfinished)} step(s) did not finish:[/bold red]")
        for status in unfinished:
            console.print(f"  {status.line()}", highlight=False)
        raise typer.Exit(EXIT_INCOMPLETE)
