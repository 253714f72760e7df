"""The running local system, as ``qt up`` records it: where its store and simulator are; and how a process that
runs a system stops on a signal.

Other ``qt`` commands (``qt propose`` in a second terminal) read this file to find the system when
``QT_REDIS_URL`` is not set.

A command that starts a system (``qt up``, ``demo``, ``proof``, ``chaos``, ``bench``) runs inside
``stop_on_signals()``: SIGTERM and SIGHUP then take the path Ctrl-C takes (an ``Interrupted``, which is a
``KeyboardInterrupt``, raised in the main thread), so the same ``with system:`` blocks stop every process it
started. ``LocalSystem`` holds further signals back (``deferred_signals``) while it spawns or stops a process,
and on the way out anything still alive below this process is killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

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


# --- stopping on signals ----------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) under ``stop_on_signals``, raised where Ctrl-C raises."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended


@dataclass
class _SignalState:
    installed: bool = False
    deferring: int = 0  # depth of deferred_signals() in the main thread
    pending: int | None = None  # the first signal that arrived while deferring


_state = _SignalState()


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    if _state.deferring:
        _state.pending = _state.pending or signum
        return
    _state.pending = None
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the process as Ctrl-C does, within; main thread only.

    SIGHUP is left alone when it is ignored (``nohup qt bench &`` is meant to outlive the terminal); SIGINT is
    taken even then (a non-interactive shell starts background commands with it ignored). On the way out, with
    the signals ignored so that this cannot be cut short in turn, every process still alive below this one (a
    stop that did not finish) is killed."""
    if _state.installed:  # nested: the outer one does it all
        yield
        return
    wanted = [s for s in STOP_SIGNALS if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN)]
    previous: dict[signal.Signals, Any] = {}
    _state.installed = True
    try:
        for sig in wanted:  # a signal from the first one on is raised inside the try: everything is undone
            previous[sig] = signal.signal(sig, _on_signal)
        yield
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            left = kill_descendants()
            if left:
                print(f"qt: killed {len(left)} process(es) left running: {left}", file=sys.stderr)
        finally:
            _state.installed, _state.deferring, _state.pending = False, 0, None
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """A stop signal that arrives within waits until the end and is raised there (at the outermost): a process
    just spawned is recorded before anyone can stop the system, and a stop is not cut short by a second signal.
    Only the main thread (the one signal handlers run in) is concerned."""
    if not _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
        if not _state.deferring and _state.pending is not None:
            signum, _state.pending = _state.pending, None
            raise Interrupted(signum)


def kill_descendants() -> list[int]:
    """SIGKILL every process below this one that is still running; their pids (zombies not counted)."""
    import psutil  # type: ignore[import-untyped]  # psutil ships no type information

    below = psutil.Process().children(recursive=True)
    killed = []
    for process in below:
        with suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE:
                process.kill()
                killed.append(process.pid)
    psutil.wait_procs(below, timeout=5)  # reaps this process's own children among them
    return killed
