"""Stopping asyncio tasks when a cancel can be lost.

On Python 3.11, ``asyncio.wait_for`` returns the inner result when a cancel and that result arrive in the same
loop iteration, and the cancel is gone (CPython gh-86296). redis-py sends every command through ``wait_for``
(the write's drain), so a loop of store commands that only a cancel ends can take its next command instead
of stopping: measured here, about 1 cancel in 100 for a loop of 200 ms blocking XREADs, 3 in 4 for a tight
loop of GETs (tests/integration/test_lost_cancels.py). Awaited without a bound, it hangs its caller for good
(a `qt chaos` run once waited on its observer until it was killed). Every place
that stops such a task goes through ``cancel_and_wait``: cancel, wait a little, cancel again while the task
runs, and give up after a bound, naming what is still running rather than waiting on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

RECANCEL_S = 0.2  # a lost cancel is repeated this soon; a blocking store read is cut short by the next one
STOP_TIMEOUT_S = 10.0


async def cancel_and_wait(
    tasks: Collection[asyncio.Future[Any]], timeout_s: float = STOP_TIMEOUT_S
) -> list[asyncio.Future[Any]]:
    """Cancel ``tasks`` and wait at most ``timeout_s`` for them to end, cancelling again every ``RECANCEL_S``
    while they have not. The ones still running at the bound are returned (and left: waiting longer is what
    hangs); the ended ones' exceptions are retrieved (no "exception was never retrieved" at exit)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {t for t in tasks if not t.done()}
    try:
        while pending:
            for task in pending:
                task.cancel()
            left = deadline - loop.time()
            _, pending = await asyncio.wait(pending, timeout=max(0.0, min(RECANCEL_S, left)))
            if loop.time() >= deadline:
                break
    finally:  # also when this wait is cancelled in turn
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()
    return [t for t in tasks if not t.done()]
