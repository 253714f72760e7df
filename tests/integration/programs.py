"""Running the programs as an operator does: `qt ...` in a subprocess, and `qt up` in the background with its
output collected; each test gets its own state directory and free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from quantum_trader.system import free_port


def qt(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quantum_trader", *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_qt(*args: str, env: dict[str, str], output: Path) -> subprocess.Popen[bytes]:
    """`qt ...` in the background, its output into ``output``, with SIGHUP at its default as in a terminal even
    when the test runner ignores it (under nohup; a child inherits an ignored signal)."""
    reset = "import runpy, signal; signal.signal(signal.SIGHUP, signal.SIG_DFL); runpy.run_module('quantum_trader')"
    with output.open("wb") as handle:
        return subprocess.Popen([sys.executable, "-c", reset, *args], env=env, stdout=handle, stderr=subprocess.STDOUT)


def program_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a test's programs: its own state directory and free ports, no QT_* of the caller."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    base.update(
        {
            "QT_STATE_DIR": str(tmp_path / "state"),
            "QT_EXCHANGE__SIM_PORT": str(free_port()),
            "QT_APPLY__METRICS_PORT": str(free_port()),
            "QT_GOVERNOR__METRICS_PORT": str(free_port()),
            "QT_BRAIN__METRICS_PORT": str(free_port()),
            "QT_WEB__PORT": str(free_port()),
            "QT_BRAIN__SNAPSHOT_INTERVAL_S": "1",
            "QT_GOVERNOR__COOLDOWN_S": "2",  # proof waits out cooldowns of symbols the test just traded
        }
    )
    return base


class Up:
    """`qt up` in the background, its output collected line by line (the pipe must be drained)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "quantum_trader", "up"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"`qt up` never printed {text!r}; output:\n" + "\n".join(self.lines[-60:]))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=60)
        self._reader.join(timeout=5)
        return code
