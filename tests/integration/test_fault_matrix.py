"""Every exchange fault at each point of the order path: exactly one order per plan at most, exactly one result
per plan, and P3.3's ledger equal to the exchange afterwards.

The exchange is the simulator over HTTP with its fault injection (``/_sim/faults``); Apply talks to it through
ccxt exactly as to Binance. Short client timeout (0.8 s) and order recvWindow (0.5 s) keep the cases fast; the
permit window is 4 s so a resend inside it is possible where the rules allow one.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from conftest import SIM_ADMIN, Chain, make_settings, set_position, sim_orders, sim_position
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.domain import reasons
from quantum_trader.domain.oracle import plan_of_order

pytestmark = pytest.mark.integration

POSITION = Decimal("0.010")
ORDER = {"path": "/fapi/v1/order", "method": "POST"}
LOOKUP = {"path": "/fapi/v1/order", "method": "GET"}

# (case id, fault rules, orders expected on the exchange, result error ("" = executed), filled qty)
MATRIX = [
    ("no_fault", [], 1, "", POSITION),
    ("latency_200ms", [{"kind": "latency", "ms": 200, **ORDER}], 1, "", POSITION),
    ("timeout_after_fill", [{"kind": "timeout_after_fill", "ms": 3000, **ORDER}], 1, "", POSITION),
    ("timeout_before_fill", [{"kind": "timeout_before_fill", "ms": 3000, **ORDER}], 1, "", POSITION),
    ("http_503_-1001", [{"kind": "http_5xx", "status": 503, **ORDER}], 1, "", POSITION),
    ("http_502_gateway_html", [{"kind": "http_5xx", "status": 502, **ORDER}], 1, "", POSITION),
    ("http_500_-1000_unknown", [{"kind": "http_5xx", "status": 500, **ORDER}], 0, reasons.ORDER_NOT_PLACED, 0),
    ("http_429_retry_after", [{"kind": "http_429", "retry_after": 1, **ORDER}], 1, "", POSITION),
    ("http_418_ban", [{"kind": "http_418", "retry_after": 2, **ORDER}], 0, reasons.EXCHANGE_BANNED, 0),
    ("-1021_timestamp", [{"kind": "error_code", "code": -1021, **ORDER}], 1, "", POSITION),
    ("-1007_executed", [{"kind": "error_code", "code": -1007, "executed": True, **ORDER}], 1, "", POSITION),
    ("-1007_not_executed", [{"kind": "error_code", "code": -1007, **ORDER}], 0, reasons.ORDER_NOT_PLACED, 0),
    ("-1001_disconnected", [{"kind": "error_code", "code": -1001, **ORDER}], 1, "", POSITION),
    ("-2022_reduce_only", [{"kind": "error_code", "code": -2022, **ORDER}], 0, reasons.EXCHANGE_REJECTED, 0),
    ("-1111_precision", [{"kind": "error_code", "code": -1111, **ORDER}], 0, reasons.EXCHANGE_REJECTED, 0),
    ("partial_fill_half", [{"kind": "partial_fill", "fraction": 0.5, **ORDER}], 1, "", Decimal("0.005")),
    ("bad_json_executed", [{"kind": "bad_json", "executed": True, **ORDER}], 1, "", POSITION),
    ("bad_json_not_executed", [{"kind": "bad_json", "executed": False, **ORDER}], 1, "", POSITION),
    ("missing_fields_executed", [{"kind": "missing_fields", "executed": True, **ORDER}], 1, "", POSITION),
    # the exchange answers at once and executes later (the request passed the gateway): inside the request's
    # recvWindow the late order is found, never doubled; past it the matching engine refuses it (-5028), and a
    # resend follows only where the answer did not say "execution status unknown"
    (
        "late_-1007_inside_recv_window",
        [{"kind": "late_execution", "ms": 300, "answer": "-1007", **ORDER}],
        1,
        "",
        POSITION,
    ),
    (
        "late_-1007_past_recv_window",
        [{"kind": "late_execution", "ms": 900, "answer": "-1007", **ORDER}],
        0,
        reasons.ORDER_NOT_PLACED,
        0,
    ),
    (
        "late_html_503_inside_recv_window",
        [{"kind": "late_execution", "ms": 300, "answer": "503_html", **ORDER}],
        1,
        "",
        POSITION,
    ),
    (
        "late_empty_body_inside_recv_window",
        [{"kind": "late_execution", "ms": 300, "answer": "empty", **ORDER}],
        1,
        "",
        POSITION,
    ),
    (
        "late_timeout_inside_recv_window",
        [{"kind": "late_execution", "ms": 300, "answer": "timeout", "hold_ms": 3000, **ORDER}],
        1,
        "",
        POSITION,
    ),
    (
        "late_empty_body_past_recv_window",
        [{"kind": "late_execution", "ms": 900, "answer": "empty", **ORDER}],
        1,
        "",
        POSITION,
    ),
    (
        "reply_lost_then_lookups_fail",
        [
            {"kind": "timeout_after_fill", "ms": 3000, **ORDER},
            {"kind": "http_5xx", "status": 503, "count": 3, **LOOKUP},
        ],
        1,
        "",
        POSITION,
    ),
    (
        "reply_lost_then_lookup_timeouts",
        [
            {"kind": "timeout_after_fill", "ms": 3000, **ORDER},
            {"kind": "timeout_before_fill", "ms": 3000, "count": 2, **LOOKUP},
        ],
        1,
        "",
        POSITION,
    ),
]


@pytest.fixture
def settings(tmp_path: Path, store_url: str, sim):
    return make_settings(
        tmp_path,
        store_url,
        sim.url,
        apply={"permit_wait_ms": 4000, "metrics_port": 0, "order_resolve_timeout_s": 20},
        exchange={"timeout_ms": 800, "order_recv_window_ms": 500},
    )


def add_faults(sim, rules: list[dict]) -> None:
    for rule in rules:
        body = {"count": 1, **rule}
        httpx.post(f"{sim.url}/_sim/faults", json=body, headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()


async def ledger_equals_exchange(rds, sim, symbol: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ledger = await rds.hgetall(keys.ledger(symbol))
        if ledger and Decimal(ledger["last_known_amt"]) == sim_position(sim, symbol):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"ledger {await rds.hgetall(keys.ledger(symbol))} != exchange {sim_position(sim, symbol)}")


@pytest.mark.parametrize(("case", "rules", "orders", "error", "filled"), MATRIX, ids=[m[0] for m in MATRIX])
async def test_fault_matrix(case, rules, orders, error, filled, sim, rds, chain: Chain, capsys) -> None:
    set_position(sim, "BTCUSDT", str(POSITION))
    await chain.start()
    add_faults(sim, rules)
    sub = await ops.propose(rds, "BTCUSDT", "FULL_CLOSE")
    result = await ops.wait_result(rds, sub.plan_id, 40, sub.result_cursor)
    assert result is not None, "every plan gets a result"
    placed = [o for o in sim_orders(sim, "BTCUSDT") if plan_of_order(o["clientOrderId"]) == sub.plan_id]
    results = [f for _, f in await rds.xrange(keys.RESULT_STREAM) if f["plan_id"] == sub.plan_id]
    assert len(placed) == orders, f"{case}: {len(placed)} orders on the exchange"
    assert len(results) == 1
    assert result.error == error and result.executed == (error == "")
    assert result.filled_qty == filled
    assert sim_position(sim, "BTCUSDT") == POSITION - filled
    await ledger_equals_exchange(rds, sim, "BTCUSDT")
    assert await rds.zcard(keys.APPLY_INTENTS) == 0, "no order left with an unknown outcome"
    with capsys.disabled():
        print(
            f"\n  fault matrix {case:<32} orders {len(placed)}  results {len(results)}  "
            f"outcome {result.error or 'executed'} {result.filled_qty}"
        )


async def _lost_reply_chain(sim, tmp_path: Path, store_url: str, *, push: bool) -> Chain:
    """The chain with a short resolve bound and timeouts, the user-data stream on or off, a position to close."""
    settings = make_settings(
        tmp_path,
        store_url,
        sim.url,
        apply={"permit_wait_ms": 1000, "metrics_port": 0, "order_resolve_timeout_s": 1},
        exchange={"timeout_ms": 500, "order_recv_window_ms": 500},
        stream={"push": push},
    )
    chain = Chain(settings)
    set_position(sim, "BTCUSDT", str(2 * POSITION))
    await chain.start()
    return chain


def _lose_the_reply_and_fail_lookups(sim) -> None:
    """The next order executes but its reply is lost; every lookup fails until the faults are cleared."""
    add_faults(
        sim,
        [
            {"kind": "timeout_after_fill", "ms": 3000, **ORDER},
            {"kind": "http_5xx", "status": 503, "count": None, **LOOKUP},
        ],
    )


async def test_an_unknown_outcome_holds_the_symbol_until_the_exchange_tells(
    sim, rds, tmp_path: Path, store_url: str
) -> None:
    """The reply is lost and every lookup fails for longer than Apply may wait, and the user-data stream is off
    (or down): no result is invented, the symbol stays held (no second close can stack), and once the exchange
    answers again the background resolver publishes the truth."""
    chain = await _lost_reply_chain(sim, tmp_path, store_url, push=False)
    try:
        _lose_the_reply_and_fail_lookups(sim)
        sub = await ops.propose(rds, "BTCUSDT", "PARTIAL_CLOSE", qty=POSITION)
        assert await ops.wait_result(rds, sub.plan_id, 3, sub.result_cursor) is None
        assert await rds.zscore(keys.APPLY_INTENTS, sub.plan_id) is not None
        assert await rds.get(keys.symbol_in_flight("BTCUSDT")) == sub.plan_id
        other = await ops.propose(rds, "BTCUSDT", "FULL_CLOSE")
        skipped = await ops.wait_result(rds, other.plan_id, 5, other.result_cursor)
        assert skipped is not None and skipped.reason == reasons.DUPLICATE_IN_FLIGHT
        httpx.delete(f"{sim.url}/_sim/faults", headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()
        result = await ops.wait_result(rds, sub.plan_id, 20, sub.result_cursor)
        assert result is not None and result.executed and result.filled_qty == POSITION
        assert len([o for o in sim_orders(sim) if plan_of_order(o["clientOrderId"]) == sub.plan_id]) == 1
        assert await rds.zcard(keys.APPLY_INTENTS) == 0
        assert await rds.get(keys.symbol_in_flight("BTCUSDT")) is None
    finally:
        await chain.stop()


async def test_with_the_stream_an_unknown_outcome_is_resolved_by_the_fills_event_while_lookups_fail(
    sim, rds, tmp_path: Path, store_url: str
) -> None:
    """The same faults with the user-data stream on: the order's ``ORDER_TRADE_UPDATE`` proves the fill, so the
    plan gets its result while every lookup still fails, and the symbol is free again."""
    chain = await _lost_reply_chain(sim, tmp_path, store_url, push=True)
    try:
        apply = chain.services["apply"]
        deadline = asyncio.get_running_loop().time() + 10
        while not apply.stream.health.healthy:
            assert asyncio.get_running_loop().time() < deadline, "Apply's stream never became healthy"
            await asyncio.sleep(0.02)
        _lose_the_reply_and_fail_lookups(sim)
        sub = await ops.propose(rds, "BTCUSDT", "PARTIAL_CLOSE", qty=POSITION)
        result = await ops.wait_result(rds, sub.plan_id, 10, sub.result_cursor)
        assert result is not None and result.executed and result.filled_qty == POSITION
        faults = httpx.get(f"{sim.url}/_sim/faults", headers={"X-Sim-Admin-Token": SIM_ADMIN}).json()
        assert [rule for rule in faults if rule.get("method") == "GET"], faults  # lookups would still fail
        assert len([o for o in sim_orders(sim) if plan_of_order(o["clientOrderId"]) == sub.plan_id]) == 1
        assert await rds.zcard(keys.APPLY_INTENTS) == 0
        assert await rds.get(keys.symbol_in_flight("BTCUSDT")) is None
    finally:
        await chain.stop()
