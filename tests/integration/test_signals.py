"""The commands that start a private system stop all of it on SIGTERM and SIGHUP, as on Ctrl-C.

Each runs as an operator would start it, is signalled once its system is up (Apply, the last service started,
serves its metrics port), and must exit with 128 + the signal having stopped every process it started: those
seen below it before the signal, and any started later (found by a mark in their environment, which every
child inherits, or by working in its directory). `qt chaos` gets a second SIGTERM while it stops. The four run
at the same time (most of each one's time is its system starting).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from programs import program_env, start_qt

pytestmark = pytest.mark.integration

MARK = "SIGNAL_TEST_MARK"  # no QT_ prefix: private systems pass no QT_* on to their children
BOUND_S = 240  # for all four to come up and stop: only a hang takes this long


def role(process: psutil.Process) -> str:
    """What a child of a private system runs: store, sim-exchange, brain, governor or apply."""
    try:
        cmdline = process.cmdline()
    except psutil.Error:
        return "gone"
    if cmdline and "valkey" in cmdline[0]:
        return "store"
    return cmdline[cmdline.index("quantum_trader") + 1] if "quantum_trader" in cmdline[:-1] else " ".join(cmdline)


def gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def listening(process: psutil.Process) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN for c in process.net_connections(kind="tcp"))
    except psutil.Error:
        return False


def marked(token: str, directory: Path) -> list[psutil.Process]:
    """Every live process whose environment carries ``token``, or that works in ``directory`` (a store: Valkey
    writes its title over its environment); others' processes cannot be read and are skipped."""
    found = []
    for process in psutil.process_iter(["environ", "cwd"]):
        ours = (process.info["environ"] or {}).get(MARK) == token
        ours = ours or (process.info["cwd"] or "").startswith(str(directory))
        if ours and process.pid != os.getpid() and not gone(process):
            found.append(process)
    return found


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    signals: tuple[signal.Signals, ...]  # a second one is sent once the stop has begun (something has gone)


CASES = [
    Case(("demo",), (signal.SIGTERM,)),
    Case(("proof", "--private"), (signal.SIGHUP,)),
    Case(("chaos", "--plans", "200", "--rate", "5"), (signal.SIGTERM, signal.SIGTERM)),
    Case(("bench", "--quick", "--only", "idle"), (signal.SIGTERM,)),
]


@dataclass
class Run:
    """One command: started, signalled once its system is up (Apply, started last, listens), then done."""

    case: Case
    process: subprocess.Popen[bytes]
    output: Path
    token: str
    directory: Path  # its private system's state dir is made under it (TMPDIR)
    below: list[psutil.Process] = field(default_factory=list)  # seen before the first signal
    roles: list[str] = field(default_factory=list)  # what they ran
    sent: int = 0

    def step(self) -> None:
        if self.process.poll() is not None:
            return
        if not self.sent:
            below = psutil.Process(self.process.pid).children(recursive=True)
            if any(role(p) == "apply" and listening(p) for p in below):
                self.below, self.roles = below, [role(p) for p in below]
                self.signal()
        elif self.sent < len(self.case.signals) and any(gone(p) for p in self.below):
            self.signal()

    def signal(self) -> None:
        self.process.send_signal(self.case.signals[self.sent])
        self.sent += 1

    def problems(self) -> list[str]:
        """What went wrong once it has exited, if anything; processes it left running are killed (noted)."""
        name = " ".join(self.case.args)
        text = self.output.read_text(errors="replace")
        code, first, last = self.process.returncode, self.case.signals[0], self.case.signals[-1]
        if not self.sent:
            return [f"{name}: exited with {code} before its system was up\n{text}"]
        found = []
        if not {"store", "sim-exchange", "brain", "governor", "apply"} <= set(self.roles):
            found.append(f"{name}: not the whole system below it before the signal: {sorted(self.roles)}")
        left = [f"{r} (pid {p.pid})" for p, r in zip(self.below, self.roles, strict=True) if not gone(p)]
        later = [p for p in marked(self.token, self.directory) if p not in self.below]
        left += [f"{role(p)} (pid {p.pid}, started later)" for p in later]
        if left:
            found.append(f"{name}: still running after {first.name}: {left}")
        for process in [*self.below, *later]:  # leave nothing behind, whatever the verdict
            with suppress(psutil.Error):
                process.kill()
        # a second signal lands during the stop (128 + it) or, at the latest, after everything has stopped
        expected = {128 + first} if len(self.case.signals) == 1 else {128 + last, -last}
        if code not in expected:
            found.append(f"{name}: exit code {code}, not {sorted(expected)}")
        if f"qt: stopped by {first.name}" not in text:
            found.append(f"{name}: no 'stopped by {first.name}' line")
        return [f"{problem}\n{text}" for problem in found]


def test_a_signal_stops_every_process_the_commands_started(tmp_path: Path) -> None:
    # The four run at the same time: most of each one's time is its system starting up.
    runs = []
    for number, case in enumerate(CASES):
        directory = tmp_path / str(number)
        directory.mkdir()
        token = uuid.uuid4().hex
        env = program_env(directory) | {MARK: token, "TMPDIR": str(directory), "PYTHONUNBUFFERED": "1"}
        output = directory / "output.txt"
        runs.append(Run(case, start_qt(*case.args, env=env, output=output), output, token, directory))
    deadline = time.monotonic() + BOUND_S
    try:
        while any(run.process.poll() is None for run in runs) and time.monotonic() < deadline:
            for run in runs:
                run.step()
            time.sleep(0.05)
    finally:
        hung = [" ".join(run.case.args) for run in runs if run.process.poll() is None]
        for run in runs:  # a failed test leaves nothing behind either
            if run.process.poll() is None:
                qt = psutil.Process(run.process.pid)
                for leftover in [qt, *qt.children(recursive=True)]:
                    with suppress(psutil.Error):
                        leftover.kill()
                run.process.wait()
    assert not hung, f"still running after {BOUND_S} s: {hung}"
    problems = [problem for run in runs for problem in run.problems()]
    assert not problems, "\n\n".join(problems)
