"""Error paths of pure functions (issue 11): each `except` runs for the reason it exists, and does what it says.

Their store-side counterparts (the same values written into a real store and read by the services and
commands) are in tests/integration/test_error_paths.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from quantum_trader import __version__
from quantum_trader.domain.report import build_report
from quantum_trader.runtime import RUNTIME_FILE, read_runtime
from quantum_trader.services.governor import _decimal, _float
from quantum_trader.settings import Settings
from quantum_trader.views.status import _dec, _num

T0 = 1_800_000_000.0


def result_line(n: int, latency_ms: str) -> tuple[str, dict[str, str]]:
    fields = {"plan_id": f"{n:016x}", "symbol": "BTCUSDT", "executed": "true", "latency_ms": latency_ms}
    return f"{int(T0 * 1000) + n}-0", fields


def test_the_report_leaves_an_unreadable_latency_out_of_the_percentiles() -> None:
    # a result line anyone could have written with XADD: counted as a result, its latency is unknown
    results = [result_line(1, "12.5"), result_line(2, "soon"), result_line(3, "37.5")]
    report = build_report(T0, T0 + 60, plans=[], results=results, audit=[], ledger=[], service_events=[])
    assert report.results == 3 and report.executed == 3
    # the percentiles of the two readable latencies, exactly as without the unreadable one
    readable = build_report(
        T0, T0 + 60, plans=[], results=[results[0], results[2]], audit=[], ledger=[], service_events=[]
    )
    assert (report.result_p50_ms, report.result_p99_ms) == (readable.result_p50_ms, readable.result_p99_ms)
    assert (report.result_p50_ms, report.result_p99_ms) == (12.5, 37.5)
    slowest = {row["plan_id"]: row["latency_ms"] for row in report.slowest}
    assert slowest == {f"{1:016x}": 12.5, f"{2:016x}": None, f"{3:016x}": 37.5}


def test_the_governor_reads_an_unreadable_price_as_no_price() -> None:
    # the snapshot hash's mark_price and ts, as a broken or hostile writer may leave them
    assert _decimal("n/a") is None and _decimal("0x10") is None
    assert _float("yesterday") is None and _float("1.5e") is None
    assert _decimal("65000.5") == Decimal("65000.5") and _float("1800000000.25") == 1800000000.25


def test_status_reads_an_unreadable_hash_value_as_unknown_or_the_default() -> None:
    assert _dec("lots") is None and _dec("0x10") is None
    assert _num("soon") == 0.0 and _num("many", default=7.0) == 7.0
    assert _dec("-0.500") == Decimal("-0.500") and _num("2.5") == 2.5


def test_a_runtime_file_of_a_process_that_is_gone_is_no_running_system(tmp_path: Path) -> None:
    """`qt up` killed with SIGKILL leaves runtime.json behind: its pid names no process any more."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: the pid names no process now (pids are not reused until the counter wraps)
    settings = Settings(state_dir=tmp_path, _env_prefix="QT_IGNORED_")
    record = {
        "redis_url": "redis://127.0.0.1:1/0",
        "sim_url": "http://127.0.0.1:1",
        "pid": gone.pid,
        "started_at": T0,
        "version": __version__,
    }
    (tmp_path / RUNTIME_FILE).write_text(json.dumps(record), encoding="utf-8")
    assert read_runtime(settings) is None
    # the same file naming a live process (this one) is a running system: the difference is the pid alone
    (tmp_path / RUNTIME_FILE).write_text(json.dumps(record | {"pid": os.getpid()}), encoding="utf-8")
    running = read_runtime(settings)
    assert running is not None and running.redis_url == "redis://127.0.0.1:1/0"


def test_a_chaos_result_with_an_unreadable_fill_does_not_agree() -> None:
    from decimal import Decimal

    from quantum_trader.cli.chaos import _agrees

    assert _agrees({"executed": "true", "filled_qty": "1.5"}, Decimal("1.5"))
    assert not _agrees({"executed": "true", "filled_qty": "lots"}, Decimal("1.5"))
    assert not _agrees({"executed": "true"}, Decimal("1.5"))


def test_a_store_command_run_off_the_main_thread_is_interruptible_by_python_alone() -> None:
    """Signal handlers can only be set in the main thread: elsewhere the work just runs (Ctrl-C stays Python's
    KeyboardInterrupt in the main thread)."""
    import asyncio
    import threading

    from quantum_trader.cli.app import _interruptible

    async def work() -> str:
        await asyncio.sleep(0)
        return "done"

    got: list[tuple[bool, str | None]] = []
    thread = threading.Thread(target=lambda: got.append(asyncio.run(_interruptible(work()))))
    thread.start()
    thread.join(10)
    assert got == [(False, "done")]


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period() -> None:
    import signal
    import subprocess
    import sys
    import time

    from quantum_trader.system import _stop_group

    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert child.stdout is not None and child.stdout.readline() == b"up\n"
    started = time.monotonic()
    _stop_group(child, signal.SIGTERM, grace_s=0.5)
    assert child.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10  # killed after the grace, not after its 60 s sleep
