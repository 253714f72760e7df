"""``qt bench``: the report as tables (the measuring is in ``quantum_trader.bench``)."""

from __future__ import annotations

from pathlib import Path

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


def print_bench(r: BenchReport, out: Path | None) -> None:
    from rich.table import Table

    from quantum_trader.cli.render import console

    def table(title: str, header: list[str], rows: list[list[str]]) -> None:
        t = Table(title=title, title_justify="left")
        for n, name in enumerate(header):
            t.add_column(name, justify="left" if n == 0 else "right")
        for row in rows:
            t.add_row(*row)
        console.print(t)

    if "sequential" in r.steps:
        table("qt bench: sequential latency (ms)", ["measure", "samples", "p50", "p99", "max"], latency_rows(r))
        console.print(f"p50 ratio, seed design / chain: [bold]{r.p50_ratio_seed_over_chain}x[/bold]")
    console.print(f"exchange lookups per sequential plan (the store vouched for them): {r.truth_lookups_per_plan}")
    if r.durability:
        title = "durability: appendfsync (sequential chain per setting, in this order; ms, CPU ms per plan)"
        table(title, DURABILITY_HEADER, durability_rows(r))
        if summary := durability_summary(r):
            console.print(summary)
    if r.open_loop:
        table("open loop through the chain (ms)", LOAD_HEADER, load_rows(r))
        console.print(f"highest sustained: [bold]{r.sustained_plans_per_s} plans/s[/bold]")
    if r.decisions:
        table("decisions: plans straight onto the plan stream (ms)", DECISION_HEADER, decision_rows(r))
        console.print(f"highest sustained: [bold]{r.sustained_decisions_per_s} plans/s[/bold] (two decisions each)")
    if r.rss_mb:
        table("cost per process", cost_header(r), cost_rows(r))
    if out is not None:
        console.print("written: " + ", ".join(str(p) for p in write(r, out)))
