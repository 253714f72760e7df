"""``qt web``, ``qt sim-exchange``, ``qt up``, ``qt chaos``, ``qt bench``, ``qt demo``, ``qt proof``: start the
system or a part of it, or a private one to exercise, prove or measure."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from quantum_trader import __version__
from quantum_trader.bus.connection import StoreUnavailable
from quantum_trader.cli.app import EXIT_FAILED, EXIT_USAGE, app, fail, settings_or_exit, until_stopped
from quantum_trader.settings import ConfigError


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


@app.command("up")
def up_cmd(
    open_positions: Annotated[
        bool, typer.Option(help="open the demo positions on a fresh simulator so closes have something to do")
    ] = True,
    ha: Annotated[
        bool,
        typer.Option(
            "--ha", help="the store as a primary, two replicas and three Sentinels (loopback), reached via Sentinel"
        ),
    ] = False,
) -> None:
    """Start store, simulator and the three services; print where everything is; Ctrl-C stops it all."""
    from quantum_trader.cli.scenarios import DEMO_POSITIONS
    from quantum_trader.runtime import read_runtime
    from quantum_trader.system import LocalSystem, Ports, StartupError

    settings = settings_or_exit()
    running = read_runtime(settings)
    if running is not None:
        fail(f"a system is already running (pid {running.pid}, store {running.redis_url}); stop it first")
    if ha and settings.redis_url:
        fail("--ha starts a store of its own: unset QT_REDIS_URL", EXIT_USAGE)
    system = LocalSystem(settings, ports=Ports.from_settings(settings), ha=ha)

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
    failover: Annotated[
        bool,
        typer.Option(
            "--failover",
            help="the store a primary, two replicas and three Sentinels: kill and pause the primary, restart a "
            "Sentinel (instead of the service kills and the store restart)",
        ),
    ] = False,
    stream_faults: Annotated[
        bool,
        typer.Option(
            "--stream-faults",
            help="also fault the exchange's user-data stream every 1-3 s (drop, silence, delay, duplicate, "
            "reorder, garbage) and check P3.3's snapshots against the exchange",
        ),
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
    if failover and store_loss:
        fail("--failover and --store-loss are separate runs", EXIT_USAGE)
    report, state_dir = until_stopped(
        lambda: run_chaos(settings, plans, rate, seed, store_loss, failover, stream_faults)
    )
    print_report(report, state_dir, json_out)
    raise typer.Exit(0 if report.ok else EXIT_FAILED)


def _limits_parts(option: str, given: str) -> tuple[tuple[float, float], ...]:
    """``15:600,30:60`` -> ((15.0, 600.0), (30.0, 60.0)); ``none`` -> (); anything else ends with a usage error."""
    if given.strip().lower() in ("", "none"):
        return ()
    parts = []
    for item in given.split(","):
        rate, sep, seconds = item.strip().partition(":")
        try:
            part = (float(rate), float(seconds))
        except ValueError:
            part = (0.0, 0.0)
        if not sep or not (0 < part[0] <= 1000 and 5 <= part[1] <= 86400):
            fail(
                f"{option}: RATE:SECONDS parts, comma-separated (0 < rate <= 1000 proposals/s, 5 s to a day), "
                f"not {item.strip()!r} in {given!r}",
                EXIT_USAGE,
            )
        parts.append(part)
    return tuple(parts)


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
        typer.Option(
            help="run only these steps, comma-separated: idle, sequential, durability, fencing, push, limits, "
            "open-loop, decisions"
        ),
    ] = None,
    limits: Annotated[
        str | None,
        typer.Option(
            help="the limits step's parts on the chain as shipped: RATE:SECONDS, comma-separated (proposals/s at "
            "Binance's real limits; default 15:120,20:60,30:60, --quick 15:10,30:10)"
        ),
    ] = None,
    limits_poll: Annotated[
        str | None,
        typer.Option(
            help="the same on the design before the user-data stream (P3.3 polls, every plan reads its position "
            "over REST), on a system of its own: RATE:SECONDS, comma-separated, or none (default 20:60, --quick none)"
        ),
    ] = None,
) -> None:
    """Latency, throughput and cost of the chain (separate processes, embedded store, simulator) against the
    seed's polling design in the same run, what the store's appendfsync setting costs, and what a
    high-availability store and its fence (WAIT for a replica before each order) cost against the single one.
    Loopback only; bounded in time."""
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
    at_limits = _limits_parts("--limits", limits) if limits is not None else scenario.limits
    at_limits_poll = _limits_parts("--limits-poll", limits_poll) if limits_poll is not None else scenario.limits_poll
    scenario = dataclasses.replace(
        scenario,
        plans=plans or scenario.plans,
        rates=chosen,
        event_loop=event_loop,
        steps=steps,
        limits=at_limits,
        limits_poll=at_limits_poll,
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
