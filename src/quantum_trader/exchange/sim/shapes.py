"""Binance's JSON shapes of the engine's state: orders, trades, positions, account, balance, exchangeInfo.

Numbers are strings formatted as Binance prints them: quantities with the symbol's quantityPrecision, prices with
its pricePrecision, wallet and PnL figures with 8 decimals, entry prices trimmed (``"60000.1"``, ``"0.0"``).
"""

from __future__ import annotations

from decimal import Decimal

from quantum_trader.exchange.sim.engine import Engine
from quantum_trader.exchange.sim.orders import SUPPORTED_ORDER_TYPES, TIME_IN_FORCE
from quantum_trader.exchange.sim.params import ONE, ZERO, Json, fmt, plain
from quantum_trader.exchange.sim.records import Order, Position, Trade
from quantum_trader.exchange.sim.symbols import QUOTE_ASSET, SymbolSpec


def order_json(engine: Engine, order: Order, *, ack: bool = False, query: bool = False) -> Json:
    """An order as ``POST/DELETE /fapi/v1/order`` (``query=False``) or ``GET`` (``query=True``) return it.
    ``ack`` is the newOrderRespType=ACK view: the order as accepted, before any execution."""
    spec = engine.spec(order.symbol)
    pp, qp = spec.price_precision, spec.quantity_precision
    executed = ZERO if ack else order.executed_qty
    cum_quote = ZERO if ack else order.cum_quote
    avg = ZERO if ack else order.avg_price
    body: Json = {
        "orderId": order.order_id,
        "symbol": order.symbol,
        "status": "NEW" if ack else order.status,
        "clientOrderId": order.client_order_id,
        "price": spec.price(order.price),
        "avgPrice": fmt(avg, max(pp, 5)),
        "origQty": spec.qty(order.orig_qty),
        "executedQty": spec.qty(executed),
    }
    if not query:
        body["cumQty"] = spec.qty(executed)
    body.update(
        {
            "cumQuote": fmt(cum_quote, max(pp + qp, 5)),
            "timeInForce": order.time_in_force,
            "type": order.type,
            "reduceOnly": order.reduce_only,
            "closePosition": False,
            "side": order.side,
            "positionSide": order.position_side,
            "stopPrice": spec.price(ZERO),
            "workingType": "CONTRACT_PRICE",
            "priceProtect": False,
            "origType": order.type,
            "priceMatch": "NONE",
            "selfTradePreventionMode": "EXPIRE_MAKER",
            "goodTillDate": 0,
        }
    )
    if query:
        body["time"] = order.time_ms
    body["updateTime"] = order.time_ms if ack else order.update_ms
    return body


def trade_json(engine: Engine, trade: Trade) -> Json:
    spec = engine.spec(trade.symbol)
    return {
        "buyer": trade.side == "BUY",
        "commission": fmt(trade.commission, 8),
        "commissionAsset": QUOTE_ASSET,
        "id": trade.trade_id,
        "maker": trade.maker,
        "orderId": trade.order_id,
        "price": spec.price(trade.price),
        "qty": spec.qty(trade.qty),
        "quoteQty": fmt(trade.qty * trade.price, max(spec.price_precision + spec.quantity_precision, 5)),
        "realizedPnl": fmt(trade.realized_pnl, 8),
        "side": trade.side,
        "positionSide": trade.position_side,
        "symbol": trade.symbol,
        "time": trade.time_ms,
    }


def break_even_price(engine: Engine, position: Position) -> Decimal:
    """The price at which closing pays back the opening fee (and the closing one)."""
    if not position.amt:
        return ZERO
    fees = engine.fee_rate * 2
    return position.entry_price * (ONE + fees if position.amt > 0 else ONE - fees)


