"""Binance USD-M futures through ccxt ``binanceusdm``: the one adapter for sim, testnet, demo and live.

It uses ccxt's implicit endpoints (``fapiPrivatePostOrder`` …) so that requests and replies are Binance's own
documented shapes, signed and routed by ccxt exactly as against the real exchange; only the base URLs differ
between modes. On top of ccxt it keeps:

- the exchange's clock: the offset is measured at start (midpoint of a ``/time`` round trip), every
  ``TIME_RESYNC_S``, and at once after a -1021; signed requests carry exchange time;
- the exchange's limits: every request waits on a ``RateGuard`` fed by Binance's own counters; a 418 stops
  all traffic until the ban ends;
- exchangeInfo filters and the account's rate limits, cached for an hour and reloaded after a precision or
  quantity rejection.

ccxt is imported lazily: it is heavy (~1 s, ~70 MB) and only the processes that trade need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextvars import ContextVar
from decimal import Decimal
from typing import Any

from quantum_trader.domain.clocks import ClockReading
from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.domain.numbers import format_qty
from quantum_trader.exchange.base import (
    ExchangeBanned,
    ExchangeError,
    ExchangeRejected,
    ExchangeUnavailable,
    NotSent,
    OrderReport,
    OutcomeUnknown,
    PositionInfo,
    Throttled,
)
from quantum_trader.exchange.errors import binance_code, classify_order_error, classify_read_error, truncate
from quantum_trader.exchange.replies import parse_filters, parse_order, parse_position, parse_rate_limits
from quantum_trader.exchange.throttle import Banned, Purpose, RateGuard
from quantum_trader.settings import ExchangeSettings

LIVE_CONFIRMATION = "I-UNDERSTAND-THIS-TRADES-REAL-MONEY"
ORDER_NOT_FOUND = -2013
INVALID_SYMBOL = -1121
TIMESTAMP_OUTSIDE_WINDOW = -1021
FILTER_CODES = frozenset({-1111, -4003, -4004, -4005})  # a rejection that says our filters may be out of date
FILTERS_MAX_AGE_S = 3600.0  # exchangeInfo changes rarely; an hour keeps step sizes current without cost
TIME_RESYNC_S = 600.0  # clocks drift by milliseconds per hour; ten minutes keeps well inside recvWindow
# A read waits at most this long for room under the limits, then fails (ExchangeUnavailable): a plan is better
# skipped now with "position unavailable" than decided on a read that arrives a minute late.
READ_MAX_WAIT_MS = 2000.0
ORDERS_PAGE = 1000  # allOrders' largest page

# Request weights (Binance USD-M documentation).
WEIGHTS = {
    "time": 1,
    "exchangeInfo": 1,
    "positionRisk": 5,
    "order": 1,
    "queryOrder": 1,
    "allOrders": 5,
    "positionSide": 30,
    "balance": 5,
    "listenKey": 1,
}
# when the request of the current task was sent (exchange clock): its reply's rate counts are judged by it
SENT_AT: ContextVar[float] = ContextVar("qt_request_sent_at")
LISTEN_KEY_UNKNOWN = -1125  # "This listenKey does not exist.": POST a new one
STREAM_URLS = {"testnet": "wss://fstream.binancefuture.com", "demo": "wss://fstream.binancefuture.com",
               "live": "wss://fstream.binance.com"}  # fmt: skip


def stream_base(settings: ExchangeSettings, sim_url: str, override: str = "") -> str:
    """The user-data stream's WebSocket base for the mode (``override``: QT_STREAM__URL)."""
    if override:
        return override.rstrip("/")
    if settings.mode == "sim":
        if not sim_url:
            raise ExchangeUnavailable("mode sim needs the simulator's URL (QT_EXCHANGE__SIM_URL or `qt up`)")
        return "ws" + sim_url.rstrip("/").removeprefix("http")
    return STREAM_URLS[settings.mode]


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

    class Client(ccxt.binanceusdm):  # type: ignore[misc]
        """binanceusdm that shows every reply's status and headers (rate counters, Retry-After) to us."""

        observer: Any = None

        def on_rest_response(
            self,
            code: Any,
            reason: Any,
            url: Any,
            method: Any,
            headers: Any,
            body: Any,
            request_headers: Any,
            request_body: Any,
        ) -> Any:
            if self.observer is not None and code is not None:
                self.observer(int(code), headers or {})
            return super().on_rest_response(code, reason, url, method, headers, body, request_headers, request_body)

    client = Client(
        {
            "apiKey": api_key,
            "secret": api_secret,
            "timeout": settings.timeout_ms,
            # ccxt's own throttle spaces calls by a fixed 50 ms whatever the weight; ours follows Binance's
            # counters instead, so ccxt's is off in every mode.
            "enableRateLimit": False,
            "options": {
                "defaultType": "future",
                "fetchCurrencies": False,
                "fetchMarkets": {"types": ["linear"]},
                "recvWindow": settings.recv_window_ms,
                "disableFuturesSandboxWarning": True,
                "timeDifference": 0,
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


def make_exchange(settings: ExchangeSettings, api_key: str, api_secret: str, sim_url: str) -> BinanceFutures:
    return BinanceFutures(
        build_ccxt(settings, api_key, api_secret, sim_url), order_recv_window_ms=settings.order_recv_window_ms
    )


class BinanceFutures:
    """The ``Exchange`` for every mode. One instance per process; it holds ccxt's HTTP session."""

    def __init__(self, client: Any, *, order_recv_window_ms: int = 1000, guard: RateGuard | None = None) -> None:
        self._client = client
        self.guard = guard or RateGuard()
        self.order_recv_window_ms = order_recv_window_ms
        self.skew_ms = 0.0  # local clock minus exchange clock, as last measured
        self._synced_at = 0.0
        self._reading: ClockReading | None = None
        self._filters: dict[str, SymbolFilters] = {}
        self._filters_at = 0.0
        client.observer = self._observe

    async def close(self) -> None:
        await self._client.close()

    # --- clock ------------------------------------------------------------------------------------------

    def now_ms(self) -> float:
        """The exchange's clock, estimated from ours and the last measured offset."""
        return time.time() * 1000 - self.skew_ms

    async def sync_time(self) -> float:
        """Measure the offset to the exchange clock (midpoint of a round trip, so known to within half of it);
        returns it in ms."""
        started = time.monotonic()
        before = time.time() * 1000
        # the orders' share: an order, a lookup and an absence verdict each may need the clock first
        reply = await self._read("fapiPublicGetTime", {}, WEIGHTS["time"], "order")
        after = time.time() * 1000
        # the round trip on the monotonic clock: a step of the wall clock during it would not shrink the error
        round_trip_ms = max(after - before, (time.monotonic() - started) * 1000)
        try:
            server = float(reply["serverTime"])
        except (KeyError, TypeError, ValueError):
            raise ExchangeUnavailable(f"unexpected /time reply: {truncate(str(reply))}") from None
        self._synced_at = time.monotonic()
        # +1 ms: the exchange reports whole milliseconds
        reading = ClockReading((before + after) / 2 - server, round_trip_ms / 2 + 1, after / 1000)
        if self._reading is not None and self._reading.error_at(reading.measured_at) < reading.error_ms:
            return self.skew_ms  # a slower round trip than the reading held: that one (and its offset) is tighter
        self._reading = reading
        self.skew_ms = reading.offset_ms
        self._client.options["timeDifference"] = round(self.skew_ms)
        return self.skew_ms

    def clock_reading(self) -> ClockReading | None:
        return self._reading

    async def _ensure_time(self) -> None:
        if not self._synced_at or time.monotonic() - self._synced_at > TIME_RESYNC_S:
            await self.sync_time()

    # --- guarded requests -------------------------------------------------------------------------------

    def _observe(self, status: int, headers: dict[str, str]) -> None:
        # called by ccxt inside the request's own task: the request's send time is in the context
        self.guard.observe(self.now_ms(), status, headers, SENT_AT.get(None))

    async def _call(
        self,
        method: str,
        params: dict[str, Any],
        weight: int,
        orders: int = 0,
        deadline_ms: float | None = None,
        stamp: bool = False,
        purpose: Purpose = "poll",
    ) -> Any:
        """Wait for room under the exchange's limits (not past ``deadline_ms``), then send. ``deadline_ms`` is
        checked once more right before the request leaves (NotSent); with ``stamp`` the request's ``timestamp``
        is set at that moment (``params["timestamp"]``, exchange clock), after every wait: it is what bounds
        when the exchange can still execute it, so it must be when the request was signed and left."""
        if not self._filters_at and method != "fapiPublicGetExchangeInfo":
            # exchangeInfo (public, unsigned) states this account's rate limits: learn them before the first
            # reply's used-weight header is compared against limits we only assumed
            with contextlib.suppress(ExchangeError):
                await self.filters()
        while True:
            now = self.now_ms()
            try:
                room = self.guard.room(now, weight, orders, purpose)
            except Banned as exc:
                raise ExchangeBanned(str(exc), 418) from None
            if room.wait_ms <= 0:
                break
            if deadline_ms is not None and now + room.wait_ms > deadline_ms:
                raise Throttled(f"no room before the deadline: {room.describe(now)}")
            await asyncio.sleep(room.wait_ms / 1000)
        now = self.now_ms()
        if deadline_ms is not None and now >= deadline_ms:
            raise NotSent(f"the deadline passed {now - deadline_ms:.0f} ms before the request could leave")
        if stamp:
            params["timestamp"] = round(now)
        self.guard.sent(now, weight, orders)
        SENT_AT.set(now)  # this task's context: the reply's counts are judged by it (RateGuard.observe)
        try:
            return await getattr(self._client, method)(params)
        except Exception:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # aiohttp/ccxt can turn our own cancellation into a network error; a stopping handler must stop,
                # not go on to "resolve" an outcome it was told to abandon.
                raise asyncio.CancelledError from None
            raise

    def order_room(self, deadline_ms: float) -> str:
        """Whether an order could leave before ``deadline_ms`` under the budget: "" if so, else which limit
        leaves no room and when it frees (a plan refused ``rate_limited`` says so). Raises ExchangeBanned."""
        now = self.now_ms()
        try:
            room = self.guard.room(now, WEIGHTS["order"], 1, "order")
        except Banned as exc:
            raise ExchangeBanned(str(exc), 418) from None
        return "" if room.wait_ms <= 0 or now + room.wait_ms <= deadline_ms else room.describe(now)

    async def _read(self, method: str, params: dict[str, Any], weight: int, purpose: Purpose = "poll") -> Any:
        """A read: on -1021 resync the clock and try once more; every failure is ExchangeUnavailable (or
        Throttled when the limits leave no room within ``READ_MAX_WAIT_MS``)."""
        for attempt in (1, 2):
            try:
                deadline_ms = self.now_ms() + READ_MAX_WAIT_MS
                return await self._call(method, params, weight, deadline_ms=deadline_ms, purpose=purpose)
            except (ExchangeBanned, Throttled):
                raise
            except Exception as exc:
                error = classify_read_error(exc)
                if error.code == TIMESTAMP_OUTSIDE_WINDOW and attempt == 1:
                    await self.sync_time()
                    continue
                raise error from None
        raise AssertionError("unreachable")

    # --- reads ------------------------------------------------------------------------------------------

    async def server_time_ms(self) -> int:
        await self.sync_time()
        return round(self.now_ms())

    async def dual_side_position(self) -> bool:
        """True in Hedge Mode, which this system refuses (reduce-only closes are a one-way concept)."""
        await self._ensure_time()
        reply = await self._read("fapiPrivateGetPositionSideDual", {}, WEIGHTS["positionSide"])
        try:
            return bool(reply["dualSidePosition"])
        except (KeyError, TypeError):
            raise ExchangeUnavailable(f"unexpected positionSide/dual reply: {truncate(str(reply))}") from None

    async def balance(self) -> list[dict[str, Any]]:
        """The account's balances (a signed read: proves the keys work)."""
        await self._ensure_time()
        reply = await self._read("fapiPrivateV2GetBalance", {}, WEIGHTS["balance"])
        if not isinstance(reply, list):
            raise ExchangeUnavailable(f"unexpected balance reply: {truncate(str(reply))}")
        return reply

    async def positions(self, symbols: list[str], purpose: Purpose = "poll") -> dict[str, PositionInfo]:
        """Positions of ``symbols`` (all with zero amount included). One request, weight 5, from ``purpose``'s
        share of the budget (exchange/throttle.py)."""
        await self._ensure_time()
        params = {"symbol": symbols[0]} if len(symbols) == 1 else {}
        rows = await self._read("fapiPrivateV2GetPositionRisk", params, WEIGHTS["positionRisk"], purpose)
        if not isinstance(rows, list):  # an empty body or an object has no rows: never read that as "flat"
            raise ExchangeUnavailable(f"unexpected positionRisk reply: {truncate(str(rows))}")
        wanted = set(symbols)
        try:
            parsed = [parse_position(row) for row in rows if row.get("symbol") in wanted]
            hedge = [row for row in rows if row.get("symbol") in wanted and row.get("positionSide") != "BOTH"]
        except (ValueError, TypeError, AttributeError) as exc:
            raise ExchangeUnavailable(f"unexpected positionRisk reply ({exc}): {truncate(str(rows))}") from None
        if hedge:
            raise ExchangeUnavailable("the account is in Hedge Mode (positionSide LONG/SHORT); one-way mode needed")
        found = {p.symbol: p for p in parsed}
        return {s: found.get(s) or PositionInfo(s, Decimal(0), Decimal(0), Decimal(0)) for s in symbols}

    async def filters(self, refresh: bool = False) -> dict[str, SymbolFilters]:
        if refresh or not self._filters or time.monotonic() - self._filters_at > FILTERS_MAX_AGE_S:
            info = await self._read("fapiPublicGetExchangeInfo", {}, WEIGHTS["exchangeInfo"], "order")
            self._filters = parse_filters(info)
            self.guard.adopt_limits(parse_rate_limits(info))
            self._filters_at = time.monotonic()
        return self._filters

    # --- the user-data stream's key ---------------------------------------------------------------------

    async def create_listen_key(self) -> str:
        """POST /fapi/v1/listenKey: the account's active key (extended), or a new one when there is none. One
        key serves every process of the account; none of them ever DELETEs it (another may be reading)."""
        reply = await self._read("fapiPrivatePostListenKey", {}, WEIGHTS["listenKey"])
        key = reply.get("listenKey") if isinstance(reply, dict) else None
        if not isinstance(key, str) or not key:
            raise ExchangeUnavailable(f"unexpected listenKey reply: {truncate(str(reply))}")
        return key

    async def keep_alive_listen_key(self, key: str) -> None:
        """PUT /fapi/v1/listenKey: extend the key another 60 minutes. ExchangeUnavailable with code -1125 when
        the exchange no longer knows it (POST again)."""
        await self._read("fapiPrivatePutListenKey", {"listenKey": key}, WEIGHTS["listenKey"])

    # --- orders -----------------------------------------------------------------------------------------

    async def place_reduce_only_market(
        self, symbol: str, side: str, qty: Decimal, client_order_id: str, deadline_ms: float | None = None
    ) -> OrderReport:
        """Send one reduce-only MARKET order. Raises ExchangeRejected (nothing placed), OutcomeUnknown (maybe
        placed: look it up, never resend blindly), Throttled / ExchangeBanned / NotSent (not sent)."""
        try:
            await self._ensure_time()
            filters = (await self.filters()).get(symbol)
        except (ExchangeBanned, Throttled):
            raise
        except ExchangeError as exc:  # the clock or the filters could not be read: nothing was sent
            raise NotSent(f"could not prepare the order: {exc.message}", exc.code) from None
        request: dict[str, Any] = {
            "symbol": symbol,
            "side": side,
            "type": "MARKET",
            "quantity": format_qty(qty, filters.step_size) if filters else format(qty, "f"),
            "reduceOnly": "true",
            "newClientOrderId": client_order_id,
            "newOrderRespType": "RESULT",
            # A short window bounds how late a lost request could still be accepted (see domain/execution).
            "recvWindow": self.order_recv_window_ms,
        }
        try:
            reply = await self._call(
                "fapiPrivatePostOrder",
                request,
                WEIGHTS["order"],
                orders=1,
                deadline_ms=deadline_ms,
                stamp=True,
                purpose="order",
            )
        except (ExchangeBanned, Throttled, NotSent):
            raise
        except Exception as exc:
            error = classify_order_error(exc)
            error.signed_at_ms = request.get("timestamp")
            with contextlib.suppress(ExchangeError):  # best effort: the order's own error is what the caller needs
                if error.code == TIMESTAMP_OUTSIDE_WINDOW:
                    await self.sync_time()
                elif error.code in FILTER_CODES:
                    await self.filters(refresh=True)
            raise error from None
        try:
            return parse_order(reply)
        except (ValueError, TypeError) as exc:
            raise OutcomeUnknown(
                f"unreadable order reply ({exc}): {truncate(str(reply))}", signed_at_ms=request.get("timestamp")
            ) from None

    async def orders_since(self, symbol: str, since_ms: float) -> list[OrderReport]:
        """Every order of ``symbol`` created at or after ``since_ms`` (exchange clock), oldest first, in pages
        of 1,000 (allOrders, weight 5 a page; Binance keeps them queryable for days). Replies that are not
        orders are left out: this is a search, and what it finds is looked up again before it is used."""
        await self._ensure_time()
        found: list[OrderReport] = []
        params: dict[str, Any] = {"symbol": symbol, "startTime": int(since_ms), "limit": ORDERS_PAGE}
        while True:
            try:
                rows = await self._read("fapiPrivateGetAllOrders", params, WEIGHTS["allOrders"], "lookup")
            except ExchangeUnavailable as exc:
                if exc.code == INVALID_SYMBOL:
                    return found  # a symbol the exchange does not know has no orders
                raise
            if not isinstance(rows, list):
                raise ExchangeUnavailable(f"unexpected allOrders reply: {truncate(str(rows))}")
            for row in rows:
                with contextlib.suppress(ValueError, TypeError):
                    found.append(parse_order(row))
            if len(rows) < ORDERS_PAGE:
                return found
            last = rows[-1].get("orderId") if isinstance(rows[-1], dict) else None
            if not isinstance(last, int):
                return found
            params = {"symbol": symbol, "orderId": last + 1, "limit": ORDERS_PAGE}

    async def query_order(self, symbol: str, client_order_id: str) -> OrderReport | None:
        """The order with this client id, or None when Binance says it does not exist (-2013)."""
        await self._ensure_time()
        try:
            reply = await self._call(
                "fapiPrivateGetOrder",
                {"symbol": symbol, "origClientOrderId": client_order_id},
                WEIGHTS["queryOrder"],
                purpose="lookup",
            )
        except ExchangeBanned:
            raise
        except Exception as exc:
            found = binance_code(str(exc))
            if found is not None and found[0] in (ORDER_NOT_FOUND, INVALID_SYMBOL):
                return None  # no order has this id (an unknown symbol cannot have one either)
            if found is not None and found[0] == TIMESTAMP_OUTSIDE_WINDOW:
                await self.sync_time()
            failure = classify_read_error(exc)
            raise ExchangeUnavailable(failure.message, failure.code) from None
        try:
            return parse_order(reply)
        except (ValueError, TypeError) as exc:
            raise ExchangeUnavailable(f"unreadable order query reply ({exc}): {truncate(str(reply))}") from None


__all__ = ["LIVE_CONFIRMATION", "BinanceFutures", "ExchangeError", "build_ccxt", "make_exchange", "stream_base"]
