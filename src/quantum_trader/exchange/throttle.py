"""Staying inside Binance's limits, from what Binance itself reports.

Binance counts request weight per clock minute (REQUEST_WEIGHT 2400) and orders per 10 s (300) and per minute
(1200), and reports the running counts on every reply (``X-MBX-USED-WEIGHT-1M``, ``X-MBX-ORDER-COUNT-10S``,
``X-MBX-ORDER-COUNT-1M``). Past a limit it answers 429 with ``Retry-After``; a client that keeps going gets
418, an IP ban of minutes to days. So:

- the limits themselves are the ones exchangeInfo states for the account (Binance's defaults until loaded);
- before a request, wait until it fits under ``safety`` x the limits (the counts reset on the window edge);
- after a 429, send nothing until ``Retry-After`` has passed;
- after a 418, send nothing at all until the ban ends, and say so loudly: this is an alert, not a retry.

The guard is plain data and arithmetic over a millisecond clock (the exchange's, offset-corrected), so it is
tested without a network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

WEIGHT_HEADER = "x-mbx-used-weight-1m"
ORDERS_10S_HEADER = "x-mbx-order-count-10s"
ORDERS_1M_HEADER = "x-mbx-order-count-1m"
DEFAULT_BAN_S = 120.0  # a 418 without Retry-After: Binance's shortest ban is 2 minutes


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

    def wait_ms(self, now_ms: float, weight: int, orders: int = 0) -> float:
        """How long to wait before sending a request of ``weight`` (and ``orders`` new orders). Raises Banned."""
        if now_ms < self.banned_until_ms:
            raise Banned(self.banned_until_ms)
        if now_ms < self.blocked_until_ms:
            return self.blocked_until_ms - now_ms
        self._roll(now_ms)
        waits = [0.0]
        if self.used_weight + weight > self.weight_limit * self.safety:
            waits.append(60_000 - now_ms % 60_000)
        if orders and self.orders_10s + orders > self.orders_10s_limit * self.safety:
            waits.append(10_000 - now_ms % 10_000)
        if orders and self.orders_1m + orders > self.orders_1m_limit * self.safety:
            waits.append(60_000 - now_ms % 60_000)
        return max(waits)

    def sent(self, now_ms: float, weight: int, orders: int = 0) -> None:
        """Count a request as sent (the reply's headers correct the counts when they come)."""
        self._roll(now_ms)
        self.used_weight += weight
        self.orders_10s += orders
        self.orders_1m += orders

    def observe(self, now_ms: float, status: int, headers: Mapping[str, str]) -> None:
        """Take the exchange's own counts from a reply, and its 429 / 418 verdicts."""
        self._roll(now_ms)
        lower = {k.lower(): v for k, v in headers.items()}
        for header, attr in (
            (WEIGHT_HEADER, "used_weight"),
            (ORDERS_10S_HEADER, "orders_10s"),
            (ORDERS_1M_HEADER, "orders_1m"),
        ):
            value = _int(lower.get(header))
            if value is not None:
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
