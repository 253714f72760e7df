"""The simulated Binance USD-M futures exchange: a synchronous state machine, no HTTP.

Reproduced Binance behaviours (codes and messages as Binance documents them):

* Order validation in Binance's order: symbol (-1102/-1121), side (-1117), type (-1116), positionSide against
  the account's position mode (-4061; ``reduceOnly`` in hedge mode is -1106), newClientOrderId pattern (-1100),
  quantity (-1102 malformed, -4003 <= 0, -1111 not a multiple of stepSize, -4004/-4005 against MARKET_LOT_SIZE
  for MARKET and LOT_SIZE for LIMIT), price filters for LIMIT (-4001/-4013/-4002/-4014/-4016/-4024),
  -4116 only while an OPEN order carries the same clientOrderId, MIN_NOTIONAL (-4164, waived for reduceOnly),
  reduceOnly (-2022 when the position is flat or on the order's side, -4118 when open reduce-only orders
  already cover the position), margin (-2019, never for orders that only reduce).
* A MARKET order fills at once at the mark price and is never open: re-sending its clientOrderId creates a
  SECOND order. Querying by origClientOrderId returns the most recent order with that id.
* One-way mode: one signed position per symbol (positionSide BOTH). Hedge mode (admin switch or
  ``POST /fapi/v1/positionSide/dual``, both refused with -4068/-4067 while positions or open orders exist):
  LONG and SHORT positions, shown as two rows per symbol; an order closing more than its side holds is -2022.
* Entry price is the quantity-weighted average on increase; a reduce realises PnL into the USDT wallet;
  crossing through zero closes, realises, and opens the remainder at the fill price.
* Mark price: a seeded geometric random walk advanced lazily in ``price_step_ms`` steps of the injected clock,
  rounded to the tick. The walk is a function of (seed, symbol, elapsed steps) only, never of how often it is
  read. Admin can set it; the walk continues from there.

Deliberate simplifications:

* A reduceOnly order larger than the reducible position is accepted for that size only: like Binance, its
  origQty is lowered to it, so a MARKET one ends FILLED with executedQty = |position|.
* MARKET and LIMIT only (the conditional types live on Binance's algo-order API); exchangeInfo lists just these.
  A LIMIT order that crosses the mark fills at once at the mark; a resting one fills at its price when the
  walk crosses it (IOC that does not cross expires, FOK is -5021, crossing GTX is -5022, both unrecorded).
* No order book, slippage, funding or liquidation. Fees: ``fee_rate`` (default 0) of each fill's notional is
  charged to the wallet.
* Cross margin only, one leverage bracket per symbol; liquidationPrice uses Binance's single-position cross
  formula with that bracket.
* All public methods take one lock, so the HTTP thread and a test thread may use the engine together.
"""

from __future__ import annotations

import math
import random
import re
import string
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Final

Json = dict[str, Any]

ZERO: Final = Decimal(0)
ONE: Final = Decimal(1)
QUOTE_ASSET: Final = "USDT"
CLIENT_ID_PATTERN: Final = r"^[\.A-Z\:/a-z0-9_\-]{1,36}$"
_CLIENT_ID_RE: Final = re.compile(CLIENT_ID_PATTERN)
_NUMBER_RE: Final = re.compile(r"^-?(\d+\.?\d*|\.\d+)$")
_ID_ALPHABET: Final = string.ascii_letters + string.digits
# Every type Binance's order endpoint knows; only MARKET and LIMIT are simulated.
KNOWN_ORDER_TYPES: Final = frozenset(
    {"LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"}
)
SUPPORTED_ORDER_TYPES: Final = ("LIMIT", "MARKET")
TIME_IN_FORCE: Final = ("GTC", "IOC", "FOK", "GTX")
OPEN_STATUSES: Final = frozenset({"NEW", "PARTIALLY_FILLED"})
_PNL_QUANT: Final = Decimal("0.00000001")
# A walk longer than this many steps is finished with one aggregated draw (keeps a clock jump cheap).
_MAX_WALK_STEPS: Final = 200_000


class EngineError(Exception):
    """A Binance-style rejection: ``{"code": code, "msg": msg}`` served with ``http_status``."""

    def __init__(self, code: int, msg: str, http_status: int = 400) -> None:
        super().__init__(f"{code} {msg}")
        self.code = code
        self.msg = msg
        self.http_status = http_status

    def body(self) -> Json:
        return {"code": self.code, "msg": self.msg}


def mandatory(name: str) -> EngineError:
    return EngineError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed.")


def not_valid(name: str) -> EngineError:
    return EngineError(-1130, f"Data sent for parameter '{name}' is not valid.")


