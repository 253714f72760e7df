"""One reader of ``quantum:stream:permit.audit`` that wakes every plan Apply is waiting on.

Each waiting plan registers an Event before its plan is published; the reader sets it when the plan's wait can
end: a deny from either slot, or allows from both (so Apply reads the two permits once, not once per decision).
No per-plan polling: one blocking XREAD serves all waiting plans. The audit line only says when to look; what
Apply acts on is what it then reads and verifies in the permit keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from quantum_trader.bus import keys
from quantum_trader.bus.streams import dead_letter_once
from quantum_trader.domain import reasons
from quantum_trader.services.consumer import STORE_ERRORS, Backoff

MAX_AUDIT_VALUE_CHARS = 4096
SLOT_OF_ISSUER = {"governor": "governor", "operator": "governor", "p33": "p33"}


class PermitWaiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        log: Any,
        block_ms: int = 1000,
        count: int = 256,
        on_read: Callable[[str], None] | None = None,
    ) -> None:
        self._redis = redis
        self._on_read = on_read  # the newest entry of each batch read (the store watch's witness)
        self._log = log
        self._block_ms = block_ms
        self._count = count
        self._events: dict[str, asyncio.Event] = {}
        self._allowed: dict[str, set[str]] = {}  # per waiting plan: the slots with an allow seen
        self._last_id: str | None = None
        self.ready = asyncio.Event()

    def register(self, plan_id: str) -> asyncio.Event:
        event = self._events.get(plan_id)
        if event is None:
            event = self._events[plan_id] = asyncio.Event()
        return event

    def note_allowed(self, plan_id: str, slots: set[str]) -> None:
        """Slots Apply found allowed when it read the permits itself (a plan resumed after a restart registers
        after some decisions went by): one more allow then completes the pair and wakes the plan."""
        if plan_id in self._events:
            self._allowed.setdefault(plan_id, set()).update(slots)

    def release(self, plan_id: str) -> None:
        self._events.pop(plan_id, None)
        self._allowed.pop(plan_id, None)

    @property
    def waiting(self) -> int:
        return len(self._events)

    def restart(self) -> None:
        """The store is another instance: read from its stream's end again, and wake every waiting plan to
        read its permits itself (decisions may have gone by unseen)."""
        self._last_id = None
        for event in self._events.values():
            event.set()

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                if self._last_id is None:
                    # Start at the stream's current end: every plan registers before it is published, so
                    # every decision that matters comes after this point.
                    last = await self._redis.xrevrange(keys.AUDIT_STREAM, count=1)
                    self._last_id = last[0][0] if last else "0-0"
                    self.ready.set()
                reply = await self._redis.xread(
                    {keys.AUDIT_STREAM: self._last_id}, count=self._count, block=self._block_ms
                )
                backoff.reset()
            except STORE_ERRORS as exc:
                self._log.warning("audit reader: store unavailable", error=str(exc), retry_in_s=backoff.delay)
                await backoff.wait()
                continue
            except Exception:  # it must not die: every waiting plan would wait its whole window
                self._log.exception("audit reader: unexpected error; reading again", retry_in_s=backoff.delay)
                await backoff.wait()
                continue
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    defect = getattr(fields, "defect", "") or _oversized(fields)
                    if defect:
                        await self._dead_letter(entry_id, fields, defect)
                    else:
                        self._note(fields)
                if entries and self._on_read is not None:
                    self._on_read(entries[-1][0])

    async def _dead_letter(self, entry_id: str, fields: dict[str, str], defect: str) -> None:
        """An unreadable audit line wakes nobody (Apply reads the permits themselves at the window's end); it
        is dead-lettered once, whichever Apply instance sees it first."""
        error = f"{reasons.MALFORMED_ENTRY}: {defect}"
        try:
            await dead_letter_once(self._redis, keys.AUDIT_DLQ, keys.AUDIT_STREAM, entry_id, fields, error, "apply")
        except (RedisError, *STORE_ERRORS) as exc:  # an outage, or a dead-letter key a writer broke: skip it
            self._log.warning("audit reader: could not dead-letter an unreadable entry", error=str(exc))
            return
        self._log.warning("unreadable audit entry dead-lettered", entry_id=entry_id)

    def _note(self, fields: dict[str, str]) -> None:
        plan_id = fields.get("plan_id", "")
        event = self._events.get(plan_id)
        slot = SLOT_OF_ISSUER.get(fields.get("issuer", ""))
        if event is None or slot is None:
            return
        decision = fields.get("decision")
        if decision == "deny":
            event.set()
        elif decision == "allow":
            allowed = self._allowed.setdefault(plan_id, set())
            allowed.add(slot)
            if len(allowed) == 2:
                event.set()


def _oversized(fields: dict[str, str]) -> str:
    """Why an audit line is too big to be one (the longest value an issuer writes is a reason), or ""."""
    for name, value in fields.items():
        if len(value) > MAX_AUDIT_VALUE_CHARS:
            return f"value of {name!r} is {len(value)} characters long (at most {MAX_AUDIT_VALUE_CHARS})"
    return ""
