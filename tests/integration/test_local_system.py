"""LocalSystem waiting for a service to become ready on a store that is gone or has stopped answering: a
StartupError that names the service when the deadline passes, never a traceback and never a wait forever."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quantum_trader import system as system_module
from quantum_trader.settings import Settings
from quantum_trader.system import LocalSystem, StartupError, free_port


@pytest.fixture
def silent_store() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never answers: a hung store host."""
    server = socket.create_server(("127.0.0.1", 0), backlog=8)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.mark.parametrize("store", ["refused", "silent"])
def test_a_service_waited_for_on_a_store_that_is_away_fails_with_its_name(
    store: str, tmp_path: Path, silent_store: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(system_module, "START_TIMEOUT_S", 1.0)
    local = LocalSystem(Settings(state_dir=tmp_path, redis_url="", _env_prefix="QT_IGNORED_"))
    port = free_port() if store == "refused" else silent_store
    local.urls["admin"] = f"redis://127.0.0.1:{port}/0"
    local.processes["apply"] = subprocess.Popen(["sleep", "30"])  # alive, and never ready
    started = time.monotonic()
    try:
        with pytest.raises(StartupError) as raised:
            local._wait_ready("apply")
    finally:
        local.processes["apply"].kill()
        local.processes["apply"].wait()
    assert str(raised.value) == "apply did not become ready within 1 s"
    assert time.monotonic() - started < 30  # the silent store's read is cut at its 3 s socket timeout