def position_risk_json(
    engine: Engine, position: Position, *, version: int, totals: tuple[Decimal, Decimal] | None = None
) -> Json:
    """One row of ``GET /fapi/v2/positionRisk`` (``version=2``) or ``/fapi/v3/positionRisk`` (``version=3``);
    ``totals`` is the cross-margin pool (``Engine.cross_totals``), computed once per reply."""
    spec = engine.spec(position.symbol)
    mark = engine.mark_price(position.symbol)
    notional = position.amt * mark
    leverage = engine.leverage(position.symbol)
    entry = plain(position.entry_price)
    common: Json = {
        "symbol": position.symbol,
        "positionSide": position.position_side,
        "positionAmt": spec.qty(position.amt),
        "entryPrice": entry,
        "breakEvenPrice": plain(break_even_price(engine, position)),
        "markPrice": fmt(mark, 8),
        "unRealizedProfit": fmt(engine.unrealized_pnl(position), 8),
        "liquidationPrice": plain(engine.liquidation_price(position, totals)) if position.amt else "0",
        "isolatedMargin": "0.00000000",
        "notional": plain(notional) if position.amt else "0",
        "isolatedWallet": "0",
        "updateTime": position.update_ms,
    }
    if version == 2:
        common.update(
            {
                "leverage": str(leverage),
                "maxNotionalValue": plain(spec.bracket_notional_cap),
                "marginType": "cross",
                "isAutoAddMargin": "false",
            }
        )
        return common
    initial = abs(notional) / leverage
    common.update(
        {
            "marginAsset": QUOTE_ASSET,
            "initialMargin": fmt(initial, 8),
            "maintMargin": fmt(abs(notional) * spec.maint_margin_ratio, 8),
            "positionInitialMargin": fmt(initial, 8),
            "openOrderInitialMargin": "0",
            "adl": 0,
            "bidNotional": "0",
            "askNotional": "0",
        }
    )
    return common


def balance_json(engine: Engine) -> list[Json]:
    """``GET /fapi/v2/balance`` and ``/fapi/v3/balance``."""
    m = engine.margin_summary()
    return [
        {
            "accountAlias": "SgsRmYFzAuXq",
            "asset": QUOTE_ASSET,
            "balance": fmt(m["wallet"], 8),
            "crossWalletBalance": fmt(m["wallet"], 8),
            "crossUnPnl": fmt(m["unrealized"], 8),
            "availableBalance": fmt(m["available"], 8),
            "maxWithdrawAmount": fmt(m["max_withdraw"], 8),
            "marginAvailable": True,
            "updateTime": engine.account.wallet_update_ms,
        }
    ]


def account_json(engine: Engine, *, version: int) -> Json:
    """``GET /fapi/v2/account`` (every symbol's position) or ``/fapi/v3/account`` (non-zero positions only)."""
    m = engine.margin_summary()
    totals = _account_totals(m)
    asset = _account_asset(engine, m, version=version)
    positions = [_account_position(engine, p, version=version) for p in engine.positions(include_flat=version == 2)]
    head: Json = {}
    if version == 2:
        head = {
            "feeTier": 0,
            "feeBurn": True,
            "canTrade": True,
            "canDeposit": True,
            "canWithdraw": True,
            "updateTime": 0,
            "multiAssetsMargin": False,
            "tradeGroupId": -1,
        }
    return {**head, **totals, "assets": [asset], "positions": positions}


def _account_totals(m: dict[str, Decimal]) -> Json:
    return {
        "totalInitialMargin": fmt(m["initial_margin"], 8),
        "totalMaintMargin": fmt(m["maint_margin"], 8),
        "totalWalletBalance": fmt(m["wallet"], 8),
        "totalUnrealizedProfit": fmt(m["unrealized"], 8),
        "totalMarginBalance": fmt(m["margin_balance"], 8),
        "totalPositionInitialMargin": fmt(m["position_initial_margin"], 8),
        "totalOpenOrderInitialMargin": fmt(m["open_order_initial_margin"], 8),
        "totalCrossWalletBalance": fmt(m["wallet"], 8),
        "totalCrossUnPnl": fmt(m["unrealized"], 8),
        "availableBalance": fmt(m["available"], 8),
        "maxWithdrawAmount": fmt(m["max_withdraw"], 8),
    }


def _account_asset(engine: Engine, m: dict[str, Decimal], *, version: int) -> Json:
    asset: Json = {
        "asset": QUOTE_ASSET,
        "walletBalance": fmt(m["wallet"], 8),
        "unrealizedProfit": fmt(m["unrealized"], 8),
        "marginBalance": fmt(m["margin_balance"], 8),
        "maintMargin": fmt(m["maint_margin"], 8),
        "initialMargin": fmt(m["initial_margin"], 8),
        "positionInitialMargin": fmt(m["position_initial_margin"], 8),
        "openOrderInitialMargin": fmt(m["open_order_initial_margin"], 8),
        "crossWalletBalance": fmt(m["wallet"], 8),
        "crossUnPnl": fmt(m["unrealized"], 8),
        "availableBalance": fmt(m["available"], 8),
        "maxWithdrawAmount": fmt(m["max_withdraw"], 8),
    }
    if version == 2:
        asset["marginAvailable"] = True
    asset["updateTime"] = engine.account.wallet_update_ms
    return asset


