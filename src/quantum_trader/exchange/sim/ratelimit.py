"""Binance's rate limits, one limiter for the whole simulator (every client is "one IP" and one account).

Request weight per fixed clock minute (Binance's ``X-MBX-USED-WEIGHT-1M`` resets on the minute) and order counts
per 10 s and per minute, reported on every answer (order counts on order placement). Over the weight limit:
HTTP 429 -1003 with ``Retry-After`` (seconds to the window's end); over an order limit: 429 -1015. More than
``ban_after_429s`` requests answered 429 in one window ban the client: HTTP 418 for ``ban_seconds``.
"""

from __future__ import annotations

import math

from quantum_trader.exchange.sim.config import SimConfig
from quantum_trader.exchange.sim.faults import Reply, ban_msg, weight_limit_msg
from quantum_trader.exchange.sim.params import Json


class RateLimiter:
    """Binance's REQUEST_WEIGHT (1 minute) and ORDERS (10 s, 1 minute) limits over fixed clock windows."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.minute = self.ten_s = -1
        self.weight = self.orders_1m = self.orders_10s = 0
        self.limited = 0  # requests answered 429 in this minute
        self.banned_until = 0
        self.weight_total = 0  # every request's weight since the start (or reset): what clients spend over time
        self.requests: dict[str, int] = {}  # requests received since the start (or reset), by "METHOD /path"

    def _roll(self, now: int) -> None:
        if now // 60_000 != self.minute:
            self.minute = now // 60_000
            self.weight = self.orders_1m = self.limited = 0
        if now // 10_000 != self.ten_s:
            self.ten_s = now // 10_000
            self.orders_10s = 0

    def admit(self, now: int, weight: int, orders: int, endpoint: str = "") -> Reply | None:
        """Count the request (``endpoint``: "METHOD /path", counted in ``requests``); an answer when it must be
        refused."""
        cfg = self.config
        self._roll(now)
        if endpoint:
            self.requests[endpoint] = self.requests.get(endpoint, 0) + 1
        if now < self.banned_until:
            return self._banned(now)
        self.weight += weight
        self.weight_total += weight
        if self.weight > cfg.weight_limit_1m:
            self.limited += 1
            if self.limited > cfg.ban_after_429s:
                self.banned_until = now + cfg.ban_seconds * 1000
                return self._banned(now)
            retry = _seconds_until((self.minute + 1) * 60_000, now)
            return Reply(429, {"code": -1003, "msg": weight_limit_msg(cfg.weight_limit_1m)}, {"Retry-After": retry})
        if orders:
            self.orders_10s += orders
            self.orders_1m += orders
            if self.orders_10s > cfg.orders_limit_10s:
                return self._too_many_orders(cfg.orders_limit_10s, "10 SECOND", (self.ten_s + 1) * 10_000, now)
            if self.orders_1m > cfg.orders_limit_1m:
                return self._too_many_orders(cfg.orders_limit_1m, "1 MINUTE", (self.minute + 1) * 60_000, now)
        return None

    def _banned(self, now: int) -> Reply:
        retry = _seconds_until(self.banned_until, now)
        return Reply(418, {"code": -1003, "msg": ban_msg(self.banned_until)}, {"Retry-After": retry})

    @staticmethod
    def _too_many_orders(limit: int, interval: str, window_end: int, now: int) -> Reply:
        msg = f"Too many new orders; current limit is {limit} orders per {interval}."
        return Reply(429, {"code": -1015, "msg": msg}, {"Retry-After": _seconds_until(window_end, now)})

    def headers(self, *, orders: bool) -> dict[str, str]:
        headers = {"X-MBX-USED-WEIGHT-1M": str(self.weight)}
        if orders:
            headers["X-MBX-ORDER-COUNT-10S"] = str(self.orders_10s)
            headers["X-MBX-ORDER-COUNT-1M"] = str(self.orders_1m)
        return headers

    def state(self) -> Json:
        return {
            "usedWeight1m": self.weight,
            "weightTotal": self.weight_total,
            "requests": dict(sorted(self.requests.items())),
            "orderCount10s": self.orders_10s,
            "orderCount1m": self.orders_1m,
            "bannedUntil": self.banned_until or None,
        }


def _seconds_until(until_ms: int, now: int) -> str:
    return str(max(1, math.ceil((until_ms - now) / 1000)))
