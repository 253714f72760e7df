"""Binance USD-M futures through ccxt ``binanceusdm``: the one adapter for sim, testnet, demo and live.

It uses ccxt's implicit endpoints (``fapiPrivatePostOrder`` …) so that requests and replies are Binance's own
documented shapes, signed and routed by ccxt exactly as against the real exchange. Only the base URLs differ
between modes. ccxt is imported lazily: it is heavy and only the processes that trade need it.
"""

from __future__ import annotations

import time
from decimal import Decimal, InvalidOperation
from typing import Any

from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.domain.numbers import format_qty
from quantum_trader.exchange.base import (
    ExchangeRejected,
    ExchangeUnavailable,
    OrderReport,
    OutcomeUnknown,
    PositionInfo,
)
from quantum_trader.exchange.errors import binance_code, classify_order_error, classify_read_error, truncate
from quantum_trader.settings import ExchangeSettings

LIVE_CONFIRMATION = "I-UNDERSTAND-THIS-TRADES-REAL-MONEY"
ORDER_NOT_FOUND = -2013
FILTERS_MAX_AGE_S = 3600.0  # exchangeInfo changes rarely; an hour keeps step sizes current without cost

_SIM_SECTIONS = {
    "fapiPublic": "v1",
    "fapiPublicV2": "v2",
    "fapiPublicV3": "v3",
    "fapiPrivate": "v1",
    "fapiPrivateV2": "v2",
    "fapiPrivateV3": "v3",
}


def build_ccxt(settings: ExchangeSettings, api_key: str, api_secret: str, sim_url: str) -> Any:
    """A configured ``ccxt.async_support.binanceusdm`` for the mode in ``settings``."""
    import ccxt.async_support as ccxt  # lazy: ~1 s and ~70 MB

    mode = settings.mode
    if mode == "live" and settings.live_confirm != LIVE_CONFIRMATION:
        raise ExchangeRejected(f"mode live needs QT_EXCHANGE__LIVE_CONFIRM={LIVE_CONFIRMATION}: it trades real money")
    client = ccxt.binanceusdm(
        {
            "apiKey": api_key,
            "secret": api_secret,
            "timeout": settings.timeout_ms,
            # ccxt's throttle spaces every call by 50 ms; against the local simulator that is pure latency.
            # Against Binance it stays on until our own weight-aware throttle replaces it.
            "enableRateLimit": mode != "sim",
            "options": {
                "defaultType": "future",
                "fetchCurrencies": False,
                "fetchMarkets": {"types": ["linear"]},
                "recvWindow": settings.recv_window_ms,
                "disableFuturesSandboxWarning": True,
            },
        }
    )
    if mode == "sim":
        if not sim_url:
            raise ExchangeUnavailable("mode sim needs the simulator's URL (QT_EXCHANGE__SIM_URL or `qt up`)")
        for section, version in _SIM_SECTIONS.items():
            client.urls["api"][section] = f"{sim_url.rstrip('/')}/fapi/{version}"
    elif mode == "testnet":
        client.set_sandbox_mode(True)
    elif mode == "demo":
        client.enable_demo_trading(True)
    return client


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
    return OrderReport(
        order_id=str(reply["orderId"]),
        client_order_id=str(reply.get("clientOrderId", "")),
        status=status,
        executed_qty=executed,
        avg_price=avg,
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


class BinanceFutures:
    """The ``Exchange`` for every mode. One instance per process; it holds ccxt's HTTP session."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._filters: dict[str, SymbolFilters] = {}
        self._filters_at = 0.0

    async def close(self) -> None:
        await self._client.close()

    async def server_time_ms(self) -> int:
        try:
            reply = await self._client.fapiPublicGetTime()
            return int(reply["serverTime"])
        except Exception as exc:
            raise classify_read_error(exc) from None

    async def dual_side_position(self) -> bool:
        """True in Hedge Mode, which this system refuses (reduce-only closes are a one-way concept)."""
        try:
            reply = await self._client.fapiPrivateGetPositionSideDual()
            return bool(reply["dualSidePosition"])
        except Exception as exc:
            raise classify_read_error(exc) from None

    async def positions(self, symbols: list[str]) -> dict[str, PositionInfo]:
        """Positions of ``symbols`` (all with zero amount included). One request, weight 5."""
        params = {"symbol": symbols[0]} if len(symbols) == 1 else {}
        try:
            rows = await self._client.fapiPrivateV2GetPositionRisk(params)
        except Exception as exc:
            raise classify_read_error(exc) from None
        wanted = set(symbols)
        try:
            parsed = [parse_position(row) for row in rows if row.get("symbol") in wanted]
        except (ValueError, TypeError, AttributeError) as exc:
            raise ExchangeUnavailable(f"unexpected positionRisk reply ({exc}): {truncate(str(rows))}") from None
        found = {p.symbol: p for p in parsed}
        return {s: found.get(s) or PositionInfo(s, Decimal(0), Decimal(0), Decimal(0)) for s in symbols}

    async def filters(self, refresh: bool = False) -> dict[str, SymbolFilters]:
        if refresh or not self._filters or time.monotonic() - self._filters_at > FILTERS_MAX_AGE_S:
            try:
                info = await self._client.fapiPublicGetExchangeInfo()
            except Exception as exc:
                raise classify_read_error(exc) from None
            self._filters = parse_filters(info)
            self._filters_at = time.monotonic()
        return self._filters

    async def place_reduce_only_market(self, symbol: str, side: str, qty: Decimal, client_order_id: str) -> OrderReport:
        filters = (await self.filters()).get(symbol)
        quantity = format_qty(qty, filters.step_size) if filters else format(qty, "f")
        request = {
            "symbol": symbol,
            "side": side,
            "type": "MARKET",
            "quantity": quantity,
            "reduceOnly": "true",
            "newClientOrderId": client_order_id,
            "newOrderRespType": "RESULT",
        }
        try:
            reply = await self._client.fapiPrivatePostOrder(request)
        except Exception as exc:
            raise classify_order_error(exc) from None
        try:
            return parse_order(reply)
        except (ValueError, TypeError) as exc:
            raise OutcomeUnknown(f"unreadable order reply ({exc}): {truncate(str(reply))}") from None

    async def query_order(self, symbol: str, client_order_id: str) -> OrderReport | None:
        """The order with this client id, or None when Binance says it does not exist (-2013)."""
        try:
            reply = await self._client.fapiPrivateGetOrder({"symbol": symbol, "origClientOrderId": client_order_id})
        except Exception as exc:
            found = binance_code(str(exc))
            if found is not None and found[0] == ORDER_NOT_FOUND:
                return None
            raise classify_order_error(exc) from None
        try:
            return parse_order(reply)
        except (ValueError, TypeError) as exc:
            raise OutcomeUnknown(f"unreadable order reply ({exc}): {truncate(str(reply))}") from None
