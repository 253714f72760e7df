"""``qt apply``, ``qt governor``, ``qt brain``: run a service, and the Governor's kill switch and mode, and
P3.3's reconcile."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

import typer

from quantum_trader.cli.app import (
    app,
    brain_app,
    configure_logging,
    governor_app,
    operator_journal,
    operator_name,
    settings_or_exit,
    with_store,
)


class Switch(StrEnum):
    on = "on"
    off = "off"


class Mode(StrEnum):
    auto = "auto"
    manual = "manual"


def _run_service(kind: Any) -> None:
    settings = settings_or_exit()
    configure_logging(settings, kind)
    from quantum_trader.services import runner

    runner.run(kind, settings)


@app.command("apply")
def apply_cmd() -> None:
    """Run Apply (P3): proposals → plans → permits → one reduce-only order → result. Metrics on :8043."""
    _run_service("apply")


@governor_app.callback(invoke_without_command=True)
def governor_cmd(ctx: typer.Context) -> None:
    """Run the Governor (P3.2) when no subcommand is given. Metrics on :8044."""
    if ctx.invoked_subcommand is None:
        _run_service("governor")


@governor_app.command("kill-switch")
def kill_switch_cmd(state: Annotated[Switch, typer.Argument(help="on: deny every plan; off: back to policy")]) -> None:
    """Flip the kill switch for every running Governor instance (takes effect on the next plan)."""
    from quantum_trader import ops

    settings = settings_or_exit()
    with_store(
        settings, lambda r: ops.set_kill_switch(r, state is Switch.on, operator_name(), operator_journal(settings))
    )
    print(f"kill switch {state.value}")


@governor_app.command("mode")
def governor_mode_cmd(mode: Annotated[Mode, typer.Argument(help="auto: policy decides; manual: an operator")]) -> None:
    """Switch every running Governor between auto (policy) and manual (qt permit grant|deny)."""
    from quantum_trader import ops

    settings = settings_or_exit()
    with_store(settings, lambda r: ops.set_governor_mode(r, mode.value, operator_name(), operator_journal(settings)))
    print(f"governor mode {mode.value}")


@brain_app.callback(invoke_without_command=True)
def brain_cmd(ctx: typer.Context) -> None:
    """Run the P3.3 Position State Brain when no subcommand is given. Metrics on :8045 (p33_*)."""
    if ctx.invoked_subcommand is None:
        _run_service("brain")


@brain_app.command("reconcile")
def brain_reconcile_cmd() -> None:
    """Ask the running brain to set its ledger to the exchange's positions at its next poll (audited)."""
    from quantum_trader import ops

    settings = settings_or_exit()
    with_store(settings, lambda r: ops.request_reconcile(r, operator_name(), operator_journal(settings)))
    print("reconcile requested; the brain reconciles at its next snapshot poll")
