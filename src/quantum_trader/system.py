"""A whole chain on one machine: embedded store, simulator, and each service in its own process.

``qt up`` runs one in the foreground; ``qt demo``, ``qt proof`` and the end-to-end tests run private ones.
Services start brain first, then Governor, then Apply (the seed's order: permits are ready before plans flow).

Each child leads its own process group (a terminal's Ctrl-C or hangup reaches only the ``qt`` that started it,
which stops the children in order), and a stop signals the whole group. Spawning and stopping hold stop signals
back (runtime.deferred_signals), and once ``stop`` has begun nothing new is started, so a signal, or a second
one, cannot leave a process behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import httpx
import redis

from quantum_trader import __version__
from quantum_trader.bus import keys
from quantum_trader.bus.connection import redact, sync_client
from quantum_trader.bus.embedded import APPENDFSYNC, PORT_TRIES, EmbeddedStore, free_port
from quantum_trader.bus.embedded_ha import EmbeddedHA, HAStartupError
from quantum_trader.runtime import Runtime, clear_runtime, deferred_signals, read_runtime, write_runtime
from quantum_trader.secrets import ensure_local_secrets, key_dir, read_secret_file, write_secret_file
from quantum_trader.settings import ConfigError, Settings

SERVICES = ("brain", "governor", "apply")
START_TIMEOUT_S = 60.0


class StartupError(Exception):
    """A part of the local system did not start; the message says which and where its log is."""


@dataclass
class Ports:
    sim: int = 8041
    apply: int = 8043
    governor: int = 8044
    brain: int = 8045
    web: int = 0  # the dashboard; 0: not started (private systems)

    @classmethod
    def from_settings(cls, settings: Settings) -> Ports:
        return cls(
            settings.exchange.sim_port,
            settings.apply.metrics_port,
            settings.governor.metrics_port,
            settings.brain.metrics_port,
            settings.web.port,
        )

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port(), free_port())


class SimAdmin:
    """The simulator's admin API (``/_sim``), used to open positions and inject changes in demos and tests."""

    def __init__(self, url: str, token: str) -> None:
        self._client = httpx.Client(base_url=url, headers={"X-Sim-Admin-Token": token}, timeout=5.0)

    def set_position(self, symbol: str, amt: Decimal | str, entry_price: str | None = None) -> None:
        body: dict[str, str] = {"symbol": symbol, "amt": str(amt)}
        if entry_price:
            body["entry_price"] = entry_price
        self._client.post("/_sim/position", json=body).raise_for_status()

    def state(self) -> dict[str, Any]:
        reply = self._client.get("/_sim/state")
        reply.raise_for_status()
        data: dict[str, Any] = reply.json()
        return data

    def position(self, symbol: str) -> Decimal:
        """The exchange's signed position (the state lists non-zero positions only)."""
        for row in self.state()["positions"]:
            if row["symbol"] == symbol:
                return Decimal(str(row["positionAmt"]))
        return Decimal(0)

    def add_fault(self, rule: dict[str, Any]) -> None:
        """Script a fault (``/_sim/faults``: exchange/sim/faults.py), e.g. hold the next order a while."""
        self._client.post("/_sim/faults", json=rule).raise_for_status()

    def clear_faults(self) -> None:
        self._client.delete("/_sim/faults").raise_for_status()

    def orders(self, symbol: str | None = None) -> list[dict[str, Any]]:
        reply = self._client.get("/_sim/orders", params={"symbol": symbol} if symbol else None)
        reply.raise_for_status()
        data = reply.json()
        return list(data["orders"] if isinstance(data, dict) else data)

    def close(self) -> None:
        self._client.close()


