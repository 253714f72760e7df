"""The order history and the open orders: ``GET /fapi/v1/order`` (by orderId, else the most recent order with
origClientOrderId), ``DELETE /fapi/v1/order``, cancel all, and the lists behind openOrders, allOrders and
userTrades. Query, cancel and openOrders let resting orders catch up with the price walk first."""

from __future__ import annotations

from collections.abc import Mapping

from quantum_trader.exchange.sim.params import EngineError, parse_int
from quantum_trader.exchange.sim.prices import Prices
from quantum_trader.exchange.sim.records import Order, Trade


class Book(Prices):
    """The engine's orders once accepted: find, cancel, list (on top of its prices, which fill resting ones)."""

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
            self._order_event(spec, order, "CANCELED")
            return order

    def cancel_all(self, symbol: str) -> int:
        with self._lock:
            spec = self.spec(symbol)
            book = self._open[spec.symbol]
            now = self.now_ms()
            for order in book.values():
                order.status, order.update_ms = "CANCELED", now
                self._order_event(spec, order, "CANCELED")
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