def not_required(name: str) -> EngineError:
    return EngineError(-1106, f"Parameter '{name}' sent when not required.")


def require(params: Mapping[str, str], name: str) -> str:
    value = params.get(name)
    if value is None or value == "":
        raise mandatory(name)
    return value


def parse_decimal(params: Mapping[str, str], name: str) -> Decimal:
    raw = require(params, name)
    if not _NUMBER_RE.match(raw):
        raise mandatory(name)
    try:
        return Decimal(raw)
    except InvalidOperation:
        raise mandatory(name) from None


def parse_bool(params: Mapping[str, str], name: str) -> bool | None:
    raw = params.get(name)
    if raw is None:
        return None
    lowered = raw.lower()
    if lowered not in ("true", "false"):
        raise not_valid(name)
    return lowered == "true"


def parse_int(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not raw.lstrip("-").isdigit():
        raise mandatory(name)
    return int(raw)


def decimals_of(step: Decimal) -> int:
    exponent = step.normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


_QUANTS: dict[int, Decimal] = {}


def fmt(value: Decimal, places: int) -> str:
    """``value`` with exactly ``places`` decimals, as Binance prints prices and quantities (never ``-0``)."""
    quant = _QUANTS.get(places)
    if quant is None:
        quant = _QUANTS[places] = Decimal(1).scaleb(-places)
    out = value.quantize(quant, rounding=ROUND_HALF_UP)
    return f"{out if out else abs(out):f}"


def plain(value: Decimal, max_places: int = 8) -> str:
    """A trimmed decimal (``60000.1``, ``0.0`` for zero) as Binance prints entry prices."""
    out = value.quantize(Decimal(1).scaleb(-max_places), rounding=ROUND_HALF_UP).normalize()
    if not out:
        return "0.0"
    return f"{out:f}"


def floor_to_step(qty: Decimal, step: Decimal) -> Decimal:
    if qty <= 0:
        return ZERO
    return ((qty / step).to_integral_value(rounding=ROUND_DOWN) * step).quantize(step)


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """One perpetual contract and its exchangeInfo filters."""

    symbol: str
    base_asset: str
    step_size: Decimal
    min_qty: Decimal
    max_qty: Decimal  # LOT_SIZE (LIMIT orders)
    market_max_qty: Decimal  # MARKET_LOT_SIZE
    min_notional: Decimal
    start_price: Decimal
    tick_size: Decimal
    price_precision_override: int | None = None
    max_leverage: int = 75
    maint_margin_ratio: Decimal = Decimal("0.004")
    bracket_notional_cap: Decimal = Decimal("50000000")
    min_price: Decimal | None = None  # None: one tick
    max_price: Decimal = Decimal("10000000")
    multiplier_up: Decimal = Decimal("1.0500")
    multiplier_down: Decimal = Decimal("0.9500")
    max_num_orders: int = 200

    @property
    def quantity_precision(self) -> int:
        return decimals_of(self.step_size)

    @property
    def price_precision(self) -> int:
        if self.price_precision_override is not None:
            return self.price_precision_override
        return decimals_of(self.tick_size)

    @property
    def min_price_value(self) -> Decimal:
        return self.min_price if self.min_price is not None else self.tick_size

    def qty(self, value: Decimal) -> str:
        return fmt(value, self.quantity_precision)

    def price(self, value: Decimal) -> str:
        return fmt(value, self.price_precision)


def _spec(
    symbol: str,
    step: str,
    market_max: str,
    lot_max: str,
    notional: str,
    price: str,
    tick: str,
    *,
    price_precision: int | None = None,
    max_leverage: int = 75,
) -> SymbolSpec:
    return SymbolSpec(
        symbol=symbol,
        base_asset=symbol.removesuffix(QUOTE_ASSET),
        step_size=Decimal(step),
        min_qty=Decimal(step),
        max_qty=Decimal(lot_max),
        market_max_qty=Decimal(market_max),
        min_notional=Decimal(notional),
        start_price=Decimal(price),
        tick_size=Decimal(tick),
        price_precision_override=price_precision,
        max_leverage=max_leverage,
    )


DEFAULT_SYMBOLS: Final[tuple[SymbolSpec, ...]] = (
    # BTCUSDT really has pricePrecision 2 with a 0.10 tick; keep that quirk.
    _spec("BTCUSDT", "0.001", "120", "1000", "100", "60000", "0.10", price_precision=2, max_leverage=125),
    _spec("ETHUSDT", "0.001", "2000", "10000", "20", "3000", "0.01", max_leverage=125),
    _spec("SOLUSDT", "1", "5000", "1000000", "5", "150", "0.01"),
    _spec("BNBUSDT", "0.01", "1000", "100000", "5", "600", "0.01"),
    _spec("XRPUSDT", "0.1", "1000000", "10000000", "5", "0.6", "0.0001"),
)


def bench_symbols(count: int) -> tuple[SymbolSpec, ...]:
    """Synthetic markets for load runs (``qt bench``): one close per symbol is in flight at a time by design,
    so open-loop rates need many symbols. ``BENCH001USDT`` ...: price 10, step 1, min notional 5."""
    return tuple(
        _spec(f"BENCH{n:03d}USDT", "1", "1000000", "100000000", "5", "10", "0.001") for n in range(1, count + 1)
    )


@dataclass(slots=True)
class Position:
    symbol: str
    position_side: str  # BOTH, LONG or SHORT
    amt: Decimal = ZERO  # signed: > 0 long, < 0 short
    entry_price: Decimal = ZERO
    update_ms: int = 0


@dataclass(slots=True)
class Order:
    order_id: int
    symbol: str
    client_order_id: str
    side: str
    type: str
    time_in_force: str
    position_side: str
    reduce_only: bool
    orig_qty: Decimal
    price: Decimal
    time_ms: int
    update_ms: int
    status: str = "NEW"
    executed_qty: Decimal = ZERO
    cum_quote: Decimal = ZERO

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def avg_price(self) -> Decimal:
        return self.cum_quote / self.executed_qty if self.executed_qty else ZERO

    @property
    def remaining(self) -> Decimal:
        return self.orig_qty - self.executed_qty


@dataclass(frozen=True, slots=True)
class Trade:
    trade_id: int
    order_id: int
    symbol: str
    side: str
    position_side: str
    price: Decimal
    qty: Decimal
    realized_pnl: Decimal
    commission: Decimal
    time_ms: int
    maker: bool


@dataclass(slots=True)
class _Mark:
    raw: float  # unrounded walk state, so rounding never feeds back into the walk
    price: Decimal
    step_index: int
    rng: random.Random


@dataclass(slots=True)
class _Account:
    wallet: Decimal
    wallet_update_ms: int
    dual: bool = False
    leverage: dict[str, int] = field(default_factory=dict)


class Engine:
    """The exchange state. Every public method is atomic (one lock) and deterministic for (seed, clock)."""

    def __init__(
        self,
        symbols: Iterable[SymbolSpec] = DEFAULT_SYMBOLS,
        *,
        seed: int = 7,
        clock: Callable[[], float] = time.time,
        price_step_ms: int = 100,
        price_sigma: float = 0.0002,
        wallet: Decimal = Decimal("100000"),
        leverage: int = 20,
        fee_rate: Decimal = ZERO,
    ) -> None:
        if price_step_ms <= 0:
            raise ValueError("price_step_ms must be positive")
        self.specs: dict[str, SymbolSpec] = {spec.symbol: spec for spec in symbols}
        self.seed = seed
        self.clock = clock
        # The exchange's clock ahead of (+) or behind (-) the host's: lets tests skew time like a drifting NTP.
        self.clock_offset_ms = 0
        self.price_step_ms = price_step_ms
        self.price_sigma = price_sigma
        self.initial_wallet = wallet
        self.default_leverage = leverage
        self.fee_rate = fee_rate
        self._lock = threading.RLock()
        # Ids keep increasing across reset() so a client never sees one id name two orders.
        self._id_rng = random.Random(f"{seed}/ids")
        self._next_order_id = 4_000_000_000 + self._id_rng.randrange(1_000_000)
        self._next_trade_id = 300_000_000 + self._id_rng.randrange(1_000_000)
        self._reset_state()

    # ----------------------------------------------------------------------------------------- state

    def _reset_state(self) -> None:
        now = self.now_ms()
        self.account = _Account(wallet=self.initial_wallet, wallet_update_ms=now)
        self._marks: dict[str, _Mark] = {}
        for spec in self.specs.values():
            self._marks[spec.symbol] = _Mark(
                raw=float(spec.start_price),
                price=spec.start_price,
                step_index=now // self.price_step_ms,
                rng=random.Random(f"{self.seed}/{spec.symbol}"),
            )
        self._positions: dict[tuple[str, str], Position] = {}
        self._orders: dict[int, Order] = {}
        self._by_client_id: dict[tuple[str, str], list[int]] = {}
        self._open: dict[str, dict[int, Order]] = {symbol: {} for symbol in self.specs}
        self._trades: list[Trade] = []

    def reset(self) -> None:
        """Back to the initial wallet, flat positions, no orders, start prices, one-way mode."""
        with self._lock:
            self.clock_offset_ms = 0
            self._reset_state()

    @property
    def lock(self) -> threading.RLock:
        """Hold it to read several views as one consistent snapshot."""
        return self._lock

    def now_ms(self) -> int:
        # round, not truncate: 0.1 s steps of a float clock stay exact
        return round(self.clock() * 1000) + self.clock_offset_ms

    def spec(self, symbol: str) -> SymbolSpec:
        spec = self.specs.get(symbol)
        if spec is None:
            raise EngineError(-1121, "Invalid symbol.")
        return spec

    def symbol_param(self, params: Mapping[str, str]) -> SymbolSpec:
        return self.spec(require(params, "symbol"))

    @property
    def dual(self) -> bool:
        return self.account.dual

    def set_dual(self, dual: bool) -> None:
        """The admin switch: like ``change_position_mode`` but setting the current mode again is fine."""
        with self._lock:
            if dual != self.account.dual:
                self.change_position_mode(dual)

    def change_position_mode(self, dual: bool) -> None:
        """``POST /fapi/v1/positionSide/dual`` with Binance's refusals (positions never change side silently)."""
        with self._lock:
            if dual == self.account.dual:
                raise EngineError(-4059, "No need to change position side.")
            if any(orders for orders in self._open.values()):
                raise EngineError(-4067, "Position side cannot be changed if there exists open orders.")
            if any(p.amt for p in self._positions.values()):
                raise EngineError(-4068, "Position side cannot be changed if there exists position.")
            self.account.dual = dual

    def leverage(self, symbol: str) -> int:
        return self.account.leverage.get(symbol, min(self.default_leverage, self.spec(symbol).max_leverage))

    def set_leverage(self, symbol: str, leverage: int) -> int:
        with self._lock:
            spec = self.spec(symbol)
            if not 1 <= leverage <= spec.max_leverage:
                raise EngineError(-4028, f"Leverage {leverage} is not valid")
            self.account.leverage[symbol] = leverage
            return leverage

    @property
    def wallet(self) -> Decimal:
        return self.account.wallet

    def set_wallet(self, balance: Decimal) -> None:
        with self._lock:
            self.account.wallet = balance
            self.account.wallet_update_ms = self.now_ms()

    # ----------------------------------------------------------------------------------------- prices

    def mark_price(self, symbol: str) -> Decimal:
        """The current mark price, advancing the seeded walk to the clock first."""
        with self._lock:
            return self._mark(self.spec(symbol))

    def set_mark_price(self, symbol: str, price: Decimal) -> None:
        with self._lock:
            spec = self.spec(symbol)
            if price <= 0:
                raise ValueError("price must be positive")
            mark = self._marks[symbol]
            self._advance(spec, mark)  # consume elapsed steps so the walk restarts from this price now
            mark.raw = float(price)
            mark.price = self._round_to_tick(spec, price)
            self._match_resting(spec, mark.price)

    def _round_to_tick(self, spec: SymbolSpec, price: Decimal) -> Decimal:
        ticks = (price / spec.tick_size).to_integral_value(rounding=ROUND_HALF_UP)
        return max(ticks, ONE) * spec.tick_size

    def _advance(self, spec: SymbolSpec, mark: _Mark) -> bool:
        index = self.now_ms() // self.price_step_ms
        steps = index - mark.step_index
        if steps <= 0:
            return False
        mark.step_index = index
        if self.price_sigma <= 0:
            return False
        sigma, gauss, raw = self.price_sigma, mark.rng.gauss, mark.raw
        for _ in range(min(steps, _MAX_WALK_STEPS)):
            raw *= math.exp(sigma * gauss(0.0, 1.0))
        if steps > _MAX_WALK_STEPS:
            raw *= math.exp(sigma * math.sqrt(steps - _MAX_WALK_STEPS) * gauss(0.0, 1.0))
        mark.raw = raw
        new_price = self._round_to_tick(spec, Decimal(repr(raw)))
        changed = new_price != mark.price
        mark.price = new_price
        return changed

    def _mark(self, spec: SymbolSpec) -> Decimal:
        mark = self._marks[spec.symbol]
        if self._advance(spec, mark) and self._open[spec.symbol]:
            self._match_resting(spec, mark.price)
        return mark.price

    def prices(self) -> dict[str, Decimal]:
        with self._lock:
            return {symbol: self._mark(spec) for symbol, spec in self.specs.items()}

    # ----------------------------------------------------------------------------------------- positions

    def _position(self, symbol: str, position_side: str) -> Position:
        key = (symbol, position_side)
        position = self._positions.get(key)
        if position is None:
            position = self._positions[key] = Position(symbol, position_side)
        return position

    def set_position(
        self, symbol: str, amt: Decimal, entry_price: Decimal | None = None, position_side: str | None = None
    ) -> Position:
        """Set a position directly, as a change made outside the trading system would (no wallet effect)."""
        with self._lock:
            spec = self.spec(symbol)
            side = position_side or ("BOTH" if not self.account.dual else ("LONG" if amt >= 0 else "SHORT"))
            if side not in ("BOTH", "LONG", "SHORT"):
                raise ValueError(f"bad position side {side!r}")
            if (side == "LONG" and amt < 0) or (side == "SHORT" and amt > 0):
                raise ValueError(f"a {side} position cannot have amount {amt}")
            position = self._position(symbol, side)
            position.amt = amt
            position.entry_price = ZERO if not amt else (entry_price or self._mark(spec))
            position.update_ms = self.now_ms()
            return position

    def position_sides(self) -> tuple[str, ...]:
        return ("LONG", "SHORT") if self.account.dual else ("BOTH",)

    def positions(self, symbol: str | None = None, *, include_flat: bool = True) -> list[Position]:
        """Rows in symbol order for the current position mode (flat rows too unless ``include_flat`` is off)."""
        with self._lock:
            symbols = [self.spec(symbol).symbol] if symbol else list(self.specs)
            rows = []
            for sym in symbols:
                for side in self.position_sides():
                    position = self._positions.get((sym, side)) or Position(sym, side)
                    if include_flat or position.amt:
                        rows.append(position)
            return rows

    def unrealized_pnl(self, position: Position) -> Decimal:
        with self._lock:
            if not position.amt:
                return ZERO
            return position.amt * (self._mark(self.spec(position.symbol)) - position.entry_price)

    def _open_order_margin(self) -> Decimal:
        total = ZERO
        for orders in self._open.values():
            for order in orders.values():
                if not order.reduce_only:
                    total += order.remaining * order.price / self.leverage(order.symbol)
        return total

    def margin_summary(self) -> dict[str, Decimal]:
        """Cross-margin totals of the USDT account (Binance's account/balance fields)."""
        with self._lock:
            upnl = position_margin = maint = ZERO
            for position in self._positions.values():
                if not position.amt:
                    continue
                spec = self.spec(position.symbol)
                mark = self._mark(spec)
                notional = abs(position.amt) * mark
                upnl += position.amt * (mark - position.entry_price)
                position_margin += notional / self.leverage(position.symbol)
                maint += notional * spec.maint_margin_ratio
            order_margin = self._open_order_margin()
            wallet = self.account.wallet
            available = wallet + upnl - position_margin - order_margin
            return {
                "wallet": wallet,
                "unrealized": upnl,
                "margin_balance": wallet + upnl,
                "position_initial_margin": position_margin,
                "open_order_initial_margin": order_margin,
                "initial_margin": position_margin + order_margin,
                "maint_margin": maint,
                "available": available,
                "max_withdraw": max(ZERO, min(wallet, available)),
            }

    def cross_totals(self) -> tuple[Decimal, Decimal]:
        """Unrealized PnL and maintenance margin of all open positions (the cross-margin pool)."""
        with self._lock:
            upnl = maint = ZERO
            for position in self._positions.values():
                if position.amt:
                    own_upnl, own_maint = self._cross_share(position)
                    upnl += own_upnl
                    maint += own_maint
            return upnl, maint

    def _cross_share(self, position: Position) -> tuple[Decimal, Decimal]:
        spec = self.spec(position.symbol)
        mark = self._mark(spec)
        return position.amt * (mark - position.entry_price), abs(position.amt) * mark * spec.maint_margin_ratio

    def liquidation_price(self, position: Position, totals: tuple[Decimal, Decimal] | None = None) -> Decimal:
        """Binance's one-way cross formula for a single position; other positions' PnL and margin included.
        ``totals`` (from :meth:`cross_totals`) spares recomputing the pool for every row of one reply."""
        with self._lock:
            if not position.amt:
                return ZERO
            spec = self.spec(position.symbol)
            total_upnl, total_maint = totals if totals is not None else self.cross_totals()
            own_upnl, own_maint = self._cross_share(position)
            other_upnl, other_maint = total_upnl - own_upnl, total_maint - own_maint
            size, direction = abs(position.amt), (ONE if position.amt > 0 else -ONE)
            numerator = self.account.wallet - other_maint + other_upnl - direction * size * position.entry_price
            denominator = size * spec.maint_margin_ratio - direction * size
            price = numerator / denominator if denominator else ZERO
            return max(price, ZERO)

    # ----------------------------------------------------------------------------------------- orders

    def new_order(self, params: Mapping[str, str], *, fill_fraction: Decimal | None = None) -> Order:
        """``POST /fapi/v1/order`` from its Binance parameters (strings). ``fill_fraction`` (a fault) makes a
        MARKET order execute only that share of its quantity, rounded down to the step; the rest EXPIRES."""
        with self._lock:
            return self._new_order(params, fill_fraction)

    def _new_order(self, params: Mapping[str, str], fill_fraction: Decimal | None) -> Order:
        spec = self.symbol_param(params)
        side = require(params, "side")
        if side not in ("BUY", "SELL"):
            raise EngineError(-1117, "Invalid side.")
        order_type = require(params, "type")
        if order_type not in SUPPORTED_ORDER_TYPES:
            raise EngineError(-1116, "Invalid orderType.")
        position_side = self._check_position_side(params)
        reduce_only = bool(parse_bool(params, "reduceOnly"))
        if parse_bool(params, "closePosition"):
            raise not_required("closePosition")
        client_id = params.get("newClientOrderId")
        if client_id is not None and not _CLIENT_ID_RE.match(client_id):
            raise EngineError(
                -1100,
                f"Illegal characters found in parameter 'newClientOrderId'; legal range is '{CLIENT_ID_PATTERN}'.",
            )
        if params.get("newOrderRespType", "ACK") not in ("ACK", "RESULT"):
            raise not_valid("newOrderRespType")
        qty = self._check_quantity(spec, params, order_type)
        mark = self._mark(spec)
        if order_type == "LIMIT":
            time_in_force = require(params, "timeInForce")
            if time_in_force not in TIME_IN_FORCE:
                raise EngineError(-1115, "Invalid timeInForce.")
            price = self._check_price(spec, params, side, mark)
        else:
            if params.get("price") is not None:
                raise not_required("price")
            time_in_force, price = "GTC", ZERO
        if client_id is not None and any(
            self._orders[oid].is_open for oid in self._by_client_id.get((spec.symbol, client_id), ())
        ):
            raise EngineError(-4116, "ClientOrderId is duplicated.")
        reference = price if order_type == "LIMIT" else mark
        if not reduce_only and qty * reference < spec.min_notional:
            raise EngineError(
                -4164,
                f"Order's notional must be no smaller than {spec.min_notional} (unless you choose reduce only).",
            )
        position = self._position(spec.symbol, position_side)
        signed = qty if side == "BUY" else -qty
        closes = position_side != "BOTH" and (position_side == "LONG") != (side == "BUY")
        if reduce_only or closes:
            qty = self._reducible(spec, position, signed, qty, clamp=reduce_only)
        else:
            self._check_margin(spec, position, signed, reference)
        marketable = order_type == "MARKET" or (price >= mark if side == "BUY" else price <= mark)
        if time_in_force == "GTX" and marketable:
            raise EngineError(
                -5022,
                "Due to the order could not be executed as maker, the Post Only order will be rejected. "
                "The order will not be recorded in the order history",
            )
        if time_in_force == "FOK" and not marketable:
            raise EngineError(
                -5021,
                "Due to the order could not be filled immediately, the FOK order has been rejected. "
                "The order will not be recorded in the order history",
            )

        now = self.now_ms()
        order = Order(
            order_id=self._next_order_id,
            symbol=spec.symbol,
            client_order_id=client_id or self._generate_client_id(),
            side=side,
            type=order_type,
            time_in_force=time_in_force,
            position_side=position_side,
            reduce_only=reduce_only,
            orig_qty=qty,
            price=price,
            time_ms=now,
            update_ms=now,
        )
        self._next_order_id += 1
        self._orders[order.order_id] = order
        self._by_client_id.setdefault((spec.symbol, order.client_order_id), []).append(order.order_id)

        if marketable:
            fill_qty = qty if fill_fraction is None else floor_to_step(qty * fill_fraction, spec.step_size)
            if fill_qty:
                self._fill(spec, order, fill_qty, mark, maker=False)
            if order.executed_qty == order.orig_qty:
                order.status = "FILLED"
            elif order_type == "MARKET" or time_in_force != "GTC":
                order.status = "EXPIRED"  # the unfilled rest of an immediate order is not kept
            else:
                order.status = "PARTIALLY_FILLED" if order.executed_qty else "NEW"
                self._open[spec.symbol][order.order_id] = order
        elif time_in_force == "IOC":
            order.status = "EXPIRED"
        else:
            self._open[spec.symbol][order.order_id] = order
        return order

    def _check_position_side(self, params: Mapping[str, str]) -> str:
        position_side = params.get("positionSide", "BOTH")
        if position_side not in ("BOTH", "LONG", "SHORT"):
            raise not_valid("positionSide")
        if self.account.dual:
            if "reduceOnly" in params:
                raise not_required("reduceonly")
            if position_side == "BOTH":
                raise EngineError(-4061, "Order's position side does not match user's setting.")
        elif position_side != "BOTH":
            raise EngineError(-4061, "Order's position side does not match user's setting.")
        return position_side

    def _check_quantity(self, spec: SymbolSpec, params: Mapping[str, str], order_type: str) -> Decimal:
        qty = parse_decimal(params, "quantity")
        if qty <= 0:
            raise EngineError(-4003, "Quantity less than or equal to zero.")
        if qty % spec.step_size:
            raise EngineError(-1111, "Precision is over the maximum defined for this asset.")
        max_qty = spec.market_max_qty if order_type == "MARKET" else spec.max_qty
        if qty < spec.min_qty:
            raise EngineError(-4004, "Quantity less than min qty.")
        if qty > max_qty:
            raise EngineError(-4005, "Quantity greater than max qty.")
        return qty

    def _check_price(self, spec: SymbolSpec, params: Mapping[str, str], side: str, mark: Decimal) -> Decimal:
        price = parse_decimal(params, "price")
        if price <= 0:
            raise EngineError(-4001, "Price less than 0.")
        if price < spec.min_price_value:
            raise EngineError(-4013, "Price less than min price.")
        if price > spec.max_price:
            raise EngineError(-4002, "Price greater than max price.")
        if price % spec.tick_size:
            raise EngineError(-4014, "Price not increased by tick size.")
        if side == "BUY" and price > mark * spec.multiplier_up:
            limit = spec.price(mark * spec.multiplier_up)
            raise EngineError(-4016, f"Limit price can't be higher than {limit}.")
        if side == "SELL" and price < mark * spec.multiplier_down:
            limit = spec.price(mark * spec.multiplier_down)
            raise EngineError(-4024, f"Limit price can't be lower than {limit}.")
        return price

    def _reducible(
        self, spec: SymbolSpec, position: Position, signed: Decimal, qty: Decimal, *, clamp: bool
    ) -> Decimal:
        """The quantity a reducing order may trade: -2022 if it would not reduce, -4118 when open reduce-only
        orders already cover the position; a MARKET reduceOnly order larger than the rest is clamped."""
        if not position.amt or (position.amt > 0) == (signed > 0):
            raise EngineError(-2022, "ReduceOnly Order is rejected.")
        pending = sum(
            (
                o.remaining
                for o in self._open[spec.symbol].values()
                if o.position_side == position.position_side
                and (o.reduce_only or o.position_side != "BOTH")
                and (o.side == "BUY") == (signed > 0)
            ),
            ZERO,
        )
        available = abs(position.amt) - pending
        if available <= 0:
            raise EngineError(-4118, "ReduceOnly Order Failed. Please check your existing position and open orders.")
        if qty <= available:
            return qty
        if clamp:
            return available
        raise EngineError(-2022, "ReduceOnly Order is rejected.")

    def _check_margin(self, spec: SymbolSpec, position: Position, signed: Decimal, price: Decimal) -> None:
        # Only the part of the order that grows |position| needs initial margin.
        growth = abs(position.amt + signed) - abs(position.amt)
        if growth <= 0:
            return
        required = growth * price / self.leverage(spec.symbol)
        if required > self.margin_summary()["available"]:
            raise EngineError(-2019, "Margin is insufficient.")

    def _generate_client_id(self) -> str:
        return "".join(self._id_rng.choices(_ID_ALPHABET, k=22))

    def _fill(self, spec: SymbolSpec, order: Order, qty: Decimal, price: Decimal, *, maker: bool) -> None:
        now = self.now_ms()
        position = self._position(spec.symbol, order.position_side)
        signed = qty if order.side == "BUY" else -qty
        # Binance books PnL and fees in 8 decimals; so the wallet stays an exact sum of its entries.
        realized = self._apply_to_position(position, signed, price).quantize(_PNL_QUANT, rounding=ROUND_HALF_UP)
        commission = (qty * price * self.fee_rate).quantize(_PNL_QUANT, rounding=ROUND_HALF_UP)
        self.account.wallet += realized - commission
        self.account.wallet_update_ms = now
        position.update_ms = now
        order.executed_qty += qty
        order.cum_quote += qty * price
        order.update_ms = now
        self._trades.append(
            Trade(
                trade_id=self._next_trade_id,
                order_id=order.order_id,
                symbol=spec.symbol,
                side=order.side,
                position_side=order.position_side,
                price=price,
                qty=qty,
                realized_pnl=realized,
                commission=commission,
                time_ms=now,
                maker=maker,
            )
        )
        self._next_trade_id += 1

    @staticmethod
    def _apply_to_position(position: Position, signed: Decimal, price: Decimal) -> Decimal:
        """Move the position by ``signed`` at ``price``; returns the realised PnL."""
        amt = position.amt
        if not amt or (amt > 0) == (signed > 0):
            total = amt + signed
            position.entry_price = (abs(amt) * position.entry_price + abs(signed) * price) / abs(total)
            position.amt = total
            return ZERO
        closed = min(abs(signed), abs(amt))
        direction = ONE if amt > 0 else -ONE
        realized = closed * (price - position.entry_price) * direction
        total = amt + signed
        position.amt = total
        if not total:
            position.entry_price = ZERO
        elif (total > 0) != (amt > 0):
            position.entry_price = price  # flipped: the remainder opened at this fill
        return realized

    def _match_resting(self, spec: SymbolSpec, mark: Decimal) -> None:
        """Fill resting LIMIT orders the mark has crossed, at their own price."""
        book = self._open[spec.symbol]
        for order in sorted(book.values(), key=lambda o: o.order_id):
            crossed = mark <= order.price if order.side == "BUY" else mark >= order.price
            if not crossed:
                continue
            qty = order.remaining
            hedge_close = order.position_side != "BOTH" and (order.position_side == "LONG") != (order.side == "BUY")
            if order.reduce_only or hedge_close:
                # The position may have shrunk since the order was accepted: never flip it.
                amt = self._position(spec.symbol, order.position_side).amt
                reduces = amt and (amt > 0) != (order.side == "BUY")
                qty = min(qty, abs(amt)) if reduces else ZERO
            if qty:
                self._fill(spec, order, qty, order.price, maker=True)
            order.status = "FILLED" if order.executed_qty == order.orig_qty else "EXPIRED"
            del book[order.order_id]

    def _find(self, symbol: str, order_id: int | None, client_id: str | None) -> Order | None:
        if order_id is not None:
            order = self._orders.get(order_id)
            return order if order is not None and order.symbol == symbol else None
        if client_id is not None:
            ids = self._by_client_id.get((symbol, client_id))
            return self._orders[ids[-1]] if ids else None
        raise EngineError(-1102, "Param 'orderId' or 'origClientOrderId' must be sent, but both were empty/null!")

    def query_order(self, params: Mapping[str, str]) -> Order:
        """``GET /fapi/v1/order``: by orderId, else the most recent order with origClientOrderId."""
        with self._lock:
            spec = self.symbol_param(params)
            self._mark(spec)  # let resting orders catch up with the walk first
            order = self._find(spec.symbol, parse_int(params, "orderId"), params.get("origClientOrderId"))
            if order is None:
                raise EngineError(-2013, "Order does not exist.")
            return order

    def cancel_order(self, params: Mapping[str, str]) -> Order:
        """``DELETE /fapi/v1/order``: only an open order can be cancelled (-2011 otherwise)."""
        with self._lock:
            spec = self.symbol_param(params)
            self._mark(spec)
            order = self._find(spec.symbol, parse_int(params, "orderId"), params.get("origClientOrderId"))
            if order is None or not order.is_open:
                raise EngineError(-2011, "Unknown order sent.")
            order.status = "CANCELED"
            order.update_ms = self.now_ms()
            del self._open[spec.symbol][order.order_id]
            return order

    def cancel_all(self, symbol: str) -> int:
        with self._lock:
            spec = self.spec(symbol)
            book = self._open[spec.symbol]
            now = self.now_ms()
            for order in book.values():
                order.status, order.update_ms = "CANCELED", now
            count = len(book)
            book.clear()
            return count

    def open_orders(self, symbol: str | None = None) -> list[Order]:
        with self._lock:
            specs = [self.spec(symbol)] if symbol else list(self.specs.values())
            result: list[Order] = []
            for spec in specs:
                self._mark(spec)
                result.extend(sorted(self._open[spec.symbol].values(), key=lambda o: o.order_id))
            return result

    def orders(self, symbol: str | None = None) -> list[Order]:
        """Every order ever accepted (oldest first), optionally for one symbol."""
        with self._lock:
            return [o for o in self._orders.values() if symbol is None or o.symbol == symbol]

    def orders_by_client_id(self, symbol: str, client_id: str) -> list[Order]:
        with self._lock:
            return [self._orders[i] for i in self._by_client_id.get((symbol, client_id), ())]

    def trades(self, symbol: str | None = None, order_id: int | None = None) -> list[Trade]:
        with self._lock:
            return [
                t
                for t in self._trades
                if (symbol is None or t.symbol == symbol) and (order_id is None or t.order_id == order_id)
            ]

    def open_order_count(self) -> int:
        with self._lock:
            return sum(len(book) for book in self._open.values())
