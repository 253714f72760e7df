"""Binance's replies as plain data. Anything not shaped as Binance documents raises ValueError (the caller
decides whether that is an unknown outcome or an unavailable read); nothing here touches the network."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.exchange.base import OrderReport, PositionInfo


def _dec(row: dict[str, Any], name: str) -> Decimal:
    try:
        value = Decimal(str(row[name]))
    except (KeyError, InvalidOperation):
        raise ValueError(f"field {name!r} missing or not a number") from None
    if not value.is_finite():
        raise ValueError(f"field {name!r} is not finite")
    return value


def parse_position(row: dict[str, Any]) -> PositionInfo:
    return PositionInfo(
        symbol=str(row["symbol"]),
        amt=_dec(row, "positionAmt"),
        entry_price=_dec(row, "entryPrice"),
        mark_price=_dec(row, "markPrice"),
        update_time_ms=int(row.get("updateTime") or 0),
    )


def parse_order(reply: Any) -> OrderReport:
    if not isinstance(reply, dict):
        raise ValueError("order reply is not an object")
    executed = _dec(reply, "executedQty")
    avg = _dec(reply, "avgPrice") if reply.get("avgPrice") not in (None, "") else Decimal(0)
    status = reply.get("status")
    if not isinstance(status, str) or "orderId" not in reply:
        raise ValueError("order reply lacks status or orderId")
    try:
        updated = int(reply.get("updateTime") or 0)
    except (TypeError, ValueError):
        raise ValueError("field 'updateTime' is not a number") from None
    return OrderReport(
        order_id=str(reply["orderId"]),
        client_order_id=str(reply.get("clientOrderId", "")),
        status=status,
        executed_qty=executed,
        avg_price=avg,
        side=str(reply.get("side", "")),
        update_time_ms=updated,
    )


def _lot(by_type: dict[Any, Any]) -> tuple[Decimal, Decimal, Decimal] | None:
    """(step, min, max) of MARKET_LOT_SIZE, or of LOT_SIZE where the market filter is absent or has step 0
    (Binance sends that for some symbols). None when neither is usable."""
    for name in ("MARKET_LOT_SIZE", "LOT_SIZE"):
        lot = by_type.get(name)
        if not isinstance(lot, dict):
            continue
        try:
            step, low, high = (Decimal(str(lot[k])) for k in ("stepSize", "minQty", "maxQty"))
        except (KeyError, InvalidOperation):
            continue
        if all(v.is_finite() for v in (step, low, high)) and step > 0 and low >= 0 and high > 0:
            return step, low, high
    return None


def parse_filters(info: Any) -> dict[str, SymbolFilters]:
    """Lot-size filters per symbol from exchangeInfo. Entries that are not usable are left out (P3.3 then
    denies that symbol with ``no_symbol_filters``) rather than failing the whole load."""
    result: dict[str, SymbolFilters] = {}
    symbols = info.get("symbols") if isinstance(info, dict) else None
    for entry in symbols if isinstance(symbols, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("symbol"), str):
            continue
        filters = entry.get("filters")
        by_type = {f.get("filterType"): f for f in filters if isinstance(f, dict)} if isinstance(filters, list) else {}
        lot = _lot(by_type)
        if lot is None:
            continue
        try:
            notional = Decimal(str(by_type.get("MIN_NOTIONAL", {}).get("notional", "0")))
        except InvalidOperation:
            notional = Decimal(0)
        step, low, high = lot
        result[entry["symbol"]] = SymbolFilters(
            symbol=entry["symbol"],
            step_size=step.normalize(),
            min_qty=low,
            max_qty=high,
            min_notional=notional if notional.is_finite() else Decimal(0),
        )
    return result


def parse_rate_limits(info: Any) -> dict[str, int]:
    """The account's limits from exchangeInfo ``rateLimits``, as RateGuard field names. Only the windows the
    guard tracks are taken (weight per minute, orders per 10 s and per minute); unusable entries are skipped,
    so a partial or odd reply keeps Binance's documented defaults for what it does not state."""
    wanted: dict[tuple[Any, Any, Any], str] = {
        ("REQUEST_WEIGHT", "MINUTE", 1): "weight_limit",
        ("ORDERS", "SECOND", 10): "orders_10s_limit",
        ("ORDERS", "MINUTE", 1): "orders_1m_limit",
    }
    entries = info.get("rateLimits") if isinstance(info, dict) else None
    limits: dict[str, int] = {}
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        name = wanted.get((entry.get("rateLimitType"), entry.get("interval"), entry.get("intervalNum")))
        limit = entry.get("limit")
        if name and isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            limits[name] = limit
    return limits
