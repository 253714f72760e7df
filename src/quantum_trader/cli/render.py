"""Terminal output: one result, and the demo/proof table."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from quantum_trader.domain.models import Result

# A table piped to a file or CI log would otherwise be folded to 80 columns and unreadable.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)


def print_result(result: Result) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    outcome = "[green]executed[/green]" if result.executed else f"[red]not executed: {result.error}[/red]"
    rows: list[tuple[str, str]] = [
        ("plan", result.plan_id),
        ("symbol", f"{result.symbol} ({result.side})"),
        ("outcome", outcome),
    ]
    for label, value in (
        ("reason", result.reason),
        ("denied by", result.denied_by),
        ("missing", result.missing),
        ("order id", result.order_id),
        ("client order id", result.client_order_id),
    ):
        if value:
            rows.append((label, value))
    if result.executed:
        rows += [("filled qty", str(result.filled_qty)), ("avg price", str(result.avg_price))]
    if result.exchange_code:
        rows.append(("exchange code", str(result.exchange_code)))
    rows.append(("latency", f"{result.latency_ms:.1f} ms (plan → result)"))
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)


def print_cases(title: str, rows: Sequence[Any]) -> None:
    table = Table(title=title, title_justify="left", show_lines=False)
    for column, justify in (
        ("case", "left"),
        ("symbol", "left"),
        ("plan", "left"),
        ("decision", "left"),
        ("Governor", "left"),
        ("P3.3", "left"),
        ("outcome", "left"),
        ("decided ms", "right"),
        ("result ms", "right"),
        ("ok", "center"),
    ):
        table.add_column(column, justify=justify, no_wrap=column in ("plan", "symbol", "ok"))  # type: ignore[arg-type]
    for row in rows:
        table.add_row(
            row.title,
            row.symbol,
            row.plan_id or "—",
            row.decision,
            row.governor,
            row.p33,
            row.outcome,
            f"{row.decided_ms:.1f}" if row.decided_ms is not None else "—",
            f"{row.result_ms:.1f}" if row.result_ms is not None else "—",
            "[green]✓[/green]" if row.ok else "[red]✗[/red]",
        )
    console.print(table)
