"""New orders: ``POST /fapi/v1/order`` checked in Binance's order, then executed at once or rested.

The checks, in the order Binance makes them (a request with several faults gets the first one's code): symbol
(-1102/-1121), side (-1117), type (-1116), positionSide against the account's position mode (-4061;
``reduceOnly`` in hedge mode is -1106), newClientOrderId pattern (-1100), quantity (-1102 malformed, -4003 <= 0,
-1111 not a multiple of stepSize, -4004/-4005 against MARKET_LOT_SIZE for MARKET and LOT_SIZE for LIMIT), price
filters for LIMIT (-4001/-4013/-4002/-4014/-4016/-4024), -4116 only while an OPEN order carries the same
clientOrderId, MIN_NOTIONAL (-4164, waived for reduceOnly), reduceOnly (-2022 when the position is flat or on
the order's side, -4118 when open reduce-only orders already cover the position; in hedge mode an order closing
more than its side holds is -2022), margin (-2019, never for orders that only reduce), then -5022/-5021.

A MARKET order fills at once at the mark price and is never open: re-sending its clientOrderId creates a SECOND
order. A LIMIT order that crosses the mark fills at once at the mark; a resting one fills at its price when the
walk crosses it (``fills.py``). A reduceOnly order larger than the reducible position is accepted for that size
only: like Binance, its origQty is lowered to it, so a MARKET one ends FILLED with executedQty = |position|.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from quantum_trader.exchange.sim.accounts import Accounts
from quantum_trader.exchange.sim.params import (
    ZERO,
    EngineError,
    not_required,
    not_valid,
    parse_bool,
    parse_decimal,
    require,
)
from quantum_trader.exchange.sim.records import Order, Position
from quantum_trader.exchange.sim.symbols import SymbolSpec, floor_to_step

CLIENT_ID_PATTERN: Final = r"^[\.A-Z\:/a-z0-9_\-]{1,36}$"
_CLIENT_ID_RE: Final = re.compile(CLIENT_ID_PATTERN)
_ID_ALPHABET: Final = string.ascii_letters + string.digits
# Every type Binance's order endpoint knows; only MARKET and LIMIT are simulated.
KNOWN_ORDER_TYPES: Final = frozenset(
    {"LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"}
)
SUPPORTED_ORDER_TYPES: Final = ("LIMIT", "MARKET")
TIME_IN_FORCE: Final = ("GTC", "IOC", "FOK", "GTX")


@dataclass(frozen=True, slots=True)
class _Request:
    """A new order's own fields, checked before the mark price is read."""

    spec: SymbolSpec
    side: str
    order_type: str
    position_side: str
    reduce_only: bool
    client_id: str | None
    qty: Decimal


