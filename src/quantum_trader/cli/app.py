"""The ``qt`` Typer app and its command groups, and what every command uses: settings, the store, signals,
the operator's name, one-line errors and the exit codes.

Exit codes: 0 success; 1 the action failed (store or exchange unreachable, plan not executed); 2 misuse
(bad option, bad configuration); 3 no result within the wait.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar, cast

import typer

from quantum_trader import logs
from quantum_trader.bus.connection import connect, resolve_redis_url
from quantum_trader.journal import Journal, open_journal
from quantum_trader.settings import ConfigError, Settings, load_settings

app = typer.Typer(
    name="qt",
    help="Quantum Trader permit chain: Apply (P3), Governor (P3.2), P3.3 Position State Brain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)
governor_app = typer.Typer(help="Run the Governor (P3.2), or change its kill switch and mode.", no_args_is_help=False)
permit_app = typer.Typer(help="Grant or deny the Governor permit of a plan by hand (manual mode).")
brain_app = typer.Typer(help="Run the P3.3 Position State Brain, or ask it to reconcile.")
app.add_typer(governor_app, name="governor")
app.add_typer(permit_app, name="permit")
app.add_typer(brain_app, name="brain")
exchange_app = typer.Typer(help="Check the configured exchange.", no_args_is_help=True)
app.add_typer(exchange_app, name="exchange")

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_RESULT = 3


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    print(f"qt: {message}", file=sys.stderr)
    raise typer.Exit(code)


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def configure_logging(settings: Settings, service: str = "") -> None:
    logs.configure(json=settings.log_json, level=settings.log_level, service=service)


def with_store(settings: Settings, action: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``action(redis)`` against the running system's store; a clear one-line error when there is none."""

    async def main() -> tuple[bool, T | None]:
        redis = await connect(resolve_redis_url(settings))
        try:
            return await _interruptible(action(redis))
        finally:
            await redis.aclose()

    interrupted, result = asyncio.run(main())
    if interrupted:
        raise KeyboardInterrupt  # typer: exit 130
    return cast(T, result)


async def _interruptible(work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run ``work``; Ctrl-C cancels it, and cancels it again while it is not done: redis-py sends every command
    through ``asyncio.wait_for``, which on Python 3.11 can drop a cancellation that lands as a reply arrives
    (CPython gh-86296), and one lost Ctrl-C would leave the operator waiting out the whole timeout."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, interrupt)
    except (ValueError, RuntimeError):  # not the main thread: Ctrl-C stays Python's KeyboardInterrupt
        return False, await task
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.2)
            if interrupted and not task.done():
                task.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if interrupted and task.cancelled():
        return True, None
    return False, task.result()


def until_stopped(action: Callable[[], T]) -> T:
    """Run a command that starts a system: SIGTERM and SIGHUP stop it exactly as Ctrl-C does (every process it
    started is stopped) and it exits with 128 + the signal."""
    from quantum_trader.runtime import Interrupted, stop_on_signals

    try:
        with stop_on_signals():
            return action()
    except Interrupted as exc:
        print(f"qt: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None


def operator_journal(settings: Settings) -> Journal:
    """The local audit log of this operator's actions (journal.py: ``operator.operator.<host>.jsonl``)."""
    return open_journal(settings, "operator", sync_each=True)


def operator_name() -> str:
    try:
        return os.environ.get("QT_OPERATOR") or getpass.getuser()
    except (KeyError, OSError):
        return "operator"
