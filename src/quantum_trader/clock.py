"""One clock for the services: wall time (epoch s, what the store and the audit trail record) and a monotonic
clock (for waits and deadlines, which must not jump with NTP). Injected, so a test can see every time a
decision used; the exchange's clock is the exchange adapter's (``Exchange.now_ms``)."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall(self) -> float: ...

    def mono(self) -> float: ...


class SystemClock:
    def wall(self) -> float:
        return time.time()

    def mono(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()
