"""Many callers, one request in flight: each caller gets the answer of a request sent after it asked.

Callers asking while a request is on its way are collected and served together by the next one, for the union
of what they asked. So a shared answer is exactly as fresh as a request of the caller's own would have been,
and one caller at a time sees nothing change. Apply's position reads for planning and P3.3's snapshot polls
both go through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Generic, TypeVar

from quantum_trader.tasks import cancel_and_wait

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SharedReads(Generic[K, V]):
    def __init__(self, read: Callable[[list[K]], Awaitable[Mapping[K, V]]], name: str) -> None:
        self._read = read
        self._name = name
        self._asked: dict[K, None] = {}  # the keys of the next request, in the order asked
        self._waiting: list[asyncio.Future[Mapping[K, V]]] = []
        self._reader: asyncio.Task[None] | None = None

    def ask(self, keys: Iterable[K]) -> None:
        """Have a request for ``keys`` sent soon (after the one on its way, if any); nobody waits for it."""
        self._asked.update(dict.fromkeys(keys))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_while_asked(), name=self._name)

    async def get(self, keys: Iterable[K]) -> dict[K, V]:
        """The answer for ``keys`` of a request sent after this call (keys it did not answer are absent);
        raises what that request raised."""
        wanted = list(dict.fromkeys(keys))
        answer: asyncio.Future[Mapping[K, V]] = asyncio.get_running_loop().create_future()
        self._waiting.append(answer)
        self.ask(wanted)
        got = await answer
        return {key: got[key] for key in wanted if key in got}

    async def aclose(self) -> None:
        """Stop the request on its way, if any (its waiters get CancelledError)."""
        if self._reader is not None and not self._reader.done():
            await cancel_and_wait([self._reader])

    async def _read_while_asked(self) -> None:
        while self._asked:
            keys, self._asked = list(self._asked), {}
            waiting, self._waiting = self._waiting, []
            try:
                got = await self._read(keys)
            except asyncio.CancelledError:
                for answer in waiting:
                    answer.cancel()
                raise
            except Exception as exc:  # each waiter gets the failure, as from a request of its own
                for answer in waiting:
                    if not answer.done():
                        answer.set_exception(exc)
                continue
            for answer in waiting:
                if not answer.done():  # not cancelled meanwhile
                    answer.set_result(got)
