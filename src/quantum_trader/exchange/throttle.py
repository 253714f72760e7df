"""Staying inside Binance's limits, from what Binance itself reports.

Binance counts request weight per clock minute (REQUEST_WEIGHT 2400) and orders per 10 s (300) and per minute
(1200), and reports the running counts on every reply (``X-MBX-USED-WEIGHT-1M``, ``X-MBX-ORDER-COUNT-10S``,
``X-MBX-ORDER-COUNT-1M``). Past a limit it answers 429 with ``Retry-After``; a client that keeps going gets
418, an IP ban of minutes to days. So:

- the limits themselves are the ones exchangeInfo states for the account (Binance's defaults until loaded);
- one budget for every request of the process, shared by what it is for: before a request, wait until it fits
  under its purpose's share of the limits (the counts reset on the window edge). Orders and the lookups that
  establish an order's outcome may fill ``safety`` (80 %); P3.3's polls stop at 70 %, and a plan's position
  read (only when no fresh snapshot serves it) at 50 %: whatever the load, the reads that can wait leave room
  for the orders and lookups, and the polls for the orders (``SHARES``);
- after a 429, send nothing until ``Retry-After`` has passed;
- after a 418, send nothing at all until the ban ends, and say so loudly: this is an alert, not a retry.

The guard is plain data and arithmetic over a millisecond clock (the exchange's, offset-corrected), so it is
tested without a network.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

WEIGHT_HEADER = "x-mbx-used-weight-1m"
ORDERS_10S_HEADER = "x-mbx-order-count-10s"
ORDERS_1M_HEADER = "x-mbx-order-count-1m"
DEFAULT_BAN_S = 120.0  # a 418 without Retry-After: Binance's shortest ban is 2 minutes
# A reply's counts are taken only for requests sent this far into a window: the exchange's clock and ours
# differ by up to the clock error Apply allows (250 ms by default), so earlier ones may count in the last window.
WINDOW_EDGE_MS = 500.0

Purpose = Literal["order", "lookup", "poll", "plan"]
# The share of each limit a request of that purpose may fill, as a fraction of ``safety``'s (1.0: all of it).
SHARES: Final[dict[Purpose, float]] = {"order": 1.0, "lookup": 1.0, "poll": 0.875, "plan": 0.625}


@dataclass(frozen=True, slots=True)
class Room:
    """Whether a request fits under the limits now: ``wait_ms`` until it does (0: now), and which limit binds
    (its name, the count used, the most this purpose may use, the limit, and when its window ends)."""

    wait_ms: float
    limit: str = ""
    used: int = 0
    allowed: int = 0
    cap: int = 0
    frees_at_ms: float = 0.0

    def describe(self, now_ms: float) -> str:
        """E.g. ``orders per minute: 960 used, 960 of 1200 allowed (80 %); room again at 20:01:00 UTC (in 12.3 s)``."""
        if not self.limit:
            return "room now"
        when = time.strftime("%H:%M:%S", time.gmtime(self.frees_at_ms / 1000))
        share = f", {self.allowed} of {self.cap} allowed ({self.allowed / self.cap:.0%})" if self.cap else ""
        return f"{self.limit}: {self.used} used{share}; room again at {when} UTC (in {self.wait_ms / 1000:.1f} s)"


class Banned(Exception):
    """The exchange banned this IP (HTTP 418). Nothing may be sent until ``until_ms``."""

    def __init__(self, until_ms: float) -> None:
        super().__init__(f"the exchange banned this IP (HTTP 418) until {until_ms / 1000:.0f} (epoch s)")
        self.until_ms = until_ms


@dataclass
class RateGuard:
    weight_limit: int = 2400
    orders_10s_limit: int = 300
    orders_1m_limit: int = 1200
    safety: float = 0.8  # headroom for other clients of the same key/IP and for counts we have not seen yet
    used_weight: int = 0
    weight_minute: int = -1
    orders_10s: int = 0
    ten_s: int = -1
    orders_1m: int = 0
    order_minute: int = -1
    blocked_until_ms: float = 0.0
    banned_until_ms: float = 0.0

    def adopt_limits(self, limits: Mapping[str, int]) -> None:
        """Take the limits the exchange states for this account (exchangeInfo ``rateLimits``)."""
        for name in ("weight_limit", "orders_10s_limit", "orders_1m_limit"):
            if name in limits:
                setattr(self, name, limits[name])

    def _roll(self, now_ms: float) -> None:
        minute, ten_s = int(now_ms // 60_000), int(now_ms // 10_000)
        if minute != self.weight_minute:
            self.weight_minute, self.used_weight = minute, 0
        if minute != self.order_minute:
            self.order_minute, self.orders_1m = minute, 0
        if ten_s != self.ten_s:
            self.ten_s, self.orders_10s = ten_s, 0

    def wait_ms(self, now_ms: float, weight: int, orders: int = 0, purpose: Purpose = "order") -> float:
        """How long to wait before sending a request of ``weight`` (and ``orders`` new orders). Raises Banned."""
        return self.room(now_ms, weight, orders, purpose).wait_ms

    def room(self, now_ms: float, weight: int, orders: int = 0, purpose: Purpose = "order") -> Room:
        """Whether a request of ``weight`` (and ``orders`` new orders) for ``purpose`` fits now, and if not, which
        limit binds and until when. Raises Banned."""
        if now_ms < self.banned_until_ms:
            raise Banned(self.banned_until_ms)
        if now_ms < self.blocked_until_ms:
            wait = self.blocked_until_ms - now_ms
            return Room(wait, "a 429 answer's Retry-After", frees_at_ms=self.blocked_until_ms)
        self._roll(now_ms)
        share = self.safety * SHARES[purpose]
        rooms = [Room(0.0)]
        minute_end = now_ms - now_ms % 60_000 + 60_000
        allowed = int(self.weight_limit * share)
        if self.used_weight + weight > allowed:
            rooms.append(
                Room(minute_end - now_ms, "request weight per minute", self.used_weight, allowed, self.weight_limit,
                     minute_end)
            )  # fmt: skip
        if orders:
            ten_s_end = now_ms - now_ms % 10_000 + 10_000
            allowed_10s, allowed_1m = int(self.orders_10s_limit * share), int(self.orders_1m_limit * share)
            if self.orders_10s + orders > allowed_10s:
                rooms.append(
                    Room(ten_s_end - now_ms, "orders per 10 s", self.orders_10s, allowed_10s, self.orders_10s_limit,
                         ten_s_end)
                )  # fmt: skip
            if self.orders_1m + orders > allowed_1m:
                rooms.append(
                    Room(minute_end - now_ms, "orders per minute", self.orders_1m, allowed_1m, self.orders_1m_limit,
                         minute_end)
                )  # fmt: skip
        return max(rooms, key=lambda room: room.wait_ms)

    def used(self, now_ms: float) -> dict[str, float]:
        """Each limit's share used in its current window (0..1, as last counted or reported): the headroom the
        alerts watch (refusals start at ``safety`` x SHARES). Read only (the metrics server's thread calls it):
        a count of a window that has passed is 0."""
        minute, ten_s = int(now_ms // 60_000), int(now_ms // 10_000)
        return {
            "weight_1m": self.used_weight / self.weight_limit if minute == self.weight_minute else 0.0,
            "orders_10s": self.orders_10s / self.orders_10s_limit if ten_s == self.ten_s else 0.0,
            "orders_1m": self.orders_1m / self.orders_1m_limit if minute == self.order_minute else 0.0,
        }

    def sent(self, now_ms: float, weight: int, orders: int = 0) -> None:
        """Count a request as sent (the reply's headers correct the counts when they come)."""
        self._roll(now_ms)
        self.used_weight += weight
        self.orders_10s += orders
        self.orders_1m += orders

    def observe(self, now_ms: float, status: int, headers: Mapping[str, str], sent_ms: float | None = None) -> None:
        """Take the exchange's own counts from a reply, and its 429 / 418 verdicts.

        A count is the window's in which the exchange received the request: it is taken only when the request
        was sent (``sent_ms``) at least ``WINDOW_EDGE_MS`` into the current window and the reply came in the same
        one. Otherwise it may be the previous window's: taken in the new one it would block the new window
        for nothing (found at the real limits: a reply of 245 orders crossing the 10 s edge stopped every
        order for the next 10 s). Our own count (``sent``) covers what is not taken."""
        self._roll(now_ms)
        sent = now_ms if sent_ms is None else sent_ms
        lower = {k.lower(): v for k, v in headers.items()}
        for header, attr, size in (
            (WEIGHT_HEADER, "used_weight", 60_000),
            (ORDERS_10S_HEADER, "orders_10s", 10_000),
            (ORDERS_1M_HEADER, "orders_1m", 60_000),
        ):
            value = _int(lower.get(header))
            same_window = (sent - WINDOW_EDGE_MS) // size == now_ms // size
            if value is not None and same_window:
                setattr(self, attr, max(getattr(self, attr), value))
        retry_after = _int(lower.get("retry-after"))
        if status == 418:
            self.banned_until_ms = now_ms + (retry_after if retry_after is not None else DEFAULT_BAN_S) * 1000
        elif status == 429:
            self.blocked_until_ms = now_ms + (retry_after if retry_after is not None else 1) * 1000


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
