"""services/shared_reads.py: many callers, one request in flight, each answered by a request sent after it asked."""

from __future__ import annotations

import asyncio

import pytest

from quantum_trader.services.shared_reads import SharedReads


class Source:
    """Answers after ``delay`` with each key's request number; records when each request was sent, for what."""

    def __init__(self, delay: float = 0.02, fail_first: int = 0) -> None:
        self.sent: list[tuple[float, list[str]]] = []
        self.delay = delay
        self.fail_first = fail_first

    async def read(self, keys: list[str]) -> dict[str, int]:
        self.sent.append((asyncio.get_running_loop().time(), list(keys)))
        await asyncio.sleep(self.delay)
        if len(self.sent) <= self.fail_first:
            raise OSError(f"request {len(self.sent)} failed")
        return {key: len(self.sent) for key in keys if key != "absent"}


async def test_one_caller_gets_its_own_request() -> None:
    source = Source()
    reads = SharedReads(source.read, "test")
    assert await reads.get(["a"]) == {"a": 1}
    assert await reads.get(["b", "a"]) == {"b": 2, "a": 2}
    assert [keys for _, keys in source.sent] == [["a"], ["b", "a"]]


async def test_callers_asking_meanwhile_share_the_next_request_sent_after_they_asked() -> None:
    source = Source()
    reads = SharedReads(source.read, "test")
    first = asyncio.create_task(reads.get(["a"]))
    await asyncio.sleep(0.005)  # the first request is on its way
    asked_at = asyncio.get_running_loop().time()
    later = await asyncio.gather(reads.get(["b"]), reads.get(["a", "c"]))
    assert await first == {"a": 1}
    assert later == [{"b": 2}, {"a": 2, "c": 2}]  # not request 1, which was sent before they asked
    assert [keys for _, keys in source.sent] == [["a"], ["b", "a", "c"]]
    assert source.sent[1][0] >= asked_at


async def test_a_failure_reaches_exactly_the_callers_of_that_request() -> None:
    source = Source(fail_first=1)
    reads = SharedReads(source.read, "test")
    failing = asyncio.create_task(reads.get(["a"]))
    await asyncio.sleep(0.005)
    succeeding = asyncio.create_task(reads.get(["a"]))
    with pytest.raises(OSError, match="request 1 failed"):
        await failing
    assert await succeeding == {"a": 2}


async def test_keys_the_request_did_not_answer_are_absent() -> None:
    reads = SharedReads(Source().read, "test")
    assert await reads.get(["a", "absent"]) == {"a": 1}


async def test_ask_sends_a_request_nobody_waits_for_and_a_cancelled_caller_does_not_break_the_others() -> None:
    source = Source()
    reads = SharedReads(source.read, "test")
    reads.ask(["a"])
    await asyncio.sleep(0.005)
    cancelled = asyncio.create_task(reads.get(["b"]))
    kept = asyncio.create_task(reads.get(["c"]))
    await asyncio.sleep(0)
    cancelled.cancel()
    assert await kept == {"c": 2}
    assert [keys for _, keys in source.sent] == [["a"], ["b", "c"]]


async def test_aclose_stops_the_request_on_its_way_and_its_waiters_see_cancellation() -> None:
    reads = SharedReads(Source(delay=10).read, "test")
    waiter = asyncio.create_task(reads.get(["a"]))
    await asyncio.sleep(0.005)
    await reads.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiter
