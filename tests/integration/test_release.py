"""deploy/scripts/qt-release: installs switch releases atomically, restart brain -> governor -> apply waiting for
each one's /readyz, and roll back (on request, or by themselves when the new release does not become ready).

systemd cannot run here, so `systemctl` and `curl` are small scripts on PATH that record what they were asked
and answer /readyz as the test decides; the release layout, the links and the script itself are the real ones.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "scripts" / "qt-release"
ORDER = [
    "stop quantum-apply-layer",
    "restart quantum-position-state-brain",
    "restart quantum-governor",
    "restart quantum-apply-layer",
]


def executable(path: Path, text: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(0o755)


@pytest.fixture
def host(tmp_path: Path) -> dict[str, str]:
    """A release root with two releases (current: 0.1.1, previous: 0.1.0) and the stub tools."""
    root, bin_dir = tmp_path / "opt", tmp_path / "bin"
    for name in ("0.1.0-20261101T000000Z", "0.1.1-20261120T000000Z"):
        (root / "releases" / name).mkdir(parents=True)
    os.symlink("releases/0.1.1-20261120T000000Z", root / "current")
    os.symlink("releases/0.1.0-20261101T000000Z", root / "previous")
    bin_dir.mkdir()
    executable(bin_dir / "systemctl", f'echo "$*" >> {tmp_path}/systemctl.log\n')
    # /readyz answers unless the running release's name contains the text in $BROKEN (empty: all healthy)
    executable(
        bin_dir / "curl",
        'running=$(cat "$QT_RELEASE_ROOT/current/VERSION" 2>/dev/null)\n'
        'if [ -n "${BROKEN:-}" ] && [[ "$running" == *"$BROKEN"* ]]; then exit 22; fi\necho "ok: deciding"\n',
    )
    # a "python" whose venvs hold a pip that installs nothing and a qt that reports version 0.2.0
    executable(
        bin_dir / "fakepython",
        f'dir="$3"; echo "$dir" >> {tmp_path}/venvs.log; mkdir -p "$dir/bin"\n'
        'printf "#!/usr/bin/env bash\\nexit 0\\n" > "$dir/bin/pip"\n'
        'printf "#!/usr/bin/env bash\\necho 0.2.0\\n" > "$dir/bin/qt"\n'
        'chmod +x "$dir/bin/pip" "$dir/bin/qt"\n',
    )
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "QT_RELEASE_ROOT": str(root),
        "QT_READY_TIMEOUT": "2",
        "QT_ENV_FILE": str(tmp_path / "no-such.env"),
        "PYTHON": str(bin_dir / "fakepython"),
        "TMP": str(tmp_path),
    }


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def links(env: dict[str, str]) -> tuple[str, str]:
    root = Path(env["QT_RELEASE_ROOT"])
    return Path(os.readlink(root / "current")).name, Path(os.readlink(root / "previous")).name


def calls(env: dict[str, str]) -> list[str]:
    log = Path(env["TMP"]) / "systemctl.log"
    return log.read_text().splitlines() if log.exists() else []


def test_rollback_switches_to_the_previous_release_and_restarts_brain_first(host: dict[str, str]) -> None:
    done = run(host, "rollback")
    assert done.returncode == 0, done.stderr
    assert links(host) == ("0.1.0-20261101T000000Z", "0.1.1-20261120T000000Z")
    assert calls(host) == ORDER
    log = (Path(host["QT_RELEASE_ROOT"]) / "releases.log").read_text()
    assert "rollback 0.1.1-20261120T000000Z -> 0.1.0-20261101T000000Z" in log
    # and back again: a rollback of a rollback returns to where we were
    assert run(host, "rollback").returncode == 0
    assert links(host) == ("0.1.1-20261120T000000Z", "0.1.0-20261101T000000Z")


def version(env: dict[str, str], link: str = "current") -> str:
    return (Path(env["QT_RELEASE_ROOT"]) / link / "VERSION").read_text().strip()


def test_an_install_switches_and_keeps_the_old_release_as_previous(host: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "docs").mkdir(parents=True)
    done = run(host, "install", str(source))
    assert done.returncode == 0, done.stderr
    current, previous = links(host)
    assert version(host) == "0.2.0" and previous == "0.1.1-20261120T000000Z"
    assert (Path(host["QT_RELEASE_ROOT"]) / "current" / "docs").is_dir()
    assert calls(host) == ORDER
    # the virtualenv was created where it stays (its scripts carry their absolute path)
    built = (tmp_path / "venvs.log").read_text().split()
    assert built == [str(Path(host["QT_RELEASE_ROOT"]) / "releases" / current / "venv")]


def test_an_install_that_does_not_become_ready_rolls_itself_back(host: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    done = run({**host, "BROKEN": "0.2.0"}, "install", str(source))
    assert done.returncode == 1
    assert "did not become ready: rolling back to 0.1.1-20261120T000000Z" in done.stderr
    # back where we were: the broken release is marked FAILED and is not `previous` (a later rollback must
    # not bring it back)
    assert links(host) == ("0.1.1-20261120T000000Z", "0.1.0-20261101T000000Z")
    failed = [d for d in (Path(host["QT_RELEASE_ROOT"]) / "releases").iterdir() if (d / "FAILED").exists()]
    assert [(d / "VERSION").read_text().strip() for d in failed] == ["0.2.0"]
    # the broken release stopped at the brain; the rollback restarted all three in order
    assert calls(host) == ["stop quantum-apply-layer", "restart quantum-position-state-brain", *ORDER]


def test_a_first_install_can_leave_the_services_alone(host: dict[str, str], tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    done = run(host, "install", "--no-restart", str(source))
    assert done.returncode == 0, done.stderr
    assert version(host) == "0.2.0" and calls(host) == []


def test_rollback_without_a_previous_release_refuses(host: dict[str, str]) -> None:
    (Path(host["QT_RELEASE_ROOT"]) / "previous").unlink()
    done = run(host, "rollback")
    assert done.returncode == 1 and "no previous release" in done.stderr
    assert calls(host) == []


def test_rollback_refuses_a_release_marked_failed(host: dict[str, str]) -> None:
    (Path(host["QT_RELEASE_ROOT"]) / "previous" / "FAILED").touch()
    done = run(host, "rollback")
    assert done.returncode == 1 and "marked FAILED" in done.stderr
    assert calls(host) == []
