"""The admin API under ``/_sim/`` (described in ``server.py``): its handlers and ``ADMIN_ROUTES``. Admin requests
are neither rate limited nor faulted; their errors are ``{"error": "..."}`` with HTTP 400."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any, Final

from starlette.requests import Request

from quantum_trader.exchange.sim import shapes
from quantum_trader.exchange.sim.engine import Engine
from quantum_trader.exchange.sim.faults import FaultRule
from quantum_trader.exchange.sim.params import EngineError, Json, fmt, plain
from quantum_trader.exchange.sim.records import Position
from quantum_trader.exchange.sim.state import SimState
from quantum_trader.exchange.sim.symbols import QUOTE_ASSET

ADMIN_HEADER: Final = "x-sim-admin-token"


class AdminError(ValueError):
    pass


def _field(data: Any, name: str, *, required: bool = True) -> Any:
    if not isinstance(data, dict):
        raise AdminError("body must be a JSON object")
    if required and data.get(name) is None:
        raise AdminError(f"{name} is required")
    return data.get(name)


def _decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise AdminError(f"{name} must be a number or a decimal string")
    result = Decimal(str(value))
    if not result.is_finite():
        raise AdminError(f"{name} must be finite")
    return result


def _position_row(engine: Engine, position: Position) -> Json:
    spec = engine.spec(position.symbol)
    return {
        "symbol": position.symbol,
        "positionSide": position.position_side,
        "positionAmt": spec.qty(position.amt),
        "entryPrice": plain(position.entry_price),
        "markPrice": spec.price(engine.mark_price(position.symbol)),
        "unRealizedProfit": fmt(engine.unrealized_pnl(position), 8),
        "updateTime": position.update_ms,
    }


def admin_state(state: SimState, request: Request, data: Any) -> Json:
    engine = state.engine
    margin = engine.margin_summary()
    return {
        "serverTime": engine.now_ms(),
        "dualSidePosition": engine.dual,
        "wallet": {
            "asset": QUOTE_ASSET,
            "balance": fmt(margin["wallet"], 8),
            "unrealizedProfit": fmt(margin["unrealized"], 8),
            "availableBalance": fmt(margin["available"], 8),
        },
        "positions": [_position_row(engine, p) for p in engine.positions(include_flat=False)],
        "prices": {symbol: engine.specs[symbol].price(price) for symbol, price in engine.prices().items()},
        "orders": {"total": len(engine.orders()), "open": engine.open_order_count()},
        "rateLimits": state.limiter.state(),
        "faults": state.faults.list(),
    }


def admin_orders(state: SimState, request: Request, data: Any) -> list[Json]:
    """Every order, oldest first; ``symbol`` and ``from_id`` (orderId at least) narrow it for long runs."""
    symbol = request.query_params.get("symbol")
    engine = state.engine
    if symbol:
        engine.spec(symbol)
    try:
        from_id = int(request.query_params.get("from_id", "0"))
    except ValueError:
        raise EngineError(-1102, "Parameter 'from_id' was not a valid integer.") from None
    orders = [o for o in engine.orders(symbol) if o.order_id >= from_id]
    return [shapes.order_json(engine, order, query=True) for order in orders]


def admin_reset(state: SimState, request: Request, data: Any) -> Json:
    state.reset()
    return {"ok": True}


def admin_position(state: SimState, request: Request, data: Any) -> Json:
    engine = state.engine
    spec = engine.spec(str(_field(data, "symbol")))
    amt = _decimal(_field(data, "amt"), "amt")
    if amt % spec.step_size:
        raise AdminError(f"amt must be a multiple of {spec.step_size}")
    entry = _field(data, "entry_price", required=False)
    side = _field(data, "position_side", required=False)
    position = engine.set_position(
        spec.symbol, amt, _decimal(entry, "entry_price") if entry is not None else None, side
    )
    return _position_row(engine, position)


def admin_price(state: SimState, request: Request, data: Any) -> Json:
    engine = state.engine
    spec = engine.spec(str(_field(data, "symbol")))
    engine.set_mark_price(spec.symbol, _decimal(_field(data, "price"), "price"))
    return {"symbol": spec.symbol, "markPrice": spec.price(engine.mark_price(spec.symbol))}


def admin_position_mode(state: SimState, request: Request, data: Any) -> Json:
    dual = _field(data, "dual")
    if not isinstance(dual, bool):
        raise AdminError("dual must be true or false")
    state.engine.set_dual(dual)
    return {"dualSidePosition": dual}


def admin_wallet(state: SimState, request: Request, data: Any) -> Json:
    state.engine.set_wallet(_decimal(_field(data, "balance"), "balance"))
    return {"asset": QUOTE_ASSET, "balance": fmt(state.engine.wallet, 8)}


def admin_clock(state: SimState, request: Request, data: Any) -> Json:
    offset = _field(data, "offset_ms")
    if not isinstance(offset, int) or isinstance(offset, bool) or abs(offset) > 86_400_000:
        raise AdminError("offset_ms must be an integer number of milliseconds within a day")
    state.engine.clock_offset_ms = offset
    return {"offset_ms": offset, "serverTime": state.engine.now_ms()}


def admin_add_fault(state: SimState, request: Request, data: Any) -> Json:
    rule = FaultRule.from_json(data)
    state.faults.add(rule)
    return rule.to_json()


def admin_list_faults(state: SimState, request: Request, data: Any) -> list[Json]:
    return state.faults.list()


def admin_clear_faults(state: SimState, request: Request, data: Any) -> Json:
    state.faults.clear()
    return {"ok": True}


def admin_late_executions(state: SimState, request: Request, data: Any) -> list[Json]:
    return [late.to_json() for late in state.late]


AdminHandler = Callable[[SimState, Request, Any], Any]


def admin_force_close(state: SimState, request: Request, data: Any) -> Json:
    """The exchange closes a position itself: a liquidation, or an auto-deleverage with ``"adl": true``."""
    engine = state.engine
    spec = engine.spec(str(_field(data, "symbol")))
    qty = _field(data, "qty", required=False)
    adl = _field(data, "adl", required=False) or False
    if not isinstance(adl, bool):
        raise AdminError("adl must be true or false")
    order = engine.force_close(spec.symbol, _decimal(qty, "qty") if qty is not None else None, adl=adl)
    return shapes.order_json(engine, order)


def admin_stream_fault(state: SimState, request: Request, data: Any) -> Json:
    """Arm a fault of the user-data stream (exchange/sim/stream.py StreamFault)."""
    kind = str(_field(data, "kind"))
    count, ms = _field(data, "count", required=False), _field(data, "ms", required=False)
    for name, value in (("count", count), ("ms", ms)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise AdminError(f"{name} must be an integer")
    try:
        fault = state.streams.arm(kind, count if count is not None else 1, ms or 0)
    except ValueError as exc:
        raise AdminError(str(exc)) from None
    return fault.describe()


def admin_stream_faults(state: SimState, request: Request, data: Any) -> Json:
    return {"faults": [fault.describe() for fault in state.streams.faults]}


def admin_clear_stream_faults(state: SimState, request: Request, data: Any) -> Json:
    state.streams.clear()
    return {"ok": True}


def admin_user_events(state: SimState, request: Request, data: Any) -> Json:
    """The user-data stream's events numbered above ``?after=N`` (oldest first) and the newest number: what the
    stream's WebSocket will push (issue 22), readable before it exists."""
    try:
        after = int(request.query_params.get("after", "0"))
    except ValueError:
        raise AdminError("after must be an integer") from None
    events, last = state.engine.user_events(after)
    return {"events": [{"n": n, "event": event} for n, event in events], "last": last}


ADMIN_ROUTES: Final[dict[tuple[str, str], AdminHandler]] = {
    ("GET", "/_sim/state"): admin_state,
    ("GET", "/_sim/orders"): admin_orders,
    ("GET", "/_sim/user-events"): admin_user_events,
    ("POST", "/_sim/force-close"): admin_force_close,
    ("POST", "/_sim/stream-faults"): admin_stream_fault,
    ("GET", "/_sim/stream-faults"): admin_stream_faults,
    ("DELETE", "/_sim/stream-faults"): admin_clear_stream_faults,
    ("POST", "/_sim/reset"): admin_reset,
    ("POST", "/_sim/position"): admin_position,
    ("POST", "/_sim/price"): admin_price,
    ("POST", "/_sim/position-mode"): admin_position_mode,
    ("POST", "/_sim/wallet"): admin_wallet,
    ("POST", "/_sim/clock"): admin_clock,
    ("POST", "/_sim/faults"): admin_add_fault,
    ("GET", "/_sim/faults"): admin_list_faults,
    ("DELETE", "/_sim/faults"): admin_clear_faults,
    ("GET", "/_sim/late"): admin_late_executions,
}
