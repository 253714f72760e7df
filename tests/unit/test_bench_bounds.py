"""Every wait in ``qt bench`` is bounded (issue 12): a step over its bound is cancelled, reported with what it
was waiting for, and the next step still runs; a task that will not take its cancel cannot hang the run."""

from __future__ import annotations

import asyncio
import contextlib

from quantum_trader.bench.bounds import Waiting, bounded, run_loop, within
from quantum_trader.tasks import cancel_and_wait


async def test_a_step_over_its_bound_is_reported_with_what_it_waited_for_and_the_next_step_runs() -> None:
    answers: list[str] = []
    cleaned: list[str] = []

    async def stuck(waiting: Waiting) -> int:
        waiting.on(lambda: f"{len(answers):,} of 3,000 plans decided, waiting for results from group p33")
        answers.extend(["a", "b"])  # what has arrived when the bound passes: the text counts it then
        try:
            await asyncio.Event().wait()  # the answer that never comes
        finally:
            cleaned.append("closed")  # the step's own cleanup runs when it is cut short
        return 1

    result, status = await bounded("seed open loop 1000/s", 0.2, stuck)
    assert result is None and not status.ok and status.outcome == "timed out"
    assert status.line() == (
        "seed open loop 1000/s: timed out after 0.2 s, 2 of 3,000 plans decided, waiting for results from group p33"
    )
    assert cleaned == ["closed"]

    async def next_step(waiting: Waiting) -> int:
        waiting.on("nothing")
        return 42

    result, status = await bounded("open loop 200/s", 5.0, next_step)
    assert (result, status.outcome, status.ok) == (42, "done", True)


async def test_a_failing_step_is_reported_with_its_error() -> None:
    async def failing(waiting: Waiting) -> int:
        raise RuntimeError("bench plan p1 did not execute")

    result, status = await bounded("sequential chain", 5.0, failing)
    assert result is None and status.outcome == "failed"
    assert status.detail == "RuntimeError: bench plan p1 did not execute"
    assert status.line().startswith("sequential chain: failed after ")


async def test_a_step_that_loses_its_cancel_is_left_behind_and_named() -> None:
    release = asyncio.Event()
    cancels: list[int] = []

    async def deaf(waiting: Waiting) -> None:
        waiting.on("a read that never returns")
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:  # as a cancel lost in asyncio.wait_for on Python 3.11
                cancels.append(1)

    result, status = await bounded("stuck", 0.1, deaf, grace_s=0.1)
    assert result is None and status.outcome == "timed out" and cancels == [1]
    assert (
        status.detail
        == "a read that never returns (it did not stop within 0.1 s of being cancelled, and was left running)"
    )
    release.set()  # it ends at its next wake-up: nothing is left running after the test
    await asyncio.sleep(0.05)


async def test_settle_and_within_return_though_the_work_never_ends() -> None:
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # every cancel lost
                await asyncio.sleep(0.01)

    stuck = asyncio.ensure_future(deaf())
    await asyncio.sleep(0)  # it runs to its first await (a task cancelled before it starts just ends)
    assert await cancel_and_wait([stuck], 0.05) == [stuck]
    ended = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    assert await cancel_and_wait([ended], 1.0) == [] and ended.cancelled()
    try:
        await within(deaf(), 0.05, "closing the seed client")
    except TimeoutError as exc:
        assert str(exc) == "closing the seed client: no answer within 0.05 s"
    else:
        raise AssertionError("within() returned for work that never ends")
    release.set()
    await asyncio.wait({stuck})


def test_run_loop_returns_though_a_leftover_task_ignores_its_cancel() -> None:
    """``asyncio.run`` would wait for this task without a bound at its teardown."""
    cancels: list[int] = []

    async def deaf_forever() -> None:
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                cancels.append(1)

    leftover: list[asyncio.Task[None]] = []

    async def main() -> str:
        leftover.append(asyncio.get_running_loop().create_task(deaf_forever()))
        await asyncio.sleep(0.02)
        return "measured"

    assert run_loop(main(), grace_s=0.1) == "measured"
    assert cancels == [1] and not leftover[0].done()  # cancelled, lost it, and the loop was closed all the same