def _account_position(engine: Engine, position: Position, *, version: int) -> Json:
    spec = engine.spec(position.symbol)
    mark = engine.mark_price(position.symbol)
    notional = abs(position.amt) * mark
    initial = notional / engine.leverage(position.symbol)
    row: Json = {
        "symbol": position.symbol,
        "positionSide": position.position_side,
        "positionAmt": spec.qty(position.amt),
        "unrealizedProfit": fmt(engine.unrealized_pnl(position), 8),
        "initialMargin": fmt(initial, 8),
        "maintMargin": fmt(notional * spec.maint_margin_ratio, 8),
        "positionInitialMargin": fmt(initial, 8),
        "openOrderInitialMargin": "0",
        "updateTime": position.update_ms,
    }
    if version == 2:
        row.update(
            {
                "leverage": str(engine.leverage(position.symbol)),
                "isolated": False,
                "entryPrice": plain(position.entry_price),
                "breakEvenPrice": plain(break_even_price(engine, position)),
                "maxNotional": plain(spec.bracket_notional_cap),
                "bidNotional": "0",
                "askNotional": "0",
            }
        )
    else:
        row.update({"isolatedMargin": "0.00000000", "notional": plain(position.amt * mark), "isolatedWallet": "0"})
    return row


def symbol_info_json(spec: SymbolSpec) -> Json:
    """One ``symbols[]`` entry of ``GET /fapi/v1/exchangeInfo``."""
    return {
        "symbol": spec.symbol,
        "pair": spec.symbol,
        "contractType": "PERPETUAL",
        "deliveryDate": 4133404800000,
        "onboardDate": 1569398400000,
        "status": "TRADING",
        "maintMarginPercent": "2.5000",
        "requiredMarginPercent": "5.0000",
        "baseAsset": spec.base_asset,
        "quoteAsset": QUOTE_ASSET,
        "marginAsset": QUOTE_ASSET,
        "pricePrecision": spec.price_precision,
        "quantityPrecision": spec.quantity_precision,
        "baseAssetPrecision": 8,
        "quotePrecision": 8,
        "underlyingType": "COIN",
        "underlyingSubType": [],
        "settlePlan": 0,
        "triggerProtect": "0.0500",
        "liquidationFee": "0.012500",
        "marketTakeBound": "0.05",
        "maxMoveOrderLimit": 10000,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": f"{spec.min_price_value:f}",
                "maxPrice": f"{spec.max_price:f}",
                "tickSize": f"{spec.tick_size:f}",
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": f"{spec.min_qty:f}",
                "maxQty": f"{spec.max_qty:f}",
                "stepSize": f"{spec.step_size:f}",
            },
            {
                "filterType": "MARKET_LOT_SIZE",
                "minQty": f"{spec.min_qty:f}",
                "maxQty": f"{spec.market_max_qty:f}",
                "stepSize": f"{spec.step_size:f}",
            },
            {"filterType": "MAX_NUM_ORDERS", "limit": spec.max_num_orders},
            {"filterType": "MAX_NUM_ALGO_ORDERS", "limit": 10},
            {"filterType": "MIN_NOTIONAL", "notional": f"{spec.min_notional:f}"},
            {
                "filterType": "PERCENT_PRICE",
                "multiplierUp": f"{spec.multiplier_up:f}",
                "multiplierDown": f"{spec.multiplier_down:f}",
                "multiplierDecimal": "4",
            },
        ],
        "orderTypes": list(SUPPORTED_ORDER_TYPES),
        "timeInForce": list(TIME_IN_FORCE),
        "permissionSets": ["GRID", "COPY"],
    }


def leverage_bracket_json(spec: SymbolSpec) -> Json:
    return {
        "symbol": spec.symbol,
        "notionalCoef": 1.0,
        "brackets": [
            {
                "bracket": 1,
                "initialLeverage": spec.max_leverage,
                "notionalCap": int(spec.bracket_notional_cap),
                "notionalFloor": 0,
                "maintMarginRatio": float(spec.maint_margin_ratio),
                "cum": 0.0,
            }
        ],
    }
