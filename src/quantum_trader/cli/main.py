"""``qt``: run the services, operate the chain, and see it work. The commands, by module:

- cli/services.py  apply, governor (kill-switch, mode), brain (reconcile)
- cli/system.py    web, sim-exchange, up, chaos, bench, demo, proof
- cli/exchange.py  exchange check
- cli/permits.py   propose, permit (grant, deny)
- cli/inspect.py   acl, status, audit, report, explain, version
- cli/break_glass.py  break-glass (close, record): the hour the chain fails closed

cli/app.py holds the Typer app, the helpers every command uses and the exit codes: 0 success; 1 the action
failed (store or exchange unreachable, plan not executed); 2 misuse (bad option, bad configuration); 3 no
result within the wait.
"""

from __future__ import annotations

import sys

import typer
from typer.exceptions import TyperException

from quantum_trader.bus.connection import StoreUnavailable
from quantum_trader.cli.app import EXIT_FAILED, EXIT_USAGE, app
from quantum_trader.exchange.base import ExchangeError
from quantum_trader.ops import OperatorError
from quantum_trader.settings import ConfigError
from quantum_trader.views.trail import NotFound

# Each command registers itself when its module is imported, and `qt --help` lists them in that order.
# isort: off
from quantum_trader.cli import services  # noqa: F401
from quantum_trader.cli import system  # noqa: F401
from quantum_trader.cli import exchange  # noqa: F401
from quantum_trader.cli import permits  # noqa: F401
from quantum_trader.cli import inspect  # noqa: F401
from quantum_trader.cli import break_glass  # noqa: F401
# isort: on

__all__ = ["app", "run"]


def run() -> None:
    """Entry point: one-line errors for everything an operator can cause, exit codes as documented."""
    try:
        # With standalone_mode off, click returns a typer.Exit's code instead of exiting: pass it on.
        # (typer's own _main catches every typer.Exit, and turns a KeyboardInterrupt inside a command into one.)
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Abort:
        sys.exit(130)
    except TyperException as exc:  # typer's own (vendored click) usage errors: bad option, missing argument
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: qt {' '.join(ctx.command_path.split()[1:])} --help)".replace("  ", " ") if ctx else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        message = " ".join(message.split())  # click lays choices out on several lines: keep it to one
        print(f"qt: {message}{hint}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except (StoreUnavailable, ExchangeError, OperatorError, NotFound) as exc:
        print(f"qt: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except ConfigError as exc:
        print(f"qt: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        sys.exit(130)
