"""Requests a ``late_execution`` fault let through the gateway, for the matching engine to execute later
(listed by ``GET /_sim/late``)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from quantum_trader.exchange.sim.auth import window_end
from quantum_trader.exchange.sim.faults import Reply
from quantum_trader.exchange.sim.params import Json


@dataclass(slots=True)
class LateExecution:
    """A request a ``late_execution`` rule let through the gateway, for the matching engine to execute later."""

    method: str
    path: str
    params: Mapping[str, str]
    received_ms: int
    due_ms: int
    outcome: str = "pending"  # then "executed" (HTTP 200) or "refused" (any error, -5028 among them)
    reply: Reply | None = None
    executed_ms: int | None = None
    timer: asyncio.TimerHandle | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True  # checked under the engine lock when the timer fires, so a racing timer is void
        if self.timer is not None:
            self.timer.cancel()

    def finish(self, reply: Reply, now: int) -> None:
        self.outcome = "executed" if reply.status == 200 else "refused"
        self.reply, self.executed_ms = reply, now

    def to_json(self) -> Json:
        params = self.params
        return {
            "method": self.method,
            "path": self.path,
            "symbol": params.get("symbol"),
            "clientOrderId": params.get("newClientOrderId") or params.get("origClientOrderId"),
            "receivedAt": self.received_ms,
            "dueAt": self.due_ms,
            "windowEnd": window_end(params) if "timestamp" in params else None,
            "outcome": self.outcome,
            "executedAt": self.executed_ms,
            "httpStatus": self.reply.status if self.reply else None,
            "reply": self.reply.body if self.reply and not isinstance(self.reply.body, bytes) else None,
        }
