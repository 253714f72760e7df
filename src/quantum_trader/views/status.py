"""The chain at a glance, from the store alone: services and their backlog, switches, unresolved orders, and
each symbol's position as the exchange snapshot and the ledger see it (`qt status`, the dashboard)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from quantum_trader.bus import keys
from quantum_trader.bus.streams import GROUPS, group_backlog
from quantum_trader.domain.clocks import ClockReading, decode, judge
from quantum_trader.domain.text import printable


@dataclass
class Status:
    services: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    kill_switch: bool = False
    governor_mode: str = ""
    unresolved_orders: int = 0
    symbols: list[dict[str, Any]] = field(default_factory=list)
    # each Apply host's reading of the exchange clock, and what they allow (domain/clocks.py)
    clocks: list[dict[str, Any]] = field(default_factory=list)
    clocks_problem: str = ""
    # the store: its epoch as Apply recorded it, and for a Sentinel set, the primary and replicas as the
    # Sentinels see them (what is down, what is not in sync)
    store: dict[str, Any] = field(default_factory=dict)

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


async def collect(
    redis: aioredis.Redis,
    symbols: list[str],
    default_mode: str,
    *,
    max_clock_error_ms: float = 250.0,
    max_host_clock_gap_ms: float = 500.0,
) -> Status:
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
                # the user-data stream: off / healthy / down, with its counts (services/runner.py stream_fields)
                "stream": printable(beat.get("stream", "off")),
                "stream_reconnects": int(_num(beat.get("stream_reconnects"))),
                "stream_renewals": int(_num(beat.get("stream_renewals"))),
                "stream_resyncs": int(_num(beat.get("stream_resyncs"))),
                "stream_last_event_age_s": _num(beat.get("stream_last_event_age_s"), -1.0),
                "stream_error": printable(beat.get("stream_error", "")),
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
    await _clocks(redis, status, now, max_clock_error_ms, max_host_clock_gap_ms)
    await _store(redis, status, now)
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


async def _clocks(redis: aioredis.Redis, status: Status, now: float, max_error_ms: float, max_gap_ms: float) -> None:
    """Each live Apply's clock reading; the clocks are judged from each host's point of view in turn."""
    hosts = sorted(str(h) for h in await redis.smembers(keys.APPLY_CLOCK_HOSTS))
    texts = await redis.mget([keys.apply_clock(h) for h in hosts]) if hosts else []
    readings: dict[str, ClockReading] = {}
    for host, text in zip(hosts, texts, strict=True):
        if text is None:
            continue  # stopped publishing
        try:
            reading, published_at = decode(str(text))
        except ValueError:
            status.clocks.append({"consumer": printable(host), "unreadable": True})
            continue
        readings[host] = reading
        status.clocks.append(
            {
                "consumer": printable(host),
                "offset_ms": round(reading.offset_ms, 1),
                "error_ms": round(reading.error_at(now), 1),
                "age_s": round(now - published_at, 1),
            }
        )
    for host, reading in readings.items():
        others = [r for h, r in readings.items() if h != host]
        state = judge(reading, others, now, max_error_ms=max_error_ms, max_host_gap_ms=max_gap_ms)
        if state.problem:
            status.clocks_problem = f"{printable(host)}: {state.problem}"
            return


async def _store(redis: aioredis.Redis, status: Status, now: float) -> None:
    """The epoch record (bus/identity.py) and, through a Sentinel URL, the set as the first Sentinel that
    answers sees it."""
    epoch = await redis.hgetall(keys.STORE_EPOCH)
    status.store = {
        "run_id": printable(epoch.get("run_id", ""))[:12],
        "epoch_age_s": round(now - _num(epoch.get("since")), 1) if _num(epoch.get("since")) else None,
        "continued": int(_num(epoch.get("continued"))),
        "durability": printable(epoch.get("durability", "")),
        "lost": epoch.get("lost") == "1",
    }
    pool = redis.connection_pool
    manager = getattr(pool, "sentinel_manager", None)
    if manager is None:
        return
    name = str(getattr(pool, "service_name", ""))
    for sentinel in manager.sentinels:
        try:
            master = await sentinel.sentinel_master(name)
            replicas = await sentinel.sentinel_slaves(name)
        except (RedisError, OSError):
            continue
        status.store["primary"] = f"{master.get('ip')}:{master.get('port')}"
        status.store["primary_flags"] = printable(str(master.get("flags", "")))
        status.store["sentinels"] = 1 + int(master.get("num-other-sentinels", 0))
        status.store["replicas"] = [
            {
                "address": f"{r.get('ip')}:{r.get('port')}",
                "flags": printable(str(r.get("flags", ""))),
                "link": printable(str(r.get("master-link-status", ""))),
                "offset": int(r.get("slave-repl-offset", 0) or 0),
            }
            for r in replicas
        ]
        await _lag(redis, status.store["replicas"])
        return
    status.store["primary"] = "unknown: no Sentinel answers"


async def _lag(redis: aioredis.Redis, replicas: list[dict[str, Any]]) -> None:
    """Each replica's lag behind the primary, in bytes of the replication stream, from the primary's own ROLE
    (its offset and each replica's acknowledged one); left out when ROLE is not allowed or answers otherwise."""
    try:
        role = await redis.execute_command("ROLE")
    except (RedisError, OSError):
        return
    if not isinstance(role, list | tuple) or len(role) < 3 or str(role[0]) != "master":
        return
    try:
        offset = int(role[1])
        acked = {f"{entry[0]}:{entry[1]}": int(entry[2]) for entry in role[2]}
    except (TypeError, ValueError, IndexError):
        return
    for replica in replicas:
        if replica["address"] in acked:
            replica["lag_bytes"] = max(0, offset - acked[replica["address"]])
