"""The embedded stores' ports: picked where no outgoing connection can take them, and replaced when someone
took one anyway.

CI once failed six tests at setup with "Port 33897 is already in use": the port had been picked by binding to
0 (the kernel's ephemeral range, which every outgoing connection also draws from) and was taken before the
node started. Each test here takes the picked port on purpose, with a real listening socket, and starts a real
server or Sentinel.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from quantum_trader.bus import embedded_ha
from quantum_trader.bus.acl import ROLES, acl_file
from quantum_trader.bus.embedded import EmbeddedStore, _ephemeral_low, free_port
from quantum_trader.bus.embedded_ha import EmbeddedHA

pytestmark = pytest.mark.integration


@contextmanager
def taken(port: int) -> Iterator[None]:
    """Someone else listening on ``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


def test_a_picked_port_is_free_and_below_the_ephemeral_range() -> None:
    low = _ephemeral_low()
    for _ in range(20):
        port = free_port()
        assert 20_000 <= port < low
        with taken(port):  # binds: nobody listens there
            pass


def test_a_store_whose_picked_port_was_taken_starts_on_another(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "store", persist=False)
    picked = store.port
    with taken(picked):
        url = store.start()
        try:
            assert store.port != picked
            with redis.Redis.from_url(url) as client:
                assert client.ping()
        finally:
            store.stop()


def test_a_port_the_caller_chose_is_kept_even_when_taken(tmp_path: Path) -> None:
    port = free_port()
    store = EmbeddedStore(tmp_path / "store", persist=False, port=port)
    with taken(port), pytest.raises(OSError, match="in use"):
        store.start()  # replicas and clients were told this port: another would be silently wrong


def test_a_sentinel_whose_picked_port_was_taken_starts_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first port handed to the Sentinel is already listened on when it starts: it gets another."""
    occupied = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    occupied.bind(("127.0.0.1", free_port()))
    occupied.listen()
    first = occupied.getsockname()[1]
    handed: list[int] = []

    def pick() -> int:
        port = first if not handed else free_port()
        handed.append(port)
        return port

    monkeypatch.setattr(embedded_ha, "free_port", pick)
    passwords = {role: secrets.token_hex(8) for role in ROLES}
    aclfile = tmp_path / "users.acl"
    aclfile.write_text(acl_file(passwords, with_admin=True))
    ha_set = EmbeddedHA(
        tmp_path / "ha", aclfile, passwords["replica"], passwords["sentinel"], replicas=0, sentinels=1, quorum=1
    )
    try:
        ha_set.start()
        assert handed[0] == first and len(handed) == 2
        assert ha_set.sentinel_ports == [handed[1]]
        assert ha_set.primary_port() == ha_set.nodes[0].port
    finally:
        ha_set.stop()
        occupied.close()


def test_a_local_systems_simulator_and_service_start_on_other_ports_when_theirs_were_taken() -> None:
    """The CI run after the stores' fix failed once more, the same way, on the simulator: ``LocalSystem.private``
    picks the simulator's and the services' metrics ports up front, and a store node picked afterwards (or any
    other listener) can take one before its process binds it."""
    from quantum_trader.system import LocalSystem

    system = LocalSystem.private("qt-ports-", env={})
    sim_port, brain_port = system.ports.sim, system.ports.brain
    try:
        with taken(sim_port), taken(brain_port):
            system.start_infra()
            system.start_service("brain")
            assert system.ports.sim != sim_port
            assert system.sim_url.endswith(f":{system.ports.sim}")
            assert system.ports.brain != brain_port
            assert system.log_dir is not None
            assert "address already in use" in (system.log_dir / "sim.log").read_text().lower()
            assert "address already in use" in (system.log_dir / "brain.log").read_text().lower()
    finally:
        system.stop()
