"""Stopping asyncio tasks when a cancel can be lost.

On Python 3.11, ``asyncio.wait_for`` returns the inner result when a cancel and that result arrive in the same
loop iteration, and the cancel is gone (CPython gh-86296). redis-py sends every command through ``wait_for``
(the write's drain), so a loop of store commands that only a cancel ends can take its next command instead
of stopping: measured here, about 1 cancel in 100 for a loop of 200 ms blocking XREADs, 3 in 4 for a tight
loop of GETs (tests/integration/test_lost_cancels.py). Awaited without a bound, it hangs its caller for good
(a `qt chaos` run once waited on its observer until it was killed). Every place
that stops such a task goes through ``cancel_and_wait``: cancel, wait a little, cancel again while the task
runs, and give up after a bound, naming what is still running rather than waiting on.

A cancel is lost only while the task waits in ``wait_for`` (the send), and the loop is then at once in its
read, where the next cancel works: so a task found waiting there is cancelled again one loop iteration later
(at most ``FAST_REPEATS`` times in a row); any other is cancelled again after a random wait between half of
``RECANCEL_S`` and all of it (time for its cleanup; a fixed period could meet a loop at the same point of its
cycle each time). A fixed period of 0.2 s alone lost nearly every cancel on a loaded machine
(the store's reply is already there whenever the loop runs, so the loop is almost never waiting in its read):
here, with the CPU busy, up to 5.6 s of repeats 0.2 s apart, and a loaded CI machine once used up the whole
10 s bound.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Collection
from typing import Any

FAST_REPEATS = 100  # cancels one loop iteration apart while the task waits in wait_for (a few are enough)
RECANCEL_S = 0.2  # repeats at most this far apart; a blocking store read is cut short by the next one
STOP_TIMEOUT_S = 10.0


async def cancel_and_wait(
    tasks: Collection[asyncio.Future[Any]], timeout_s: float = STOP_TIMEOUT_S
) -> list[asyncio.Future[Any]]:
    """Cancel ``tasks`` and wait at most ``timeout_s`` for them to end, cancelling again while they have not (see
    the module's docstring for how soon). The ones still running at the bound are returned (and left: waiting
    longer is what hangs); the ended ones' exceptions are retrieved (no "exception was never retrieved" at
    exit)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {t for t in tasks if not t.done()}
    fast = 0
    try:
        while pending:
            for task in pending:
                task.cancel()
            if fast < FAST_REPEATS and any(_in_wait_for(task) for task in pending):
                fast, wait = fast + 1, 0.0  # the next loop iteration: by then it is past the send
            else:
                fast, wait = 0, random.uniform(RECANCEL_S / 2, RECANCEL_S)
            left = deadline - loop.time()
            _, pending = await asyncio.wait(pending, timeout=max(0.0, min(wait, left)))
            if loop.time() >= deadline:
                break
    finally:  # also when this wait is cancelled in turn
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()
    return [t for t in tasks if not t.done()]


def _in_wait_for(future: asyncio.Future[Any]) -> bool:
    """Whether ``future`` is a task waiting in ``asyncio.wait_for`` on a Python that can lose a cancel there
    (the innermost coroutine of the chain it awaits)."""
    if sys.version_info >= (3, 12) or not isinstance(future, asyncio.Task):
        return False
    awaited: Any = future.get_coro()
    innermost = None
    while hasattr(awaited, "cr_await"):  # a coroutine: follow what it awaits
        innermost, awaited = getattr(awaited, "cr_code", None), awaited.cr_await
    return innermost is asyncio.tasks.wait_for.__code__
