"""``qt break-glass``: close a position straight on the exchange when the chain fails closed (no store primary,
clocks out of bounds), with the operator's own exchange key, recorded in the local journal and, once a store
answers, in the operator audit (docs/runbook.md, "Break glass")."""

from __future__ import annotations

import asyncio
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated

import typer

from quantum_trader.cli.app import (
    EXIT_USAGE,
    app,
    fail,
    operator_journal,
    operator_name,
    settings_or_exit,
)
from quantum_trader.settings import Settings

break_glass_app = typer.Typer(
    help="Close a position directly on the exchange when the chain cannot (it bypasses both permits).",
    no_args_is_help=True,
)
app.add_typer(break_glass_app, name="break-glass")

BYPASS_FLAG = "--bypass-the-permit-chain"
STORE_WAIT_S = 3.0  # the store is asked once, briefly: the close must not wait on the thing that is broken


@break_glass_app.command("close")
def close_cmd(
    symbol: Annotated[str, typer.Argument(help="the symbol whose position to close, e.g. BTCUSDT")],
    key_file: Annotated[
        Path, typer.Option(envvar="QT_BREAK_GLASS_KEY_FILE", help="the operator's own API key (a 0600 file)")
    ],
    secret_file: Annotated[
        Path, typer.Option(envvar="QT_BREAK_GLASS_SECRET_FILE", help="the operator's own API secret (a 0600 file)")
    ],
    qty: Annotated[str | None, typer.Option(help="how much to close (default: the whole position)")] = None,
    bypass: Annotated[
        bool, typer.Option(BYPASS_FLAG, help="required: you know this sends an order no permit approved")
    ] = False,
) -> None:
    """One reduce-only MARKET order for ``qty`` of SYMBOL's position (default: all of it), sent directly to the
    configured exchange with the operator's own key. Refused without --bypass-the-permit-chain. The intent is
    written (fsynced) to this host's journal before the order, the outcome after; then both go to the store's
    operator audit if a store answers within 3 s, else later with `qt break-glass record`."""
    from quantum_trader import ops
    from quantum_trader.exchange import sim_url_for
    from quantum_trader.exchange.binance import make_exchange
    from quantum_trader.secrets import read_secret_file

    if not bypass:
        fail(f"refusing: this order bypasses both permits. Add {BYPASS_FLAG} if that is what you mean", EXIT_USAGE)
    try:
        amount = Decimal(qty) if qty is not None else None
    except InvalidOperation:
        fail(f"--qty: not a number: {qty!r}", EXIT_USAGE)
    if amount is not None and (not amount.is_finite() or amount <= 0):
        fail(f"--qty: a positive quantity, not {qty!r}", EXIT_USAGE)
    settings = settings_or_exit()
    symbol = symbol.upper()
    key, secret = read_secret_file(key_file), read_secret_file(secret_file)  # ConfigError: exit 2, names the file
    journal = operator_journal(settings)

    async def close() -> tuple[str, list[dict[str, str]]]:
        exchange = make_exchange(settings.exchange, key, secret, sim_url_for(settings))
        try:
            await exchange.sync_time()
            return await ops.break_glass_close(exchange, symbol, amount, operator_name(), journal)
        finally:
            await exchange.close()

    outcome, lines = asyncio.run(close())
    print(outcome)
    print(f"journal: {journal.path}")
    _record_now(settings, lines)


@break_glass_app.command("record")
def record_cmd() -> None:
    """Copy into the store's operator audit every break-glass line of this host's journal it does not have yet
    (the store did not answer when the close was made, or lost the lines since)."""
    from quantum_trader import ops
    from quantum_trader.cli.app import with_store

    settings = settings_or_exit()
    lines = ops.break_glass_lines(settings.journal_dir)
    added = with_store(settings, lambda r: ops.record_break_glass(r, lines))
    print(f"{added} break-glass line(s) added to the store's operator audit")


def _record_now(settings: Settings, lines: list[dict[str, str]]) -> None:
    """Record ``lines`` (this close's) and the journal's other break-glass lines in the store if one answers
    within STORE_WAIT_S; say so if not."""
    from redis.exceptions import RedisError

    from quantum_trader import ops
    from quantum_trader.bus.connection import StoreUnavailable, connect, resolve_redis_url

    async def record() -> int:
        redis = await asyncio.wait_for(connect(resolve_redis_url(settings)), STORE_WAIT_S)
        try:
            every = [*lines, *ops.break_glass_lines(settings.journal_dir)]
            return await asyncio.wait_for(ops.record_break_glass(redis, every), STORE_WAIT_S * 3)
        finally:
            await redis.aclose()

    try:
        added = asyncio.run(record())
    except (StoreUnavailable, RedisError, TimeoutError, OSError) as exc:
        print(f"no store answered ({exc}): run `qt break-glass record` once one does")
        return
    print(f"recorded in the store's operator audit ({added} line(s))")
