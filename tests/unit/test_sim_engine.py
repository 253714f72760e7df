"""The simulated exchange's rules, straight on the Engine (no HTTP)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantum_trader.exchange.sim.engine import Engine, EngineError, Json
from quantum_trader.exchange.sim.shapes import (
    account_json,
    balance_json,
    order_json,
    position_risk_json,
    symbol_info_json,
)

D = Decimal
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> Engine:
    # A still market: every MARKET order fills at the start price.
    return Engine(clock=clock, price_sigma=0.0)


def order(engine: Engine, symbol: str = "BTCUSDT", side: str = "BUY", qty: str = "0.010", **extra: str) -> Json:
    params = {"symbol": symbol, "side": side, "type": "MARKET", "quantity": qty, **extra}
    return order_json(engine, engine.new_order(params))


def reject(engine: Engine, params: dict[str, str]) -> EngineError:
    with pytest.raises(EngineError) as info:
        engine.new_order(params)
    return info.value


def market(symbol: str = "BTCUSDT", side: str = "BUY", qty: str = "0.010", **extra: str) -> dict[str, str]:
    return {"symbol": symbol, "side": side, "type": "MARKET", "quantity": qty, **extra}


def position_amt(engine: Engine, symbol: str = "BTCUSDT") -> Decimal:
    return engine.positions(symbol)[0].amt


# ------------------------------------------------------------------------------------------------ fills


def test_market_order_fills_at_mark_and_opens_position(engine: Engine) -> None:
    body = order(engine, qty="0.010")
    assert body["status"] == "FILLED"
    assert body["executedQty"] == "0.010"
    assert body["avgPrice"] == "60000.00000"
    assert body["cumQuote"] == "600.00000"
    position = engine.positions("BTCUSDT")[0]
    assert (position.amt, position.entry_price, position.position_side) == (D("0.010"), D(60000), "BOTH")
    assert engine.wallet == D(100000)  # fee_rate 0


def test_entry_price_is_weighted_on_increase(engine: Engine) -> None:
    order(engine, qty="1.000")
    engine.set_mark_price("BTCUSDT", D(62000))
    order(engine, qty="3.000")
    position = engine.positions("BTCUSDT")[0]
    assert position.amt == D(4)
    assert position.entry_price == D(61500)


def test_reduce_realises_pnl_into_wallet(engine: Engine) -> None:
    order(engine, qty="2.000")
    engine.set_mark_price("BTCUSDT", D(61000))
    order(engine, side="SELL", qty="0.500")
    assert engine.wallet == D(100000) + D("0.5") * 1000
    position = engine.positions("BTCUSDT")[0]
    assert (position.amt, position.entry_price) == (D("1.5"), D(60000))  # entry unchanged on reduce
    assert engine.trades("BTCUSDT")[-1].realized_pnl == D(500)


def test_short_profit_and_flip_through_zero(engine: Engine) -> None:
    order(engine, side="SELL", qty="1.000")
    engine.set_mark_price("BTCUSDT", D(59000))
    order(engine, side="BUY", qty="1.500")  # closes the short (+1000) and opens 0.5 long at 59000
    position = engine.positions("BTCUSDT")[0]
    assert engine.wallet == D(101000)
    assert (position.amt, position.entry_price) == (D("0.5"), D(59000))


def test_close_to_zero_clears_entry(engine: Engine) -> None:
    order(engine, qty="0.010")
    order(engine, side="SELL", qty="0.010")
    position = engine.positions("BTCUSDT")[0]
    assert (position.amt, position.entry_price) == (D(0), D(0))


def test_fee_is_charged_on_notional(clock: FakeClock) -> None:
    engine = Engine(clock=clock, price_sigma=0.0, fee_rate=D("0.0004"))
    order(engine, qty="1.000")
    assert engine.wallet == D(100000) - D(24)
    assert engine.trades()[-1].commission == D(24)


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("params", "code", "msg"),
    [
        ({"side": "BUY", "type": "MARKET", "quantity": "1"}, -1102, "Mandatory parameter 'symbol'"),
        ({"symbol": "DOGEUSDT", "side": "BUY", "type": "MARKET", "quantity": "1"}, -1121, "Invalid symbol."),
        ({"symbol": "BTCUSDT", "type": "MARKET", "quantity": "1"}, -1102, "Mandatory parameter 'side'"),
        ({"symbol": "BTCUSDT", "side": "HOLD", "type": "MARKET", "quantity": "1"}, -1117, "Invalid side."),
        ({"symbol": "BTCUSDT", "side": "BUY", "quantity": "1"}, -1102, "Mandatory parameter 'type'"),
        ({"symbol": "BTCUSDT", "side": "BUY", "type": "FANCY", "quantity": "1"}, -1116, "Invalid orderType."),
        ({"symbol": "BTCUSDT", "side": "BUY", "type": "STOP_MARKET", "quantity": "1"}, -1116, "Invalid orderType."),
        ({"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET"}, -1102, "Mandatory parameter 'quantity'"),
        ({"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "abc"}, -1102, "'quantity'"),
    ],
)
def test_mandatory_and_enum_parameters(engine: Engine, params: dict[str, str], code: int, msg: str) -> None:
    error = reject(engine, params)
    assert error.code == code
    assert msg in error.msg
    assert error.http_status == 400


def test_mandatory_message_is_binances(engine: Engine) -> None:
    error = reject(engine, {"side": "BUY", "type": "MARKET", "quantity": "1"})
    assert error.msg == "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."


@pytest.mark.parametrize(
    ("symbol", "qty", "code", "msg"),
    [
        ("BTCUSDT", "0", -4003, "Quantity less than or equal to zero."),
        ("BTCUSDT", "-0.001", -4003, "Quantity less than or equal to zero."),
        ("BTCUSDT", "0.0015", -1111, "Precision is over the maximum defined for this asset."),
        ("SOLUSDT", "1.5", -1111, "Precision is over the maximum defined for this asset."),
        ("XRPUSDT", "100.05", -1111, "Precision is over the maximum defined for this asset."),
        ("BTCUSDT", "120.001", -4005, "Quantity greater than max qty."),
    ],
)
def test_quantity_filters(engine: Engine, symbol: str, qty: str, code: int, msg: str) -> None:
    error = reject(engine, market(symbol, qty=qty))
    assert (error.code, error.msg) == (code, msg)


def test_min_qty(clock: FakeClock) -> None:
    from quantum_trader.exchange.sim.engine import SymbolSpec

    spec = SymbolSpec("ABCUSDT", "ABC", D("0.1"), D("0.5"), D(1000), D(100), D(0), D(10), D("0.01"))
    engine = Engine([spec], clock=clock, price_sigma=0.0)
    error = reject(engine, market("ABCUSDT", qty="0.4"))
    assert (error.code, error.msg) == (-4004, "Quantity less than min qty.")
    assert order(engine, "ABCUSDT", qty="0.5")["status"] == "FILLED"


def test_market_uses_market_lot_size_and_limit_uses_lot_size(clock: FakeClock) -> None:
    engine = Engine(clock=clock, price_sigma=0.0, wallet=D(100_000_000))
    assert reject(engine, market("ETHUSDT", qty="2000.001")).code == -4005
    assert order(engine, "ETHUSDT", qty="2000")["status"] == "FILLED"
    limit = {"symbol": "ETHUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "price": "2900"}
    assert engine.new_order({**limit, "quantity": "2500"}).status == "NEW"  # above the MARKET max, below LOT_SIZE
    with pytest.raises(EngineError) as info:
        engine.new_order({**limit, "quantity": "10000.001"})
    assert info.value.code == -4005


@pytest.mark.parametrize("client_id", ["has space", "x" * 37, "bad#char", ""])
def test_illegal_client_order_id(engine: Engine, client_id: str) -> None:
    error = reject(engine, market(newClientOrderId=client_id))
    assert error.code == -1100
    assert error.msg == (
        "Illegal characters found in parameter 'newClientOrderId'; legal range is '^[\\.A-Z\\:/a-z0-9_\\-]{1,36}$'."
    )


def test_legal_client_order_id_characters(engine: Engine) -> None:
    client_id = "x-Ab.9:/_-" + "z" * 26
    assert order(engine, newClientOrderId=client_id)["clientOrderId"] == client_id


def test_min_notional_unless_reduce_only(engine: Engine) -> None:
    error = reject(engine, market(qty="0.001"))  # 60 USDT < 100
    assert error.code == -4164
    assert error.msg == "Order's notional must be no smaller than 100 (unless you choose reduce only)."
    engine.set_position("BTCUSDT", D("0.001"))
    assert order(engine, side="SELL", qty="0.001", reduceOnly="true")["status"] == "FILLED"


def test_reduce_only_rejected_when_flat_or_same_side(engine: Engine) -> None:
    error = reject(engine, market(side="SELL", reduceOnly="true"))
    assert (error.code, error.msg) == (-2022, "ReduceOnly Order is rejected.")
    engine.set_position("BTCUSDT", D("0.5"))
    assert reject(engine, market(side="BUY", reduceOnly="true")).code == -2022
    engine.set_position("BTCUSDT", D("-0.5"))
    assert reject(engine, market(side="SELL", reduceOnly="true")).code == -2022


def test_reduce_only_market_larger_than_position_fills_only_position(engine: Engine) -> None:
    engine.set_position("BTCUSDT", D("0.005"), D(60000))
    body = order(engine, side="SELL", qty="0.010", reduceOnly="true", newOrderRespType="RESULT")
    assert body["status"] == "FILLED"
    assert body["executedQty"] == body["origQty"] == "0.005"
    assert body["reduceOnly"] is True
    assert position_amt(engine) == 0


def test_reduce_only_is_exempt_from_margin(engine: Engine) -> None:
    engine.set_position("BTCUSDT", D("-2"), D(60000))
    engine.set_wallet(D(0))
    assert reject(engine, market("ETHUSDT", qty="1")).code == -2019  # opening anything needs margin
    assert order(engine, side="BUY", qty="2.000", reduceOnly="true")["status"] == "FILLED"


def test_margin_insufficient(engine: Engine) -> None:
    # 100000 USDT x 20 = 2,000,000 of notional: 34 BTC at 60000 is 2,040,000.
    error = reject(engine, market(qty="34"))
    assert (error.code, error.msg) == (-2019, "Margin is insufficient.")
    assert order(engine, qty="33")["status"] == "FILLED"
    # Reducing part of a flip needs no margin: selling 66 turns +33 into -33.
    assert order(engine, side="SELL", qty="66")["status"] == "FILLED"


def test_bad_reduce_only_value(engine: Engine) -> None:
    error = reject(engine, market(reduceOnly="yes"))
    assert (error.code, error.msg) == (-1130, "Data sent for parameter 'reduceOnly' is not valid.")


def test_price_sent_with_market(engine: Engine) -> None:
    error = reject(engine, market(price="60000"))
    assert (error.code, error.msg) == (-1106, "Parameter 'price' sent when not required.")


# ------------------------------------------------------------------------------------------------ client ids


def test_resending_a_filled_market_client_id_creates_a_second_order(engine: Engine) -> None:
    first = order(engine, qty="0.010", newClientOrderId="close-1")
    second = order(engine, qty="0.010", newClientOrderId="close-1")
    assert first["orderId"] != second["orderId"]
    assert position_amt(engine) == D("0.020")
    assert [o.order_id for o in engine.orders_by_client_id("BTCUSDT", "close-1")] == [
        first["orderId"],
        second["orderId"],
    ]
    # A query by client id answers the most recent one.
    assert engine.query_order({"symbol": "BTCUSDT", "origClientOrderId": "close-1"}).order_id == second["orderId"]
    assert engine.query_order({"symbol": "BTCUSDT", "orderId": str(first["orderId"])}).order_id == first["orderId"]


def test_duplicate_client_id_only_while_an_order_is_open(engine: Engine) -> None:
    limit = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.010"}
    resting = engine.new_order({**limit, "price": "59000", "newClientOrderId": "rest-1"})
    assert resting.status == "NEW"
    error = reject(engine, market(newClientOrderId="rest-1"))
    assert (error.code, error.msg) == (-4116, "ClientOrderId is duplicated.")
    engine.cancel_order({"symbol": "BTCUSDT", "origClientOrderId": "rest-1"})
    assert order(engine, newClientOrderId="rest-1")["status"] == "FILLED"


def test_generated_client_ids_are_22_chars_and_seeded(clock: FakeClock) -> None:
    ids = [Engine(clock=clock, seed=3).new_order(market()).client_order_id for _ in range(2)]
    assert ids[0] == ids[1]
    assert len(ids[0]) == 22 and ids[0].isalnum()
    other = Engine(clock=clock, seed=4).new_order(market()).client_order_id
    assert other != ids[0]


# ------------------------------------------------------------------------------------------------ query / cancel


def test_query_unknown_order(engine: Engine) -> None:
    with pytest.raises(EngineError) as info:
        engine.query_order({"symbol": "BTCUSDT", "orderId": "1"})
    assert (info.value.code, info.value.msg) == (-2013, "Order does not exist.")
    with pytest.raises(EngineError) as info:
        engine.query_order({"symbol": "BTCUSDT", "origClientOrderId": "nope"})
    assert info.value.code == -2013
    with pytest.raises(EngineError) as info:
        engine.query_order({"symbol": "BTCUSDT"})
    assert info.value.code == -1102


def test_order_of_another_symbol_is_not_found(engine: Engine) -> None:
    placed = engine.new_order(market())
    with pytest.raises(EngineError) as info:
        engine.query_order({"symbol": "ETHUSDT", "orderId": str(placed.order_id)})
    assert info.value.code == -2013


def test_market_orders_are_never_open_so_cancel_is_unknown(engine: Engine) -> None:
    placed = engine.new_order(market())
    assert engine.open_orders() == []
    with pytest.raises(EngineError) as info:
        engine.cancel_order({"symbol": "BTCUSDT", "orderId": str(placed.order_id)})
    assert (info.value.code, info.value.msg) == (-2011, "Unknown order sent.")


def test_limit_order_rests_then_fills_when_the_mark_crosses(engine: Engine) -> None:
    params = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.010"}
    resting = engine.new_order({**params, "price": "59500"})
    assert [o.order_id for o in engine.open_orders("BTCUSDT")] == [resting.order_id]
    engine.set_mark_price("BTCUSDT", D(59400))
    assert resting.status == "FILLED"
    assert resting.avg_price == D(59500)  # a maker fill at its own price
    assert position_amt(engine) == D("0.010")


def test_marketable_limit_fills_at_once(engine: Engine) -> None:
    params = {"symbol": "BTCUSDT", "side": "SELL", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.010"}
    assert engine.new_order({**params, "price": "59000"}).status == "FILLED"
    assert engine.new_order({**params, "price": "61000", "timeInForce": "IOC"}).status == "EXPIRED"
    assert reject(engine, {**params, "price": "61000", "timeInForce": "FOK"}).code == -5021
    assert reject(engine, {**params, "price": "59000", "timeInForce": "GTX"}).code == -5022
    assert engine.new_order({**params, "price": "61000", "timeInForce": "GTX"}).status == "NEW"
    assert len(engine.orders()) == 3  # rejected FOK/GTX orders are not recorded


@pytest.mark.parametrize(
    ("price", "code"),
    [("59000.05", -4014), ("0", -4001), ("63000.10", -4016)],
)
def test_limit_price_filters(engine: Engine, price: str, code: int) -> None:
    params = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.010"}
    assert reject(engine, {**params, "price": price}).code == code


def test_open_reduce_only_orders_count_against_the_position(engine: Engine) -> None:
    engine.set_position("BTCUSDT", D("0.010"), D(60000))
    take = {"symbol": "BTCUSDT", "side": "SELL", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.010"}
    engine.new_order({**take, "price": "61000", "reduceOnly": "true"})
    error = reject(engine, market(side="SELL", reduceOnly="true"))
    assert error.code == -4118


def test_partial_fill_fraction_expires_the_rest(engine: Engine) -> None:
    placed = engine.new_order(market(qty="0.015"), fill_fraction=D("0.5"))
    assert placed.status == "EXPIRED"
    assert placed.executed_qty == D("0.007")  # rounded down to the step
    assert position_amt(engine) == D("0.007")


# ------------------------------------------------------------------------------------------------ position mode


def test_position_side_must_match_one_way_mode(engine: Engine) -> None:
    error = reject(engine, market(positionSide="LONG"))
    assert (error.code, error.msg) == (-4061, "Order's position side does not match user's setting.")
    assert order(engine, positionSide="BOTH")["positionSide"] == "BOTH"


def test_hedge_mode(engine: Engine) -> None:
    engine.set_dual(True)
    assert reject(engine, market()).code == -4061
    error = reject(engine, market(positionSide="LONG", reduceOnly="true"))
    assert (error.code, error.msg) == (-1106, "Parameter 'reduceonly' sent when not required.")
    order(engine, qty="0.010", positionSide="LONG")
    order(engine, side="SELL", qty="0.020", positionSide="SHORT")
    sides = {p.position_side: p.amt for p in engine.positions("BTCUSDT")}
    assert sides == {"LONG": D("0.010"), "SHORT": D("-0.020")}
    # Closing more than the LONG holds is refused; closing it exactly works.
    assert reject(engine, market(side="SELL", qty="0.011", positionSide="LONG")).code == -2022
    order(engine, side="SELL", qty="0.010", positionSide="LONG")
    assert engine.positions("BTCUSDT")[0].amt == 0


def test_change_position_mode_refusals(engine: Engine) -> None:
    with pytest.raises(EngineError) as info:
        engine.change_position_mode(False)
    assert info.value.code == -4059
    engine.set_dual(False)  # the admin switch accepts the current mode
    engine.new_order(market())
    for switch in (engine.change_position_mode, engine.set_dual):
        with pytest.raises(EngineError) as info:
            switch(True)
        assert (info.value.code, info.value.msg) == (-4068, "Position side cannot be changed if there exists position.")
    engine.new_order(market(side="SELL"))
    limit = {"symbol": "ETHUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "1"}
    engine.new_order({**limit, "price": "2900"})
    with pytest.raises(EngineError) as info:
        engine.change_position_mode(True)
    assert info.value.code == -4067


# ------------------------------------------------------------------------------------------------ mark price


def test_walk_is_deterministic_and_independent_of_reads() -> None:
    a_clock, b_clock = FakeClock(), FakeClock()
    a, b = Engine(clock=a_clock, seed=11), Engine(clock=b_clock, seed=11)
    for _ in range(50):
        a_clock.advance(0.1)
        a.mark_price("ETHUSDT")  # read at every step ...
    b_clock.advance(5.0)  # ... or once at the end
    assert a.mark_price("ETHUSDT") == b.mark_price("ETHUSDT")
    assert a.mark_price("ETHUSDT") != D(3000)
    c_clock = FakeClock()
    c = Engine(clock=c_clock, seed=12)
    c_clock.advance(5.0)
    assert c.mark_price("ETHUSDT") != a.mark_price("ETHUSDT")


def test_walk_moves_only_per_step_and_stays_on_tick(clock: FakeClock) -> None:
    engine = Engine(clock=clock, seed=1, price_step_ms=100)
    start = engine.mark_price("XRPUSDT")
    clock.advance(0.05)
    assert engine.mark_price("XRPUSDT") == start
    clock.advance(60)
    price = engine.mark_price("XRPUSDT")
    assert price % D("0.0001") == 0
    assert D("0.5") < price < D("0.7")


def test_set_mark_price_then_walk_continues(clock: FakeClock) -> None:
    engine = Engine(clock=clock, seed=1)
    engine.set_mark_price("BTCUSDT", D("50000.05"))
    assert engine.mark_price("BTCUSDT") == D("50000.1")  # rounded to the 0.10 tick
    clock.advance(10)
    assert abs(engine.mark_price("BTCUSDT") - 50000) < 500


def test_large_clock_jump_is_cheap(clock: FakeClock) -> None:
    engine = Engine(clock=clock)
    clock.advance(7 * 24 * 3600)
    assert engine.mark_price("BTCUSDT") > 0


def test_reset(engine: Engine) -> None:
    engine.set_dual(True)
    first = engine.new_order(market(positionSide="LONG"))
    engine.set_mark_price("BTCUSDT", D(1000))
    engine.reset()
    assert position_amt(engine) == 0
    assert engine.orders() == []
    assert engine.mark_price("BTCUSDT") == D(60000)
    assert not engine.dual
    assert engine.new_order(market()).order_id > first.order_id  # ids never repeat


# ------------------------------------------------------------------------------------------------ shapes


def test_result_and_ack_order_shapes(engine: Engine, clock: FakeClock) -> None:
    placed = engine.new_order(market(newClientOrderId="c1"))
    result = order_json(engine, placed)
    assert list(result) == [
        "orderId",
        "symbol",
        "status",
        "clientOrderId",
        "price",
        "avgPrice",
        "origQty",
        "executedQty",
        "cumQty",
        "cumQuote",
        "timeInForce",
        "type",
        "reduceOnly",
        "closePosition",
        "side",
        "positionSide",
        "stopPrice",
        "workingType",
        "priceProtect",
        "origType",
        "priceMatch",
        "selfTradePreventionMode",
        "goodTillDate",
        "updateTime",
    ]
    assert result["updateTime"] == int(T0 * 1000)
    ack = order_json(engine, placed, ack=True)
    assert (ack["status"], ack["executedQty"], ack["cumQuote"], ack["avgPrice"]) == (
        "NEW",
        "0.000",
        "0.00000",
        "0.00000",
    )
    query = order_json(engine, placed, query=True)
    assert "cumQty" not in query and query["time"] == int(T0 * 1000)


def test_position_risk_shapes(engine: Engine) -> None:
    engine.set_position("BTCUSDT", D("-0.5"), D(60000))
    engine.set_mark_price("BTCUSDT", D(59000))
    position = engine.positions("BTCUSDT")[0]
    v2 = position_risk_json(engine, position, version=2)
    assert v2["positionAmt"] == "-0.500"
    assert v2["entryPrice"] == "60000"
    assert v2["markPrice"] == "59000.00000000"
    assert v2["unRealizedProfit"] == "500.00000000"
    assert v2["notional"] == "-29500"
    assert v2["leverage"] == "20"
    assert v2["positionSide"] == "BOTH"
    assert D(v2["liquidationPrice"]) > D(59000)  # a short is liquidated above
    v3 = position_risk_json(engine, position, version=3)
    assert "leverage" not in v3 and v3["initialMargin"] == "1475.00000000"


def test_account_and_balance(engine: Engine) -> None:
    engine.set_position("ETHUSDT", D(1), D(2900))
    v3 = account_json(engine, version=3)
    assert [p["symbol"] for p in v3["positions"]] == ["ETHUSDT"]
    assert v3["totalUnrealizedProfit"] == "100.00000000"
    v2 = account_json(engine, version=2)
    assert len(v2["positions"]) == 5
    assert balance_json(engine)[0]["balance"] == "100000.00000000"
    assert balance_json(engine)[0]["updateTime"] > 0  # ccxt skips assets whose updateTime is 0


def test_exchange_info_symbol_filters(engine: Engine) -> None:
    info = symbol_info_json(engine.spec("BTCUSDT"))
    filters = {f["filterType"]: f for f in info["filters"]}
    assert filters["MARKET_LOT_SIZE"] == {
        "filterType": "MARKET_LOT_SIZE",
        "minQty": "0.001",
        "maxQty": "120",
        "stepSize": "0.001",
    }
    assert filters["LOT_SIZE"]["maxQty"] == "1000"
    assert filters["PRICE_FILTER"]["tickSize"] == "0.10"
    assert filters["MIN_NOTIONAL"] == {"filterType": "MIN_NOTIONAL", "notional": "100"}
    assert (info["pricePrecision"], info["quantityPrecision"]) == (2, 3)
    assert symbol_info_json(engine.spec("SOLUSDT"))["quantityPrecision"] == 0


# ------------------------------------------------------------------------------------------------ invariants

steps = st.lists(
    st.tuples(st.sampled_from(["BUY", "SELL"]), st.integers(1, 400), st.integers(-300, 300), st.booleans()),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(steps)
def test_wallet_and_position_account_for_every_fill(sequence: list[tuple[str, int, int, bool]]) -> None:
    engine = Engine(clock=FakeClock(), price_sigma=0.0, wallet=D(10_000_000))
    for side, steps_, move, reduce_only in sequence:
        engine.set_mark_price("ETHUSDT", D(3000) + move)
        params = market("ETHUSDT", side=side, qty=str(D(steps_) * D("0.001")))
        if reduce_only:
            params["reduceOnly"] = "true"
        try:
            engine.new_order(params)
        except EngineError as error:
            assert error.code in (-2022, -4164)
    trades = engine.trades("ETHUSDT")
    signed = sum((t.qty if t.side == "BUY" else -t.qty for t in trades), D(0))
    assert position_amt(engine, "ETHUSDT") == signed
    assert engine.wallet == D(10_000_000) + sum((t.realized_pnl for t in trades), D(0))
    for placed in engine.orders("ETHUSDT"):
        assert placed.status in ("FILLED",)
        if placed.reduce_only:
            assert placed.executed_qty > 0
    # Closing at (the tick nearest) the entry price realises at most half a tick per unit.
    position = engine.positions("ETHUSDT")[0]
    amt = position.amt
    if amt:
        engine.set_mark_price("ETHUSDT", position.entry_price)
        before = engine.wallet
        close_side = "SELL" if amt > 0 else "BUY"
        engine.new_order(market("ETHUSDT", side=close_side, qty=str(abs(amt)), reduceOnly="true"))
        assert position_amt(engine, "ETHUSDT") == 0
        assert abs(engine.wallet - before) <= abs(amt) * D("0.005") + D("0.00000001")


def test_matching_engine_window_ends_at_timestamp_plus_recv_window() -> None:
    from quantum_trader.exchange.sim.auth import check_me_window

    params = {"timestamp": "1000", "recvWindow": "500"}
    check_me_window(1500, params)  # the last moment it may execute, as the gateway's ``<= recvWindow``
    with pytest.raises(EngineError) as info:
        check_me_window(1501, params)
    assert (info.value.code, info.value.msg) == (-5028, "Timestamp for this request is outside of the ME recvWindow.")
    check_me_window(6000, {"timestamp": "1000"})  # default recvWindow 5000
    with pytest.raises(EngineError):
        check_me_window(6001, {"timestamp": "1000"})


def test_user_data_events_never_go_back_in_time_when_the_hosts_clock_does(engine: Engine, clock: FakeClock) -> None:
    """Binance orders a connection's events by their event time: the host's clock stepping back does not."""
    order(engine)
    clock.advance(-5.0)  # NTP steps the host's clock back
    order(engine)
    events, last = engine.user_events()
    times = [event["E"] for _, event in events]
    assert last == len(events) == 6 and times == sorted(times)  # NEW, TRADE, ACCOUNT_UPDATE twice
    assert [n for n, _ in events] == list(range(1, 7))
