"""Every wait in ``qt bench`` has a bound, and a step that overruns its bound is reported, not waited for.

``bounded`` runs one step as a task and waits for it at most its bound; a step that overruns is cancelled, given
a short grace to run its own cleanup (``finally`` blocks, context managers), and reported as timed out with
what it was waiting for at that moment (``Waiting``, which the step keeps current). ``within`` is the same
rule for the calls a step's cleanup waits for (``quantum_trader.tasks.cancel_and_wait`` for its tasks), and
``run_loop`` is ``asyncio.run`` whose teardown cannot hang.

None of this uses ``asyncio.wait_for`` around work that may not stop: on Python 3.11, ``wait_for`` waits without
a bound for the task it cancelled, and a task can lose a cancel (``wait_for`` itself returns the inner result
when the cancel and the result arrive in the same loop iteration; redis-py sends every command through it), so
a loop that only a cancel ends may never end. Here a task that does not stop within the grace is left behind
and named in the report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from quantum_trader.tasks import cancel_and_wait

T = TypeVar("T")

STOP_GRACE_S = 5.0  # a cancelled step's (or task's) time to run its cleanup before it is left behind


class Waiting:
    """What a running step is waiting for, kept current by the step: the text its timeout reports. A callable is
    evaluated when the text is wanted, so it can count what has arrived so far."""

    def __init__(self, what: str | Callable[[], str] = "its start") -> None:
        self._what = what

    def on(self, what: str | Callable[[], str]) -> None:
        self._what = what

    def sub(self, prefix: str) -> Waiting:
        """A Waiting for a part of this step: what it says is reported here after ``prefix``."""
        part = Waiting()
        self.on(lambda: f"{prefix}: {part.describe()}")
        return part

    def describe(self) -> str:
        what = self._what
        try:
            return what() if callable(what) else what
        except Exception as exc:  # the description of a stuck step must not fail the report of it
            return f"(its state could not be described: {exc!r})"


@dataclass
class StepStatus:
    """How one step ended: ``done``, ``timed out`` (after ``bound_s``; ``detail`` = what it was waiting for) or
    ``failed`` (``detail`` = the error)."""

    name: str
    bound_s: float
    took_s: float = 0.0
    outcome: str = "done"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "done"

    def line(self) -> str:
        if self.outcome == "timed out":
            return f"{self.name}: timed out after {self.bound_s:g} s, {self.detail}"
        if self.outcome == "failed":
            return f"{self.name}: failed after {self.took_s:.1f} s: {self.detail}"
        return f"{self.name}: done in {self.took_s:.1f} s"


async def within(work: Awaitable[T], seconds: float, what: str) -> T:
    """``work``, or ``TimeoutError(what)`` after ``seconds`` (the work is cancelled and left after a grace)."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if task not in done:
        await cancel_and_wait([task], min(seconds, STOP_GRACE_S))
        raise TimeoutError(f"{what}: no answer within {seconds:g} s")
    return task.result()


async def bounded(
    name: str, bound_s: float, step: Callable[[Waiting], Awaitable[T]], *, grace_s: float = STOP_GRACE_S
) -> tuple[T | None, StepStatus]:
    """Run ``step`` for at most ``bound_s``: its result and ``done``, or None and why it did not finish. A step
    that raises is ``failed`` with its error; one that overruns is cancelled (its cleanup gets ``grace_s``)."""
    waiting = Waiting()
    started = time.monotonic()
    task = asyncio.ensure_future(step(waiting))
    try:
        done, _ = await asyncio.wait({task}, timeout=bound_s)
    except GeneratorExit:  # closed with its loop gone: nothing can run any more
        raise
    except BaseException:  # interrupted (Ctrl-C, a stop signal, our own cancel): the step's cleanup runs too
        await cancel_and_wait([task], grace_s)
        raise
    took = time.monotonic() - started
    if task in done:
        if task.cancelled():
            return None, StepStatus(name, bound_s, took, "failed", "cancelled")
        if (error := task.exception()) is not None:
            return None, StepStatus(name, bound_s, took, "failed", f"{type(error).__name__}: {error}")
        return task.result(), StepStatus(name, bound_s, took)
    detail = waiting.describe()  # the state at the bound, before the cleanup changes it
    if await cancel_and_wait([task], grace_s):
        detail += f" (it did not stop within {grace_s:g} s of being cancelled, and was left running)"
    return None, StepStatus(name, bound_s, took, "timed out", detail)


def run_loop(main: Coroutine[Any, Any, T], *, grace_s: float = STOP_GRACE_S) -> T:
    """``asyncio.run(main)``, except that the tasks still running when ``main`` ends or is interrupted are
    cancelled and waited for at most ``grace_s`` (``asyncio.run`` waits for them without a bound, and gives up
    on their cleanup when one of them ends with the Ctrl-C that interrupted it)."""
    loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(main)
    except BaseException:
        try:
            _wind_down(loop, grace_s)  # an interrupt it meets is the one already on its way out
        finally:
            loop.close()
        raise
    try:
        interrupt = _wind_down(loop, grace_s)
    finally:
        loop.close()
    if interrupt is not None:
        raise interrupt  # one that arrived during the wind-down, after the tasks had their cleanup
    return result


def _wind_down(loop: asyncio.AbstractEventLoop, grace_s: float) -> BaseException | None:
    """Cancel the loop's tasks and run it until they end or ``grace_s`` passes; the first interrupt met."""
    deadline = time.monotonic() + grace_s
    interrupt: BaseException | None = None
    leftover = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in leftover:
        task.cancel()  # once: a second cancel would cut short the cleanup the first one started
    while (running := [t for t in leftover if not t.done()]) and (left := deadline - time.monotonic()) > 0:
        try:
            loop.run_until_complete(asyncio.wait(running, timeout=left))
        except (KeyboardInterrupt, SystemExit) as exc:
            # A task that Ctrl-C (or a stop signal) interrupted has run its cleanup and ends with the interrupt,
            # which leaves the loop: the other tasks still get theirs.
            interrupt = interrupt or exc
    for task in leftover:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" for what the report already has
    try:
        loop.run_until_complete(within(loop.shutdown_asyncgens(), max(0.1, deadline - time.monotonic()), "closing"))
    except TimeoutError:
        pass  # a generator that would not close: the loop is closed all the same
    except (KeyboardInterrupt, SystemExit) as exc:
        interrupt = interrupt or exc
    return interrupt
