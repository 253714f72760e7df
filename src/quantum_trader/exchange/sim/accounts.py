"""The USDT account: position mode, leverage, wallet, positions, and the cross-margin figures over them
(available balance, maintenance margin, liquidation price).

One-way mode: one signed position per symbol (positionSide BOTH). Hedge mode (admin switch or
``POST /fapi/v1/positionSide/dual``, both refused with -4068/-4067 while positions or open orders exist): LONG
and SHORT positions, shown as two rows per symbol. Cross margin only, one leverage bracket per symbol;
liquidationPrice uses Binance's single-position cross formula with that bracket.
"""

from __future__ import annotations

from decimal import Decimal

from quantum_trader.exchange.sim import userdata
from quantum_trader.exchange.sim.params import ONE, ZERO, EngineError
from quantum_trader.exchange.sim.prices import Prices
from quantum_trader.exchange.sim.records import Position


class Accounts(Prices):
    """The engine's account and positions (on top of its prices, which value them)."""

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

    # ----------------------------------------------------------------------------------------- positions

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
            position.update_ms = now = self.now_ms()
            unrealized = self.unrealized_pnl(position)
            update = userdata.account_update(
                "ADJUSTMENT", now, now, self.account.wallet,
                [(position, unrealized, spec.price_precision, spec.quantity_precision)],
            )  # fmt: skip
            self._emit(update)
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

    # ----------------------------------------------------------------------------------------- margin

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