@dataclass
class LocalSystem:
    settings: Settings
    ports: Ports = field(default_factory=Ports)
    log_dir: Path | None = None  # None: children log to this terminal
    env: dict[str, str] = field(default_factory=dict)
    persist_store: bool = True
    # the embedded store's appendfsync (bus/embedded.py): "always" makes a restart lose nothing, and so refuse
    # nothing in flight (docs/reliability.md)
    appendfsync: str = APPENDFSYNC
    ha: bool = False  # the store as a primary, two replicas and three Sentinels (bus/embedded_ha.py)
    ha_set: EmbeddedHA | None = None
    inherit_config: bool = True  # pass this process's QT_* settings to the children (qt up); not for private ones
    sim_args: list[str] = field(default_factory=list)  # extra `qt sim-exchange` options (e.g. raised limits)
    # the ports were picked here (free_port), not configured: a part that finds its port taken by someone else
    # between the pick and its bind starts again on another one (a configured port is an error to report)
    own_ports: bool = False
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    store: EmbeddedStore | None = None
    redis_url: str = ""  # as recorded in runtime.json: no credentials
    urls: dict[str, str] = field(default_factory=dict)  # per role ("apply", …, "operator", "admin"), with ACL
    sim_url: str = ""
    web_url: str = ""
    _logs: list[IO[bytes]] = field(default_factory=list)
    _log_starts: dict[str, int] = field(default_factory=dict)  # each part's log offset at its latest start
    # spawns (chaos restarts them from worker threads) and the start of stop() take turns: after stop() has
    # begun nothing new starts, so nothing can be spawned behind its back
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stopping: bool = False

    @classmethod
    def private(
        cls,
        prefix: str,
        *,
        env: Mapping[str, str],
        persist_store: bool = False,
        sim_args: Sequence[str] = (),
        appendfsync: str = APPENDFSYNC,
        ha: bool = False,
    ) -> LocalSystem:
        """A throwaway system (qt demo, chaos, bench) under a new temporary state dir, on free ports, on the
        defaults plus ``env``: whatever QT_* the calling shell has, the private system means the same."""
        state_dir = Path(tempfile.mkdtemp(prefix=prefix))
        settings = Settings(state_dir=state_dir, redis_url="", _env_prefix="QT_IGNORED_")
        return cls(
            settings,
            ports=Ports.free(),
            own_ports=True,
            log_dir=state_dir / "logs",
            env=dict(env),
            persist_store=persist_store,
            appendfsync=appendfsync,
            ha=ha,
            inherit_config=False,
            sim_args=list(sim_args),
        )

    def open_positions(self, positions: Mapping[str, str]) -> None:
        """Set positions on the simulator (its admin API), e.g. so that closes have something to do."""
        admin = self.admin()
        try:
            for symbol, amt in positions.items():
                admin.set_position(symbol, amt)
        finally:
            admin.close()

    # --- lifecycle --------------------------------------------------------------------------------------

    def start_infra(self) -> None:
        """Keys, store and simulator: everything the services need, and nothing that decides yet."""
        ensure_local_secrets(self.settings)
        if self.settings.redis_url:
            self.redis_url = self.settings.redis_url
            self.urls = dict.fromkeys((*SERVICES, "operator", "admin"), self.redis_url)
            _check_store_answers(self.redis_url)
        else:
            self.start_store()

        def start_sim() -> None:
            self.sim_url = f"http://127.0.0.1:{self.ports.sim}"
            self._spawn("sim", ["sim-exchange", "--port", str(self.ports.sim), "--admin", *self.sim_args])
            self._wait_http(f"{self.sim_url}/fapi/v1/ping", "sim")

        self._on_a_free_port("sim", start_sim)
        write_runtime(
            self.settings,
            Runtime(
                redis_url=self.redis_url,
                sim_url=self.sim_url,
                pid=os.getpid(),
                started_at=time.time(),
                version=__version__,
            ),
        )

    def use_infra(self, sim_url: str) -> None:
        """Instead of ``start_infra``: the services will use the store at ``settings.redis_url`` and the simulator
        at ``sim_url``, both already running (a test's own); only keys are made."""
        ensure_local_secrets(self.settings)
        self.redis_url = self.settings.redis_url
        self.urls = dict.fromkeys((*SERVICES, "operator", "admin"), self.redis_url)
        self.sim_url = sim_url

    def start_store(self, port: int | None = None) -> None:
        """Start (or restart, on the same port and data) the embedded store. It loads an ACL file with one user
        per service (and PING only for the anonymous default user), so its users survive restarts too."""
        from quantum_trader.bus.acl import ADMIN, ROLES, STORE_USERS, USERS, acl_file
        from quantum_trader.bus.connection import acl_password_file, record_epoch, with_credentials

        passwords = {role: read_secret_file(acl_password_file(self.settings, role)) for role in ROLES}
        aclfile = key_dir(self.settings) / "users.acl"
        write_secret_file(aclfile, acl_file(passwords, with_admin=True))
        with self._lock:
            if self._stopping:
                raise StartupError("the system is stopping")
            if self.ha:
                self.ha_set = EmbeddedHA(
                    self.settings.state_dir / "valkey-ha",
                    aclfile,
                    passwords["replica"],
                    passwords["sentinel"],
                    appendfsync=self.appendfsync,
                )
                # how long a cut-off primary may take writes: Apply waits that out after a failover; and a
                # consume is on a replica before its order is sent
                fenced = {
                    "QT_APPLY__FAILOVER_FENCE_S": str(self.ha_set.min_replicas_max_lag_s + 1),
                    "QT_APPLY__CONSUME_REPLICAS": "1",
                }
                for name, value in fenced.items():
                    if name not in self.env and not (self.inherit_config and name in os.environ):
                        self.env[name] = value
                try:
                    self.redis_url = self.ha_set.start()
                except HAStartupError as exc:
                    raise StartupError(f"the high-availability store did not start: {exc}") from None
            else:
                self.store = EmbeddedStore(
                    self.settings.state_dir / "valkey",
                    persist=self.persist_store,
                    port=port,
                    aclfile=aclfile,
                    appendfsync=self.appendfsync,
                )
                self.redis_url = self.store.start()
        users = {**USERS, **STORE_USERS, "admin": ADMIN}
        for role in ROLES:
            self.urls[role] = with_credentials(self.redis_url, users[role].name, acl_password_file(self.settings, role))
        asyncio.run(record_epoch(self.urls["admin"]))  # before anyone can send a proposal to the new instance

    def start_services(self, services: tuple[str, ...] = SERVICES, *, together: bool = False) -> None:
        """One after the other, each ready before the next starts; ``together``: all spawned at once, then each
        waited for (quicker, for a caller that sends nothing until all are ready)."""
        if not together:
            for service in services:
                self.start_service(service)
            return
        for service in services:
            self._spawn(service, [service])
        for service in services:
            try:
                self._wait_ready(service)
            except StartupError:
                if not self._port_was_taken(service):
                    raise
                self.processes.pop(service, None)
                self.ports = replace(self.ports, **{service: free_port()})
                self.start_service(service)  # on another port

    def start_web(self) -> None:
        """The dashboard (when ``ports.web`` is set), recorded in runtime.json for other terminals."""
        if not self.ports.web:
            return

        def start() -> None:
            self.web_url = f"http://127.0.0.1:{self.ports.web}"
            self._spawn("web", ["web", "--port", str(self.ports.web)])
            self._wait_http(f"{self.web_url}/healthz", "web")

        self._on_a_free_port("web", start)
        runtime = read_runtime(self.settings)
        if runtime is not None:
            write_runtime(self.settings, replace(runtime, web_url=self.web_url))

    def start_service(self, service: str) -> None:
        def start() -> None:
            self._spawn(service, [service])
            self._wait_ready(service)

        self._on_a_free_port(service, start)

    def _on_a_free_port(self, name: str, start: Callable[[], None]) -> None:
        """``start`` the part ``name`` (whose port is the field of that name in ``ports``); when the port was
        ours to pick and someone took it before the part could bind it, pick another and start again."""
        for attempt in range(PORT_TRIES):
            try:
                start()
                return
            except StartupError:
                if attempt == PORT_TRIES - 1 or not self._port_was_taken(name):
                    raise
                self.processes.pop(name, None)
                self.ports = replace(self.ports, **{name: free_port()})

    def _port_was_taken(self, name: str) -> bool:
        """This start of ``name`` failed because its port (one we picked) was in use: its log says so."""
        if not self.own_ports or self.log_dir is None:
            return False
        process = self.processes.get(name)
        if process is None or process.poll() is None:
            return False
        try:
            with open(self.log_dir / f"{name}.log", "rb") as handle:
                handle.seek(self._log_starts.get(name, 0))
                said = handle.read().decode("utf-8", "replace").lower()
        except OSError:
            return False
        return "address already in use" in said

    def stop_service(self, service: str, *, kill: bool = False) -> None:
        """SIGTERM (``kill``: SIGKILL) to the child's process group, SIGKILL after 10 s; returns once it is gone."""
        with deferred_signals():
            process = self.processes.pop(service, None)
            if process is not None:
                _stop_group(process, signal.SIGKILL if kill else signal.SIGTERM)

    def stop(self) -> None:
        """Stop all of it: web, services, simulator, store. A stop signal meanwhile waits until all are gone."""
        with deferred_signals():
            with self._lock:
                self._stopping = True
            last = [*reversed(SERVICES), "sim"]  # the dashboard and any other instances first
            try:
                for name in ["web", *(n for n in list(self.processes) if n not in ("web", *last)), *last]:
                    self.stop_service(name)
            finally:
                try:
                    if self.store is not None:
                        self.store.stop()
                    if self.ha_set is not None:
                        self.ha_set.stop()
                finally:
                    clear_runtime(self.settings, os.getpid())
                    for handle in self._logs:
                        handle.close()
                    self._logs.clear()

    def __enter__(self) -> LocalSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- helpers ----------------------------------------------------------------------------------------

    def admin(self) -> SimAdmin:
        return SimAdmin(self.sim_url, self.sim_admin_token())

    def sim_admin_token(self) -> str:
        """The simulator's admin token (generated by ``start_infra``; a secret: never logged)."""
        return read_secret_file(key_dir(self.settings) / "sim-admin.token")

    def child_env(self, service: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if self.inherit_config or not k.startswith("QT_")}
        env.update(
            {
                "QT_REDIS_URL": self.urls.get(service, self.urls.get("operator", self.redis_url)),
                "QT_STATE_DIR": str(self.settings.state_dir),
                "QT_SYMBOLS": ",".join(self.settings.symbols),
                "QT_EXCHANGE__MODE": "sim",
                "QT_EXCHANGE__SIM_URL": self.sim_url,
                "QT_CONSUMER_NAME": f"{service}-1",
                "QT_APPLY__METRICS_PORT": str(self.ports.apply),
                "QT_GOVERNOR__METRICS_PORT": str(self.ports.governor),
                "QT_BRAIN__METRICS_PORT": str(self.ports.brain),
                "QT_WEB__PORT": str(self.ports.web),
                "QT_LOG_JSON": "1" if self.settings.log_json else "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env)
        return env

    def _spawn(self, name: str, args: list[str]) -> None:
        out: Any = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the child
            self._log_starts[name] = handle.seek(0, os.SEEK_END)  # what this start writes comes after
            self._logs.append(handle)
            out = handle
        env = self.child_env(name)
        with self._lock, deferred_signals():  # recorded before anything can stop the system
            if self._stopping:
                raise StartupError(f"not starting {name}: the system is stopping")
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "quantum_trader", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=True,  # its own group: only `qt` gets the terminal's Ctrl-C, and stops it in order
            )

    def _check_alive(self, name: str) -> None:
        process = self.processes.get(name)
        if process is not None and process.poll() is not None:
            where = f"; see {self.log_dir / (name + '.log')}" if self.log_dir else ""
            raise StartupError(f"{name} exited with code {process.returncode} while starting{where}")
        if name not in self.processes and self._stopping:
            raise StartupError(f"{name} was stopped while starting: the system is stopping")

    def _wait_http(self, url: str, name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive(name)
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise StartupError(f"{name} did not answer at {url} within {START_TIMEOUT_S:.0f} s")

    def _wait_ready(self, service: str) -> None:
        """Ready = the child's heartbeat says so (the brain only after it has reconciled the ledger)."""
        process = self.processes[service]
        consumer = self.child_env(service)["QT_CONSUMER_NAME"]
        key = keys.health(service, consumer)
        client = sync_client(
            self.urls["admin"],
            decode_responses=True,
            encoding_errors="surrogateescape",
            socket_timeout=3,  # a store that stops answering is waited out to the deadline, not forever
            socket_connect_timeout=3,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                self._check_alive(service)
                try:
                    beat = client.hgetall(key)
                except (redis.RedisError, OSError):
                    beat = {}  # the store is away for a moment: the service waits for it too
                if beat.get("pid") == str(process.pid) and beat.get("ready") == "1":
                    return
                time.sleep(0.05)
        finally:
            client.close()
        raise StartupError(f"{service} did not become ready within {START_TIMEOUT_S:.0f} s")


def _check_store_answers(url: str) -> None:
    """The configured store answers a PING: otherwise one clear line now, not a traceback from a service."""
    try:
        client = sync_client(url, socket_connect_timeout=3, socket_timeout=3)
    except (ValueError, ConfigError) as exc:  # a URL redis-py cannot read
        raise StartupError(f"QT_REDIS_URL is not a store URL: {exc}") from None
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise StartupError(f"the store at {redact(url)} does not answer: {exc}") from None
    finally:
        client.close()


def _stop_group(process: subprocess.Popen[bytes], sig: int, grace_s: float = 10.0) -> None:
    """Signal the child's process group (it leads one), wait for the child, then SIGKILL what is left in it."""
    if process.poll() is None:
        _signal_group(process.pid, sig)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
    _signal_group(process.pid, signal.SIGKILL)  # anything it started: nothing outlives a stopped service


def _signal_group(pgid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pgid, sig)
