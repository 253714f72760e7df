"""Executions: a fill moves the position, books realised PnL and the fee into the wallet and records a trade;
resting LIMIT orders fill at their own price once the mark crosses it."""

from __future__ import annotations

from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Final

from quantum_trader.exchange.sim import userdata
from quantum_trader.exchange.sim.params import ONE, ZERO, Json
from quantum_trader.exchange.sim.records import EngineState, Order, Position, Trade
from quantum_trader.exchange.sim.symbols import SymbolSpec

_PNL_QUANT: Final = Decimal("0.00000001")


class Fills(EngineState):
    """The engine's executions (the part the price walk calls when the mark moves)."""

    account_update_first = False  # SimConfig.account_update_first: a fill's two events in the other order

    def _position(self, symbol: str, position_side: str) -> Position:
        key = (symbol, position_side)
        position = self._positions.get(key)
        if position is None:
            position = self._positions[key] = Position(symbol, position_side)
        return position

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
        # the trade's events: X is the status the fill leaves (the caller may then expire an immediate rest)
        order.status = "FILLED" if order.executed_qty == order.orig_qty else "PARTIALLY_FILLED"
        if not self.account_update_first:
            self._order_event(spec, order, "TRADE", self._trades[-1])
        unrealized = position.amt * (price - position.entry_price) if position.amt else ZERO
        self._emit(
            userdata.account_update(
                "ORDER", now, now, self.account.wallet,
                [(position, unrealized, spec.price_precision, spec.quantity_precision)],
            )
        )  # fmt: skip
        if self.account_update_first:
            self._order_event(spec, order, "TRADE", self._trades[-1])

    def _order_event(self, spec: SymbolSpec, order: Order, execution: str, trade: Trade | None = None) -> None:
        self._emit(
            userdata.order_trade_update(
                order, execution, self.now_ms(), trade,
                price_places=spec.price_precision, qty_places=spec.quantity_precision,
            )
        )  # fmt: skip

    def _emit(self, event: Json) -> None:
        """One user-data event, in order (under the engine's lock, like everything that makes one). Its event time
        ``E`` never goes back (Binance orders a connection's events by it): the host's clock may."""
        event["E"] = self._user_event_ms = max(int(event["E"]), self._user_event_ms)
        self._user_event_count += 1
        self._user_events.append((self._user_event_count, event))
        for listener in self._user_event_listeners:
            listener(self._user_event_count, event)

    def add_user_event_listener(self, listener: Callable[[int, Json], None]) -> None:
        """``listener(number, event)`` for every event from now on (called under the engine's lock)."""
        with self._lock:
            self._user_event_listeners.append(listener)

    def user_events(self, after: int = 0) -> tuple[list[tuple[int, Json]], int]:
        """The kept events numbered above ``after``, oldest first, and the number of the newest."""
        with self._lock:
            return [(n, e) for n, e in self._user_events if n > after], self._user_event_count

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
            if order.status == "EXPIRED":
                self._order_event(spec, order, "EXPIRED")
            del book[order.order_id]