class Orders(Accounts):
    """The engine's orders (on top of its account, which they are checked against)."""

    def new_order(self, params: Mapping[str, str], *, fill_fraction: Decimal | None = None) -> Order:
        """``POST /fapi/v1/order`` from its Binance parameters (strings). ``fill_fraction`` (a fault) makes a
        MARKET order execute only that share of its quantity, rounded down to the step; the rest EXPIRES."""
        with self._lock:
            return self._new_order(params, fill_fraction)

    def _new_order(self, params: Mapping[str, str], fill_fraction: Decimal | None) -> Order:
        # Each step raises the first of its refusals; their order is Binance's (see the module's docstring).
        request = self._check_request(params)
        spec = request.spec
        mark = self._mark(spec)
        time_in_force, price = self._check_terms(request, params, mark)
        self._check_duplicate(spec, request.client_id)
        reference = price if request.order_type == "LIMIT" else mark
        self._check_min_notional(request, reference)
        qty = self._check_position(request, reference)
        marketable = request.order_type == "MARKET" or (price >= mark if request.side == "BUY" else price <= mark)
        _check_time_in_force(time_in_force, marketable)
        order = self._record(request, qty, time_in_force, price)
        self._execute(spec, order, mark, marketable, fill_fraction)
        return order

    def _check_request(self, params: Mapping[str, str]) -> _Request:
        """Symbol, side, type, positionSide, reduceOnly/closePosition, client id, response type, quantity."""
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
        qty = _check_quantity(spec, params, order_type)
        return _Request(spec, side, order_type, position_side, reduce_only, client_id, qty)

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

    @staticmethod
    def _check_terms(request: _Request, params: Mapping[str, str], mark: Decimal) -> tuple[str, Decimal]:
        """timeInForce and price: both required for LIMIT; MARKET takes no price."""
        if request.order_type == "LIMIT":
            time_in_force = require(params, "timeInForce")
            if time_in_force not in TIME_IN_FORCE:
                raise EngineError(-1115, "Invalid timeInForce.")
            return time_in_force, _check_price(request.spec, params, request.side, mark)
        if params.get("price") is not None:
            raise not_required("price")
        return "GTC", ZERO

    def _check_duplicate(self, spec: SymbolSpec, client_id: str | None) -> None:
        if client_id is not None and any(
            self._orders[oid].is_open for oid in self._by_client_id.get((spec.symbol, client_id), ())
        ):
            raise EngineError(-4116, "ClientOrderId is duplicated.")

    @staticmethod
    def _check_min_notional(request: _Request, reference: Decimal) -> None:
        spec = request.spec
        if not request.reduce_only and request.qty * reference < spec.min_notional:
            raise EngineError(
                -4164,
                f"Order's notional must be no smaller than {spec.min_notional} (unless you choose reduce only).",
            )

    def _check_position(self, request: _Request, reference: Decimal) -> Decimal:
        """The quantity the order may trade: a reducing order against the position, any other against margin."""
        spec, side, position_side, qty = request.spec, request.side, request.position_side, request.qty
        position = self._position(spec.symbol, position_side)
        signed = qty if side == "BUY" else -qty
        closes = position_side != "BOTH" and (position_side == "LONG") != (side == "BUY")
        if request.reduce_only or closes:
            qty = self._reducible(spec, position, signed, qty, clamp=request.reduce_only)
        else:
            self._check_margin(spec, position, signed, reference)
        return qty

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

    def _record(self, request: _Request, qty: Decimal, time_in_force: str, price: Decimal) -> Order:
        """The accepted order, with its id, in the order history."""
        return self._accept(
            request.spec,
            client_id=request.client_id or self._generate_client_id(),
            side=request.side,
            order_type=request.order_type,
            time_in_force=time_in_force,
            position_side=request.position_side,
            reduce_only=request.reduce_only,
            qty=qty,
            price=price,
        )

    def _accept(
        self,
        spec: SymbolSpec,
        *,
        client_id: str,
        side: str,
        order_type: str,
        time_in_force: str,
        position_side: str,
        reduce_only: bool,
        qty: Decimal,
        price: Decimal,
    ) -> Order:
        """An order the exchange accepted (its id taken), in the history, announced on the user-data stream."""
        now = self.now_ms()
        order = Order(
            order_id=self._next_order_id,
            symbol=spec.symbol,
            client_order_id=client_id,
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
        self._order_event(spec, order, "NEW")
        return order

    def force_close(self, symbol: str, qty: Decimal | None = None, *, adl: bool = False) -> Order:
        """The exchange closes (part of) a position itself, as a liquidation (client id ``autoclose-<ms>``) or an
        auto-deleverage (``adl_autoclose``) does: a reduce-only order at the mark, filled at once, with its
        user-data events. A close the trading system did not make, on purpose."""
        with self._lock:
            spec = self.spec(symbol)
            position = next((p for p in self.positions(symbol, include_flat=False)), None)
            if position is None:
                raise EngineError(-2022, "ReduceOnly Order is rejected.")
            size = abs(position.amt)
            qty = size if qty is None else min(qty, size)
            mark = self._mark(spec)
            order = self._accept(
                spec,
                client_id="adl_autoclose" if adl else f"autoclose-{self.now_ms()}",
                side="SELL" if position.amt > 0 else "BUY",
                order_type="LIQUIDATION",
                time_in_force="IOC",
                position_side=position.position_side,
                reduce_only=True,
                qty=qty,
                price=mark,
            )
            self._fill(spec, order, qty, mark, maker=False)
            return order

    def _generate_client_id(self) -> str:
        return "".join(self._id_rng.choices(_ID_ALPHABET, k=22))

    def _execute(
        self, spec: SymbolSpec, order: Order, mark: Decimal, marketable: bool, fill_fraction: Decimal | None
    ) -> None:
        """Fill a marketable order at the mark (the unfilled rest of an immediate one expires); rest the others."""
        qty = order.orig_qty
        if marketable:
            fill_qty = qty if fill_fraction is None else floor_to_step(qty * fill_fraction, spec.step_size)
            if fill_qty:
                self._fill(spec, order, fill_qty, mark, maker=False)
            if order.executed_qty == order.orig_qty:
                order.status = "FILLED"
            elif order.type == "MARKET" or order.time_in_force != "GTC":
                order.status = "EXPIRED"  # the unfilled rest of an immediate order is not kept
                self._order_event(spec, order, "EXPIRED")
            else:
                order.status = "PARTIALLY_FILLED" if order.executed_qty else "NEW"
                self._open[spec.symbol][order.order_id] = order
        elif order.time_in_force == "IOC":
            order.status = "EXPIRED"
            self._order_event(spec, order, "EXPIRED")
        else:
            self._open[spec.symbol][order.order_id] = order


def _check_quantity(spec: SymbolSpec, params: Mapping[str, str], order_type: str) -> Decimal:
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


def _check_price(spec: SymbolSpec, params: Mapping[str, str], side: str, mark: Decimal) -> Decimal:
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


def _check_time_in_force(time_in_force: str, marketable: bool) -> None:
    """Post-only (GTX) that would take and fill-or-kill (FOK) that would rest: refused and never recorded."""
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
