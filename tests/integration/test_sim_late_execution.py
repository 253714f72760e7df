"""The simulated exchange's matching-engine recvWindow (-5028) and the ``late_execution`` fault, over real HTTP:
a request answered "execution status unknown" executes later, but never after ``timestamp + recvWindow``."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from sim_fixtures import ADMIN_TOKEN, BinanceClient, client, make_client, sim

from quantum_trader.exchange.sim import SimConfig, SimServer

__all__ = ["client", "sim"]  # fixtures, imported for pytest
pytestmark = pytest.mark.integration

ME_REFUSAL = {"code": -5028, "msg": "Timestamp for this request is outside of the ME recvWindow."}
UNKNOWN_1007 = "Timeout waiting for response from backend server. Send status unknown; execution status unknown."
NOT_FOUND = (400, -2013, "Order does not exist.")


def error_of(response: httpx.Response) -> tuple[int, int, str]:
    body = response.json()
    return response.status_code, body["code"], body["msg"]


def add_fault(client: BinanceClient, **rule: Any) -> None:
    rule.setdefault("path", "/fapi/v1/order")
    rule.setdefault("method", "POST")
    response = client.admin("POST", "/_sim/faults", rule)
    assert response.status_code == 200, response.text


def place(client: BinanceClient, client_id: str, *, recv_window: int = 1000, **extra: Any) -> httpx.Response:
    params = {"symbol": "BTCUSDT", "side": "BUY", "type": "MARKET", "quantity": "0.010", "newClientOrderId": client_id}
    return client.signed("POST", "/fapi/v1/order", params, recv_window=recv_window, **extra)


def query(client: BinanceClient, client_id: str) -> httpx.Response:
    return client.signed("GET", "/fapi/v1/order", {"symbol": "BTCUSDT", "origClientOrderId": client_id})


def all_orders(client: BinanceClient) -> list[dict[str, Any]]:
    orders: list[dict[str, Any]] = client.admin("GET", "/_sim/orders").json()
    return orders


def late(client: BinanceClient) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = client.admin("GET", "/_sim/late").json()
    return records


def settled(client: BinanceClient, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The late executions once none is pending any more."""
    deadline = time.monotonic() + timeout
    records = late(client)
    while any(record["outcome"] == "pending" for record in records):
        assert time.monotonic() < deadline, f"still pending: {records}"
        time.sleep(0.02)
        records = late(client)
    return records


# ------------------------------------------------------------------------------------------------ late_execution


def test_late_execution_inside_the_window_executes_after_ms(client: BinanceClient) -> None:
    add_fault(client, kind="late_execution", ms=600)
    started = time.monotonic()
    response = place(client, "late-1", recv_window=1000)
    assert error_of(response) == (408, -1007, UNKNOWN_1007)
    assert time.monotonic() - started < 0.4, "answered at once, not after the execution"
    assert error_of(query(client, "late-1")) == NOT_FOUND
    assert all_orders(client) == []
    [pending] = late(client)
    assert (pending["outcome"], pending["clientOrderId"], pending["dueAt"] - pending["receivedAt"]) == (
        "pending",
        "late-1",
        600,
    )
    # The pending execution blocks nothing: another order executes at once meanwhile.
    assert place(client, "normal-1").status_code == 200
    assert [o["clientOrderId"] for o in all_orders(client)] == ["normal-1"]

    [record] = settled(client)
    assert time.monotonic() - started >= 0.6
    assert (record["outcome"], record["httpStatus"]) == ("executed", 200)
    assert record["executedAt"] <= record["windowEnd"]
    order = query(client, "late-1").json()
    assert (order["status"], order["executedQty"], order["clientOrderId"]) == ("FILLED", "0.010", "late-1")
    assert record["reply"]["orderId"] == order["orderId"]
    assert [o["clientOrderId"] for o in all_orders(client)] == ["normal-1", "late-1"]
    risk = client.signed("GET", "/fapi/v2/positionRisk", {"symbol": "BTCUSDT"}).json()
    assert risk[0]["positionAmt"] == "0.020"


