"""``qt propose`` and ``qt permit grant|deny``: put a close through the chain, and decide a waiting plan's
Governor permit by hand (manual mode)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any

import typer

from quantum_trader.cli.app import (
    EXIT_FAILED,
    EXIT_NO_RESULT,
    EXIT_USAGE,
    app,
    fail,
    operator_name,
    permit_app,
    settings_or_exit,
    with_store,
)


class Action(StrEnum):
    FULL_CLOSE = "FULL_CLOSE"
    PARTIAL_CLOSE = "PARTIAL_CLOSE"


def _decimal_option(value: str | None, name: str) -> Decimal | None:
    if value is None:
        return None
    try:
        number = Decimal(value)
    except InvalidOperation:
        fail(f"{name} must be a number, not {value!r}", EXIT_USAGE)
    if not number.is_finite() or number < 0:
        fail(f"{name} must be a finite number >= 0, not {value!r}", EXIT_USAGE)
    return number


@app.command("propose")
def propose_cmd(
    symbol: Annotated[str, typer.Argument(help="e.g. BTCUSDT")],
    action: Annotated[Action, typer.Option(help="FULL_CLOSE or PARTIAL_CLOSE")],
    qty: Annotated[str | None, typer.Option(help="quantity to close (PARTIAL_CLOSE)")] = None,
    pct: Annotated[str | None, typer.Option(help="percent of the position to close (PARTIAL_CLOSE)")] = None,
    wait: Annotated[bool, typer.Option(help="wait for the plan's result and print it")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the result with --wait")] = 15.0,
) -> None:
    """Publish a close proposal; with --wait print its result (exit 0 executed, 1 not executed, 3 none)."""
    from quantum_trader import ops

    settings = settings_or_exit()
    symbol = symbol.upper()
    qty_d, pct_d = _decimal_option(qty, "--qty"), _decimal_option(pct, "--pct")
    if action is Action.PARTIAL_CLOSE and (qty_d is None) == (pct_d is None):
        fail("PARTIAL_CLOSE needs exactly one of --qty or --pct", EXIT_USAGE)
    if action is Action.FULL_CLOSE and (qty_d is not None or pct_d is not None):
        fail("FULL_CLOSE closes the whole position; drop --qty/--pct", EXIT_USAGE)

    async def go(redis: Any) -> Any:
        submitted = await ops.propose(redis, symbol, action.value, qty=qty_d, close_pct=pct_d)
        print(f"proposal {submitted.proposal_id} → plan {submitted.plan_id}", flush=True)
        if not wait:
            return None
        return await ops.wait_result(redis, submitted.plan_id, timeout, submitted.result_cursor)

    result = with_store(settings, go)
    if not wait:
        return
    if result is None:
        fail(f"no result within {timeout:.0f} s (is Apply running?)", EXIT_NO_RESULT)
    from quantum_trader.cli.render import print_result

    print_result(result)
    raise typer.Exit(0 if result.executed else EXIT_FAILED)


@permit_app.command("grant")
def permit_grant_cmd(
    plan_id: Annotated[str, typer.Argument(help="the 16-hex plan id")],
    reason: Annotated[str, typer.Option(help="why (kept in the audit trail)")] = "",
) -> None:
    """Grant the Governor permit of a waiting plan (within its permit window)."""
    _manual(plan_id, True, reason)


@permit_app.command("deny")
def permit_deny_cmd(
    plan_id: Annotated[str, typer.Argument(help="the 16-hex plan id")],
    reason: Annotated[str, typer.Option(help="why (required; kept in the audit trail)")],
) -> None:
    """Deny the Governor permit of a waiting plan: Apply fails it at once with permit_denied."""
    _manual(plan_id, False, reason)


def _manual(plan_id: str, grant: bool, reason: str) -> None:
    from quantum_trader import ops

    if not (len(plan_id) == 16 and all(c in "0123456789abcdef" for c in plan_id)):
        fail(f"plan id must be 16 lowercase hex characters, not {plan_id!r}", EXIT_USAGE)
    if not grant and not reason.strip():
        fail("deny needs --reason", EXIT_USAGE)
    settings = settings_or_exit()
    done = with_store(
        settings,
        lambda r: ops.decide_manually(r, settings, plan_id, grant=grant, reason=reason, operator=operator_name()),
    )
    print(done)
