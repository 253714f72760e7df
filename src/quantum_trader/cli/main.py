"""``qt``: run the services, operate the chain, and see it work.

Exit codes: 0 success; 1 the action failed (store or exchange unreachable, plan not executed); 2 misuse
(bad option, bad configuration); 3 no result within the wait.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar, cast

import typer
from typer.exceptions import TyperException

from quantum_trader import __version__, logs
from quantum_trader.bus.connection import StoreUnavailable, connect, resolve_redis_url
from quantum_trader.domain.reasons import REGISTRY, explain
from quantum_trader.exchange.base import ExchangeError
from quantum_trader.ops import OperatorError
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


class Action(StrEnum):
    FULL_CLOSE = "FULL_CLOSE"
    PARTIAL_CLOSE = "PARTIAL_CLOSE"


class Switch(StrEnum):
    on = "on"
    off = "off"


class Mode(StrEnum):
    auto = "auto"
    manual = "manual"


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


def operator_name() -> str:
    try:
        return os.environ.get("QT_OPERATOR") or getpass.getuser()
    except (KeyError, OSError):
        return "operator"


# --- services ---------------------------------------------------------------------------------------------


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
    with_store(settings, lambda r: ops.set_kill_switch(r, state is Switch.on, operator_name()))
    print(f"kill switch {state.value}")


@governor_app.command("mode")
def governor_mode_cmd(mode: Annotated[Mode, typer.Argument(help="auto: policy decides; manual: an operator")]) -> None:
    """Switch every running Governor between auto (policy) and manual (qt permit grant|deny)."""
    from quantum_trader import ops

    settings = settings_or_exit()
    with_store(settings, lambda r: ops.set_governor_mode(r, mode.value, operator_name()))
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
    with_store(settings, lambda r: ops.request_reconcile(r, operator_name()))
    print("reconcile requested; the brain reconciles at its next snapshot poll")


@app.command("web")
def web_cmd(
    port: Annotated[int | None, typer.Option(help="port on 127.0.0.1 (default QT_WEB__PORT, 8040)")] = None,
) -> None:
    """The live dashboard: plans with their permits and outcome, positions, ratios, latency, health, kill
    switch (flipping it needs the operator token)."""
    from quantum_trader.web.app import serve

    settings = settings_or_exit()
    serve(settings, settings.web.host, port or settings.web.port)


@app.command("sim-exchange")
def sim_exchange_cmd(
    port: Annotated[int | None, typer.Option(help="port on 127.0.0.1 (default QT_EXCHANGE__SIM_PORT, 8041)")] = None,
    admin: Annotated[bool, typer.Option(help="enable the /_sim admin API (token in the state dir)")] = False,
    weight_limit: Annotated[int, typer.Option(min=1, help="REQUEST_WEIGHT per minute (Binance: 2400)")] = 2400,
    orders_10s_limit: Annotated[int, typer.Option(min=1, help="ORDERS per 10 s (Binance: 300)")] = 300,
    orders_1m_limit: Annotated[int, typer.Option(min=1, help="ORDERS per minute (Binance: 1200)")] = 1200,
    bench_symbols: Annotated[
        int, typer.Option(min=0, max=999, help="add this many synthetic markets BENCH001USDT... (qt bench)")
    ] = 0,
) -> None:
    """Run the Binance-USD-M-compatible simulator (REST, HMAC-signed, Binance's error codes).

    The limits are stated in exchangeInfo ``rateLimits`` as Binance does, and clients take them from there."""
    from quantum_trader.exchange.sim.engine import DEFAULT_SYMBOLS
    from quantum_trader.exchange.sim.engine import bench_symbols as synthetic_markets
    from quantum_trader.exchange.sim.server import SimConfig, serve
    from quantum_trader.secrets import ensure_local_secrets, exchange_credentials, key_dir, read_secret_file

    settings = settings_or_exit()
    if settings.exchange.mode != "sim":
        fail("sim-exchange serves the simulator; unset QT_EXCHANGE__MODE or set it to sim", EXIT_USAGE)
    ensure_local_secrets(settings)
    key, secret = exchange_credentials(settings)
    token = read_secret_file(key_dir(settings) / "sim-admin.token") if admin else None
    port = port or settings.exchange.sim_port
    config = SimConfig(
        port=port,
        api_key=key,
        api_secret=secret,
        admin_token=token,
        weight_limit_1m=weight_limit,
        orders_limit_10s=orders_10s_limit,
        orders_limit_1m=orders_1m_limit,
        symbols=DEFAULT_SYMBOLS + synthetic_markets(bench_symbols),
    )
    print(f"simulator on http://127.0.0.1:{port} (admin API {'on' if admin else 'off'})", flush=True)
    try:
        serve(config)
    except OSError as exc:  # the port is taken, or not ours to bind
        fail(f"the simulator cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}")


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


# --- the whole system -------------------------------------------------------------------------------------


@app.command("up")
def up_cmd(
    open_positions: Annotated[
        bool, typer.Option(help="open the demo positions on a fresh simulator so closes have something to do")
    ] = True,
) -> None:
    """Start store, simulator and the three services; print where everything is; Ctrl-C stops it all."""
    from quantum_trader.cli.scenarios import DEMO_POSITIONS
    from quantum_trader.runtime import read_runtime
    from quantum_trader.system import LocalSystem, Ports, StartupError

    settings = settings_or_exit()
    running = read_runtime(settings)
    if running is not None:
        fail(f"a system is already running (pid {running.pid}, store {running.redis_url}); stop it first")
    system = LocalSystem(settings, ports=Ports.from_settings(settings))

    def serve() -> str:
        """Until Ctrl-C, SIGTERM or SIGHUP (all a normal stop: exit 0), or a child exits; the failure, if any."""
        try:
            try:
                system.start_infra()
                if open_positions:
                    system.open_positions(DEMO_POSITIONS)
                system.start_services()
                system.start_web()
                print(_where(system), flush=True)
                while not (exited := [n for n, p in system.processes.items() if p.poll() is not None]):
                    time.sleep(0.5)
                code = system.processes[exited[0]].returncode
                print(f"qt: {exited[0]} exited with code {code}; stopping", file=sys.stderr)
            except KeyboardInterrupt:
                pass
            print("stopping…", flush=True)
        except (StartupError, StoreUnavailable, ConfigError) as exc:
            return str(exc)
        finally:
            system.stop()  # a second signal meanwhile waits for it (and then exits with 128 + that signal)
        return ""

    failure = until_stopped(serve)
    if failure:
        fail(failure)
    print("stopped")


def _where(system: Any) -> str:
    p = system.ports
    return "\n".join(
        [
            f"quantum-trader {__version__} is up",
            f"  store       {system.redis_url}",
            f"  simulator   {system.sim_url}",
            f"  apply       metrics http://127.0.0.1:{p.apply}/metrics",
            f"  governor    metrics http://127.0.0.1:{p.governor}/metrics",
            f"  p33 brain   metrics http://127.0.0.1:{p.brain}/metrics",
            f"  dashboard   {system.web_url or 'off (QT_WEB__PORT=0)'}"
            + (" (kill switch token: <state dir>/secrets/web-operator.token)" if system.web_url else ""),
            f"  state dir   {system.settings.state_dir}",
            "try (in another terminal):  qt propose BTCUSDT --action FULL_CLOSE --wait",
            "Ctrl-C stops everything.",
        ]
    )


@app.command("chaos")
def chaos_cmd(
    plans: Annotated[int, typer.Option(min=1, help="how many plans to send")] = 1000,
    rate: Annotated[float, typer.Option(min=0.5, help="plans per second")] = 20.0,
    seed: Annotated[int, typer.Option(help="seed of the random kills")] = 1,
    store_loss: Annotated[
        bool, typer.Option("--store-loss", help="also make the store forget, three times (back from a snapshot)")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Run a private chain while killing its services (SIGKILL) and once its store; check the promises.

    With --store-loss the store also comes back three times with older data only (a failover to a replica
    behind, a host's power loss). Exit 1 if any plan was lost or doubled, any order duplicated or executed
    without two permits, any result disagrees with the exchange, or recovery after the store restart took more
    than 2 s. Loopback only; bounded by the plan count and rate.
    """
    from quantum_trader.cli.chaos import print_report, run_chaos

    settings = settings_or_exit()
    report, state_dir = until_stopped(lambda: run_chaos(settings, plans, rate, seed, store_loss))
    print_report(report, state_dir, json_out)
    raise typer.Exit(0 if report.ok else EXIT_FAILED)


@app.command("bench")
def bench_cmd(
    quick: Annotated[bool, typer.Option(help="a short run (under a minute): fewer plans, one rate of each")] = False,
    plans: Annotated[int | None, typer.Option(min=10, help="sequential plans through the chain")] = None,
    rates: Annotated[
        str | None, typer.Option(help="open-loop rates through the chain, plans/s, comma-separated")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="write bench.json, bench.md and latency-vs-rate.png into this directory")
    ] = None,
    event_loop: Annotated[str, typer.Option(help="the services' event loop: asyncio or uvloop")] = "asyncio",
    durability: Annotated[
        bool, typer.Option(help="the sequential chain under appendfsync everysec, always, everysec (the store's cost)")
    ] = True,
    only: Annotated[
        str | None,
        typer.Option(help="run only these steps, comma-separated: idle, sequential, durability, open-loop, decisions"),
    ] = None,
) -> None:
    """Latency, throughput and cost of the chain (separate processes, embedded store, simulator) against the
    seed's polling design in the same run, and what the store's appendfsync setting costs. Loopback only;
    bounded in time."""
    import dataclasses

    from quantum_trader.bench.report import STEPS
    from quantum_trader.bench.run import QUICK, Scenario, run_bench
    from quantum_trader.cli.bench import print_bench

    scenario = QUICK if quick else Scenario()
    try:
        chosen = tuple(float(r) for r in rates.split(",")) if rates else scenario.rates
    except ValueError:
        fail(f"--rates: not a comma-separated list of numbers: {rates!r}", EXIT_USAGE)
    if event_loop not in ("asyncio", "uvloop"):
        fail(f"--event-loop: asyncio or uvloop, not {event_loop!r}", EXIT_USAGE)
    steps = tuple(s.strip() for s in only.split(",") if s.strip()) if only else STEPS
    if set(steps) - set(STEPS):
        fail(f"--only: comma-separated steps out of {', '.join(STEPS)}, not {only!r}", EXIT_USAGE)
    steps = tuple(s for s in steps if durability or s != "durability")
    if not steps:
        fail("nothing to run: --only names no step that --no-durability leaves", EXIT_USAGE)
    scenario = dataclasses.replace(
        scenario, plans=plans or scenario.plans, rates=chosen, event_loop=event_loop, steps=steps
    )
    print_bench(until_stopped(lambda: run_bench(scenario)), out)


