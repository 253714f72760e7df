"""cancel_and_wait: a task that loses cancels is cancelled again until it ends, within a bound."""

from __future__ import annotations

import asyncio
import gc
import itertools
import sys

import pytest

from quantum_trader.tasks import _in_wait_for, cancel_and_wait


async def test_a_task_that_loses_its_first_cancels_is_cancelled_until_it_ends() -> None:
    cancels: list[float] = []

    async def loses_three() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancels.append(asyncio.get_running_loop().time())
                if len(cancels) > 3:
                    raise

    task = asyncio.ensure_future(loses_three())
    await asyncio.sleep(0)  # it runs to its first await (a task cancelled before it starts just ends)
    assert await cancel_and_wait([task], timeout_s=5.0) == []
    assert task.cancelled() and len(cancels) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(cancels)]
    assert all(0.09 <= gap < 5.0 for gap in gaps), gaps  # re-cancelled every 0.1-0.2 s, not in a spin


async def test_a_task_deaf_to_every_cancel_is_returned_at_the_bound() -> None:
    release = asyncio.Event()
    cancels = 0

    async def deaf() -> None:
        nonlocal cancels
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                cancels += 1

    stuck = asyncio.ensure_future(deaf())
    ended = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    assert await cancel_and_wait([stuck, ended], timeout_s=0.5) == [stuck]
    took = asyncio.get_running_loop().time() - started
    assert ended.cancelled() and not stuck.done()
    assert 0.49 <= took < 5.0 and 2 <= cancels <= 5  # at 0, then every 0.1-0.2 s (fewer if a wait ran late)
    release.set()
    await asyncio.wait({stuck})


async def test_the_exceptions_of_ended_tasks_are_retrieved() -> None:
    """A task that fails as it is cancelled leaves no "exception was never retrieved" when it is collected."""
    reported: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:

        async def fails_on_cancel() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                raise ValueError("cleanup failed") from None

        task = asyncio.ensure_future(fails_on_cancel())
        await asyncio.sleep(0)
        assert await cancel_and_wait([task]) == []
        assert task.done() and not task.cancelled()
        del task
        gc.collect()
        assert reported == []
    finally:
        loop.set_exception_handler(None)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for loses no cancel from Python 3.12 on")
async def test_a_task_waiting_in_wait_for_is_known_however_deep_the_wait() -> None:
    """The one place a cancel is lost (Python 3.11): a task waiting in wait_for, found through the whole chain of
    coroutines it awaits; cancel_and_wait repeats its cancel one loop iteration later there."""

    async def sends() -> None:
        await asyncio.wait_for(asyncio.sleep(10), 20)

    async def command() -> None:
        await sends()

    in_send = asyncio.ensure_future(command())
    elsewhere = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    assert _in_wait_for(in_send) and not _in_wait_for(elsewhere)
    assert await cancel_and_wait([in_send, elsewhere]) == []
    assert not _in_wait_for(in_send)  # ended