def test_late_execution_past_the_window_is_refused_by_the_matching_engine(client: BinanceClient) -> None:
    add_fault(client, kind="late_execution", ms=1500)
    response = place(client, "late-2", recv_window=1000)
    assert error_of(response) == (408, -1007, UNKNOWN_1007)
    assert error_of(query(client, "late-2")) == NOT_FOUND
    [record] = settled(client)
    assert (record["outcome"], record["httpStatus"], record["reply"]) == ("refused", 400, ME_REFUSAL)
    assert record["executedAt"] > record["windowEnd"]
    assert all_orders(client) == []
    assert error_of(query(client, "late-2")) == NOT_FOUND
    assert client.admin("GET", "/_sim/state").json()["positions"] == []


def test_the_matching_engine_window_is_on_the_exchange_clock(client: BinanceClient) -> None:
    add_fault(client, kind="late_execution", ms=300)
    assert error_of(place(client, "late-3", recv_window=5000))[:2] == (408, -1007)
    # The exchange's clock jumps 10 s before the engine gets to the request: its window has passed there.
    assert client.admin("POST", "/_sim/clock", {"offset_ms": 10_000}).status_code == 200
    [record] = settled(client)
    assert (record["outcome"], record["reply"]) == ("refused", ME_REFUSAL)
    assert all_orders(client) == []


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        ("-1007", 408, {"code": -1007, "msg": UNKNOWN_1007}),
        ("-1000", 500, {"code": -1000, "msg": "An unknown error occured while processing the request."}),
        (
            "-1006",
            500,
            {
                "code": -1006,
                "msg": "An unexpected response was received from the message bus. Execution status unknown.",
            },
        ),
        ("503_html", 503, None),
        ("empty", 200, None),
    ],
)
def test_late_execution_answers(client: BinanceClient, answer: str, status: int, body: Any) -> None:
    add_fault(client, kind="late_execution", ms=200, answer=answer)
    response = place(client, f"ans{answer}")
    assert response.status_code == status
    if body is not None:
        assert response.json() == body
    elif answer == "503_html":
        assert response.headers["content-type"].startswith("text/html")
        assert response.text == "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"
    else:
        assert response.content == b""
    assert all_orders(client) == []  # not yet
    [record] = settled(client)
    assert record["outcome"] == "executed"
    [order] = all_orders(client)
    assert (order["clientOrderId"], order["status"]) == (f"ans{answer}", "FILLED")


def test_late_execution_timeout_answer_holds_then_503(client: BinanceClient) -> None:
    add_fault(client, kind="late_execution", ms=100, answer="timeout", hold_ms=500)
    started = time.monotonic()
    response = place(client, "late-timeout")
    assert time.monotonic() - started >= 0.5
    assert error_of(response) == (503, -1001, "Internal error; unable to process your request. Please try again.")
    # The engine did not wait for the held answer: the order executed while the client was still waiting.
    [record] = late(client)
    assert record["outcome"] == "executed"
    assert record["executedAt"] - record["receivedAt"] < 500
    [order] = all_orders(client)
    assert (order["clientOrderId"], order["status"]) == ("late-timeout", "FILLED")


def test_late_execution_is_checked_by_the_gateway_at_receipt(client: BinanceClient) -> None:
    add_fault(client, kind="late_execution", ms=100, count=2)
    stale = place(client, "stale-1", recv_window=1000, timestamp=client.now_ms() - 2000)
    assert error_of(stale) == (400, -1021, "Timestamp for this request is outside of the recvWindow.")
    forged = place(client, "forged-1", secret="not-the-secret")
    assert error_of(forged) == (400, -1022, "Signature for this request is not valid.")
    time.sleep(0.3)
    assert late(client) == []  # refused at the gateway: nothing was left for the engine
    assert all_orders(client) == []


