"""``qt exchange check``: is the configured exchange usable by the chain."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from quantum_trader.cli.app import EXIT_FAILED, exchange_app, settings_or_exit


@exchange_app.command("check")
def exchange_check_cmd(
    json_out: Annotated[bool, typer.Option("--json", help="print the checks as JSON")] = False,
) -> None:
    """Connectivity, clock skew, keys, position mode, the symbols' filters, rate limits; exit 1 if any fails."""
    import json

    from quantum_trader.exchange import open_exchange, sim_url_for
    from quantum_trader.exchange.check import run_checks

    settings = settings_or_exit()
    mode = settings.exchange.mode
    where = sim_url_for(settings) or "(no simulator running)" if mode == "sim" else f"Binance {mode}"

    async def go() -> Any:
        exchange = open_exchange(settings)
        try:
            return await run_checks(exchange, list(settings.symbols), where)
        finally:
            await exchange.close()

    checks = asyncio.run(go())
    if json_out:
        print(json.dumps([{"check": c.name, "ok": c.ok, "detail": c.detail} for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<16} {c.detail}")
    raise typer.Exit(0 if all(c.ok for c in checks) else EXIT_FAILED)
