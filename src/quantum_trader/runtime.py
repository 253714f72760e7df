"""The running local system, as ``qt up`` records it: where its store and simulator are.

Other ``qt`` commands (``qt propose`` in a second terminal) read this file to find the system when
``QT_REDIS_URL`` is not set.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from quantum_trader.settings import Settings

RUNTIME_FILE = "runtime.json"


@dataclass(frozen=True, slots=True)
class Runtime:
    redis_url: str
    sim_url: str
    pid: int
    started_at: float
    version: str
    web_url: str = ""


def runtime_path(settings: Settings) -> Path:
    return settings.state_dir / RUNTIME_FILE


def write_runtime(settings: Settings, runtime: Runtime) -> None:
    path = runtime_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(runtime), indent=2), encoding="utf-8")
    tmp.replace(path)


def read_runtime(settings: Settings) -> Runtime | None:
    """The recorded runtime, or None when there is none or its process is gone."""
    path = runtime_path(settings)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        runtime = Runtime(**data)
    except (OSError, ValueError, TypeError):
        return None
    if not _alive(runtime.pid):
        return None
    return runtime


def clear_runtime(settings: Settings, pid: int) -> None:
    current = read_runtime(settings)
    if current is None or current.pid == pid:
        runtime_path(settings).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