def test_reset_cancels_pending_late_executions(client: BinanceClient) -> None:
    add_fault(client, kind="late_execution")  # defaults: ms 2000, answer -1007
    assert error_of(place(client, "reset-1", recv_window=5000))[:2] == (408, -1007)
    [record] = late(client)
    assert (record["outcome"], record["dueAt"] - record["receivedAt"]) == ("pending", 2000)
    assert client.admin("POST", "/_sim/reset").status_code == 200
    assert late(client) == []
    time.sleep(2.3)
    assert all_orders(client) == []
    assert late(client) == []


def test_a_pending_late_execution_is_dropped_when_the_server_stops() -> None:
    with httpx.Client(timeout=5.0) as http:
        server = SimServer(SimConfig(admin_token=ADMIN_TOKEN, price_sigma=0.0)).start()
        binance = make_client(server, http)
        add_fault(binance, kind="late_execution", ms=1000)
        assert error_of(place(binance, "dropped-1", recv_window=5000))[:2] == (408, -1007)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
        time.sleep(1.2)
        assert server.engine.orders() == []


@pytest.mark.parametrize(
    ("rule", "error"),
    [
        ({"kind": "late_execution", "answer": "-1021"}, "answer must be one of"),
        ({"kind": "late_execution", "hold_ms": 100}, 'hold_ms is only for answer "timeout"'),
        ({"kind": "late_execution", "ms": -1}, "ms must be >= 0"),
        ({"kind": "latency", "answer": "-1007"}, "answer and hold_ms are only for late_execution"),
    ],
)
def test_late_execution_rule_validation(client: BinanceClient, rule: dict[str, Any], error: str) -> None:
    response = client.admin("POST", "/_sim/faults", rule)
    assert response.status_code == 400
    assert error in response.json()["error"]


# ------------------------------------------------------------------------------------------------ other faults


def test_latency_inside_the_window_executes(client: BinanceClient) -> None:
    add_fault(client, kind="latency", ms=700)
    response = place(client, "slow-1", recv_window=1000)
    assert response.status_code == 200, response.text
    assert [(o["clientOrderId"], o["status"]) for o in all_orders(client)] == [("slow-1", "FILLED")]


def test_latency_past_the_window_is_refused_by_the_matching_engine(client: BinanceClient) -> None:
    # The gateway accepted the request at receipt; the engine gets it 1.3 s later, past its 1 s window.
    add_fault(client, kind="latency", ms=1300)
    started = time.monotonic()
    response = place(client, "slow-2", recv_window=1000)
    assert time.monotonic() - started >= 1.3
    assert (response.status_code, response.json()) == (400, ME_REFUSAL)
    assert all_orders(client) == []
    assert error_of(query(client, "slow-2")) == NOT_FOUND


def test_latency_past_the_window_refuses_a_cancel_too(client: BinanceClient) -> None:
    limit = {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC", "quantity": "0.010"}
    assert client.order(**limit, price="59000", newClientOrderId="rest-1").json()["status"] == "NEW"
    add_fault(client, kind="latency", ms=1300, method="DELETE")
    params = {"symbol": "BTCUSDT", "origClientOrderId": "rest-1"}
    response = client.signed("DELETE", "/fapi/v1/order", params, recv_window=1000)
    assert (response.status_code, response.json()) == (400, ME_REFUSAL)
    assert [(o["clientOrderId"], o["status"]) for o in all_orders(client)] == [("rest-1", "NEW")]


def test_latency_does_not_apply_the_engine_window_to_reads(client: BinanceClient) -> None:
    add_fault(client, kind="latency", ms=1300, path="/fapi/v2/balance", method="GET")
    response = client.signed("GET", "/fapi/v2/balance", recv_window=1000)
    assert response.status_code == 200, response.text  # checked at receipt by the gateway only


def test_timeout_after_fill_executes_at_receipt_whatever_the_window(client: BinanceClient) -> None:
    # The order executes on receipt and only the answer is held: its processing is never past the window.
    add_fault(client, kind="timeout_after_fill", ms=1500)
    with pytest.raises(httpx.ReadTimeout):
        place(client, "held-1", recv_window=1000, timeout=0.3)
    assert [(o["clientOrderId"], o["status"]) for o in all_orders(client)] == [("held-1", "FILLED")]