@app.command("demo")
def demo_cmd() -> None:
    """Start a private system, replay the seed's cases and more, print a table, stop."""
    from quantum_trader.cli.scenarios import run_demo

    settings = settings_or_exit()
    raise typer.Exit(until_stopped(lambda: run_demo(settings)))


@app.command("proof")
def proof_cmd(
    json_out: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
    private: Annotated[bool, typer.Option(help="always start a private system, even if one is running")] = False,
) -> None:
    """Run the demo's cases against the running system (or a private one); exit 1 if any misbehaves."""
    from quantum_trader.cli.scenarios import run_proof

    settings = settings_or_exit()
    raise typer.Exit(until_stopped(lambda: run_proof(settings, json_out=json_out, private=private)))


# --- operating it -----------------------------------------------------------------------------------------


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


@app.command("acl")
def acl_cmd(
    apply: Annotated[
        bool, typer.Option("--apply", help="create the users on the store at QT_REDIS_URL (an admin's URL)")
    ] = False,
    disable_default: Annotated[
        bool, typer.Option(help="with --apply: switch the password-less default user off")
    ] = False,
) -> None:
    """The per-service ACL users: print them as an ACL file (passwords as SHA-256; with an admin user and the
    default user limited to PING), or create them (--apply).

    Passwords come from <state dir>/secrets/acl-<role>.pass (0600; generated when missing). Give each service
    its URL: redis://qt-apply:<password>@host:port, and so on.
    """
    from quantum_trader.bus.acl import ROLES, acl_file, apply_acl
    from quantum_trader.bus.connection import acl_password_file
    from quantum_trader.secrets import ensure_local_secrets, read_secret_file

    settings = settings_or_exit()
    ensure_local_secrets(settings)
    passwords = {role: read_secret_file(acl_password_file(settings, role)) for role in ROLES}
    if not apply:
        # as a store's aclfile: with the admin user and the anonymous default user limited to PING (an aclfile
        # that leaves `default` out would leave it able to do everything)
        print(acl_file(passwords, with_admin=True), end="")
        return
    if not settings.redis_url:
        fail("--apply needs QT_REDIS_URL (with an account allowed to run ACL)", EXIT_USAGE)
    with_store(settings, lambda r: apply_acl(r, passwords, disable_default=disable_default))
    print(f"ACL users created: {', '.join(sorted(ROLES))} (passwords in {settings.state_dir / 'secrets'})")


