"""``qt status``: the chain at a glance, from the store alone: services and their backlog, switches, unresolved
orders, and each symbol's position as the exchange snapshot and the ledger see it."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.domain.text import printable
from quantum_trader.services.runner import GROUPS, group_backlog


@dataclass
class Status:
    services: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    kill_switch: bool = False
    governor_mode: str = ""
    unresolved_orders: int = 0
    symbols: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dec(value: str | None) -> Decimal | None:
    try:
        found = Decimal(value) if value else None
    except (InvalidOperation, ValueError):
        return None
    return found if found is not None and found.is_finite() else None


def _num(value: str | None, default: float = 0.0) -> float:
    """A number from a hash anyone may have written into: anything unreadable counts as ``default``."""
    try:
        found = float(value) if value else default
    except ValueError:
        return default
    return found if math.isfinite(found) else default


async def collect(redis: aioredis.Redis, symbols: list[str], default_mode: str) -> Status:
    now = time.time()
    status = Status()
    async for key in redis.scan_iter(match="quantum:health:*", count=200):
        beat = await redis.hgetall(key)
        _, _, service, consumer = key.split(":", 3)
        status.services.append(
            {
                "service": printable(service),
                "consumer": printable(consumer),
                "pid": printable(beat.get("pid", "")),
                "ready": beat.get("ready") == "1",
                "heartbeat_age_s": round(now - _num(beat.get("updated_at")), 1),
                "lag": int(_num(beat.get("lag"))),
                "pending": int(_num(beat.get("pending"))),
            }
        )
    status.services.sort(key=lambda s: (s["service"], s["consumer"]))
    for stream, group in sorted({pair for pairs in GROUPS.values() for pair in pairs}):
        if await redis.exists(stream):
            lag, pending = await group_backlog(redis, stream, group)
            status.groups.append({"stream": stream, "group": group, "lag": lag, "pending": pending})
    status.kill_switch = await redis.get(keys.KILL_SWITCH) == "1"
    status.governor_mode = printable(await redis.get(keys.GOVERNOR_MODE) or f"{default_mode} (default)")
    status.unresolved_orders = int(await redis.zcard(keys.APPLY_INTENTS))
    for symbol in symbols:
        snap = await redis.hgetall(keys.snapshot(symbol))
        ledger = await redis.hgetall(keys.ledger(symbol))
        exchange_amt, ledger_amt = _dec(snap.get("position_amt")), _dec(ledger.get("last_known_amt"))
        status.symbols.append(
            {
                "symbol": symbol,
                "exchange": str(exchange_amt) if exchange_amt is not None else "",
                "ledger": str(ledger_amt) if ledger_amt is not None else "",
                "drift": str(exchange_amt - ledger_amt) if exchange_amt is not None and ledger_amt is not None else "",
                "snapshot_age_s": round(now - _num(snap.get("ts")), 1) if _num(snap.get("ts")) else None,
                "in_flight": printable(await redis.get(keys.symbol_in_flight(symbol)) or ""),
            }
        )
    return status


def render(status: Status) -> None:
    from rich.table import Table

    from quantum_trader.cli.render import console

    services = Table(title="services", title_justify="left")
    for column in ("service", "consumer", "pid", "ready", "heartbeat", "lag", "pending"):
        services.add_column(column)
    for s in status.services:
        services.add_row(
            s["service"],
            s["consumer"],
            str(s["pid"]),
            "yes" if s["ready"] else "[red]no[/red]",
            f"{s['heartbeat_age_s']} s ago",
            str(s["lag"]),
            str(s["pending"]),
        )
    if not status.services:
        services.add_row("[red]none running[/red]", "", "", "", "", "", "")
    console.print(services)
    switch = "[red]ON: every plan is denied[/red]" if status.kill_switch else "off"
    console.print(
        f"kill switch: {switch}   Governor mode: {status.governor_mode}   unresolved orders: {status.unresolved_orders}"
    )
    positions = Table(title="positions", title_justify="left")
    for column in ("symbol", "exchange", "ledger", "drift", "snapshot age", "plan in flight"):
        positions.add_column(column)
    for row in status.symbols:
        drift = row["drift"]
        shown = f"[red]{drift}[/red]" if drift and Decimal(drift) != 0 else drift
        age = f"{row['snapshot_age_s']} s" if row["snapshot_age_s"] is not None else "—"
        positions.add_row(row["symbol"], row["exchange"], row["ledger"], shown, age, row["in_flight"])
    console.print(positions)