@app.command("status")
def status_cmd(json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False) -> None:
    """Services (heartbeat, lag, pending), kill switch, Governor mode, unresolved orders, positions and drift."""
    import json

    from quantum_trader.cli.status import collect, render

    settings = settings_or_exit()
    status = with_store(settings, lambda r: collect(r, list(settings.symbols), settings.governor.mode))
    if json_out:
        print(json.dumps(status.as_dict(), indent=2))
    else:
        render(status)


def _since(text: str) -> float:
    from quantum_trader.cli.audit import parse_since

    try:
        return parse_since(text)
    except OperatorError as exc:
        fail(str(exc), EXIT_USAGE)


@app.command("audit")
def audit_cmd(
    plan_id: Annotated[str | None, typer.Argument(help="one plan's whole story; omit to list decisions")] = None,
    since: Annotated[str, typer.Option(help="listing period: 90s, 15m, 1h, 24h, 7d")] = "1h",
    symbol: Annotated[str | None, typer.Option(help="only this symbol")] = None,
    issuer: Annotated[str | None, typer.Option(help="governor, operator, p33 or apply")] = None,
    decision: Annotated[str | None, typer.Option(help="allow, deny, consumed, rejected or duplicate")] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many (the newest)")] = 200,
    dead_letters: Annotated[
        bool, typer.Option("--dead-letters", help="list the dead letters of the period instead (every stream)")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """The audit trail: one plan's story in time order (proposal, plan, each decision with issuer, reason and
    latency, consumption or rejection, order, result, ledger change), the permit decisions of a period, or
    (--dead-letters) the entries no service could use, with why (--json includes their exact bytes' size)."""
    from quantum_trader.cli import audit

    settings = settings_or_exit()
    if dead_letters:
        seconds = _since(since)
        rows = with_store(settings, lambda r: audit.fetch_dead_letters(r, seconds, limit))
        if json_out:
            print(audit.dead_letters_json(rows))
        else:
            audit.print_dead_letters(rows, since)
        return
    if plan_id:
        plan, events = with_store(settings, lambda r: audit.fetch_story(r, plan_id))
        if json_out:
            print(audit.story_json(plan, events))
        else:
            audit.print_story(plan, events)
        return
    seconds = _since(since)
    entries = with_store(
        settings,
        lambda r: audit.fetch_decisions(r, seconds, symbol=symbol, issuer=issuer, decision=decision, limit=limit),
    )
    if json_out:
        print(audit.decisions_json(entries))
    else:
        audit.print_decisions(entries, since)


@app.command("report")
def report_cmd(
    since: Annotated[str, typer.Option(help="period: 90s, 15m, 1h, 24h, 7d")] = "24h",
    json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print as a markdown table")] = False,
) -> None:
    """The 24-hour check: plans, executions, timeouts by missing issuer, denies by reason, deny/allow ratio,
    permit wait p50/p99, slowest plans, ledger drift events, service starts."""
    from quantum_trader.cli import audit

    settings = settings_or_exit()
    seconds = _since(since)
    report = with_store(settings, lambda r: audit.fetch_report(r, seconds))
    audit.print_report(report, "json" if json_out else "markdown" if markdown else "table")


@app.command("explain")
def explain_cmd(code: Annotated[str, typer.Argument(help="a reason or error code, e.g. qty_mismatch")]) -> None:
    """What a reason or error code means, its likely cause, and what to do."""
    entry = explain(code)
    if entry is None:
        known = ", ".join(sorted(REGISTRY))
        fail(f"unknown code {code!r}; known codes: {known}", EXIT_USAGE)
    print(f"{entry.code}  ({entry.kind}; issued by {', '.join(entry.issuers)})")
    print(f"  meaning: {entry.meaning}")
    print(f"  cause:   {entry.cause}")
    print(f"  action:  {entry.action}")


@app.command("version")
def version_cmd() -> None:
    """Print the version."""
    print(__version__)


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
    except (StoreUnavailable, ExchangeError, OperatorError) as exc:
        print(f"qt: {exc}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    except ConfigError as exc:
        print(f"qt: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        sys.exit(130)
