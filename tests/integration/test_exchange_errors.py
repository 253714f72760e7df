"""The exchange adapter's failure handlers, each made to run for its real reason: ``BinanceFutures`` against the
simulator over HTTP, with the simulator's fault rules scripting what the exchange answers (garbage, missing
fields, 5xx, 418 bans, 429 throttles), and ``qt exchange check``'s probes (``run_checks``) over the same."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from conftest import SIM_ADMIN, SIM_KEY, SIM_SECRET, set_position, sim_orders, sim_position
from quantum_trader.exchange.base import (
    ExchangeBanned,
    ExchangeError,
    ExchangeUnavailable,
    NotSent,
    Throttled,
)
from quantum_trader.exchange.binance import BinanceFutures, make_exchange
from quantum_trader.exchange.check import Check, run_checks
from quantum_trader.exchange.sim.server import SimServer
from quantum_trader.settings import ExchangeSettings

pytestmark = pytest.mark.integration

TIME, INFO, DUAL, BALANCE = "/fapi/v1/time", "/fapi/v1/exchangeInfo", "/fapi/v1/positionSide/dual", "/fapi/v2/balance"
POSITIONS, ORDER, ALL_ORDERS = "/fapi/v2/positionRisk", "/fapi/v1/order", "/fapi/v1/allOrders"
SYMBOL, COID = "SOLUSDT", "qt-00000000000000e1"
# A 429's Retry-After well past READ_MAX_WAIT_MS (2 s): the next read cannot wait it out.
THROTTLE_S = 60


def admin(sim: SimServer, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    reply = httpx.request(method, f"{sim.url}{path}", json=body, headers={"X-Sim-Admin-Token": SIM_ADMIN})
    reply.raise_for_status()
    return reply.json()


def fault(sim: SimServer, kind: str, path: str, **rule: Any) -> None:
    admin(sim, "POST", "/_sim/faults", {"kind": kind, "path": path, **rule})


def count_requests(sim: SimServer, path: str, method: str = "GET") -> None:
    """A rule that changes nothing (no latency, never exhausted): its ``hits`` count the requests that arrive."""
    fault(sim, "latency", path, method=method, ms=0, count=None)


def hits(sim: SimServer, path: str) -> int:
    """Requests that reached ``path`` and met a rule that stays (``count: null``)."""
    return sum(rule["hits"] for rule in admin(sim, "GET", "/_sim/faults") if rule.get("path") == path)


def exchange_at(url: str) -> BinanceFutures:
    return make_exchange(ExchangeSettings(mode="sim", sim_url=url), SIM_KEY, SIM_SECRET, url)


@pytest.fixture
async def exchange(sim: SimServer) -> AsyncIterator[BinanceFutures]:
    """A fresh adapter (clock not synced, no filters, an empty rate guard), as a process has at start."""
    adapter = exchange_at(sim.url)
    yield adapter
    await adapter.close()
    admin(sim, "DELETE", "/_sim/faults")


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


# --- the clock: /time ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [{"kind": "missing_fields", "fields": ["serverTime"]}, {"kind": "bad_json"}],
    ids=["without-serverTime", "truncated-json"],
)
async def test_a_time_reply_without_a_server_time_is_unavailable_and_leaves_the_clock_alone(
    sim: SimServer, exchange: BinanceFutures, rule: dict[str, Any]
) -> None:
    measured = await exchange.sync_time()
    fault(sim, rule["kind"], TIME, **{k: v for k, v in rule.items() if k != "kind"})
    with pytest.raises(ExchangeUnavailable, match=r"^unexpected /time reply: ") as caught:
        await exchange.sync_time()
    assert caught.value.code == 0
    assert exchange.skew_ms == measured  # the offset is not "measured" from a reply that has no time in it
    assert await exchange.server_time_ms() > 0  # the next good reply is used as usual


async def test_a_measurement_of_the_clock_keeps_its_error_and_a_slower_one_does_not_replace_a_tighter_one(
    sim: SimServer, exchange: BinanceFutures
) -> None:
    """The offset is known to within half the round trip (domain/clocks.py); a measurement over a slow round trip
    (300 ms here) is less certain than the one held, so the held reading and its offset stay (one slow /time
    would otherwise make Apply fail closed on an error it does not have)."""
    assert exchange.clock_reading() is None
    await exchange.sync_time()
    first = exchange.clock_reading()
    assert first is not None and 1 <= first.error_ms < 150 and first.offset_ms == exchange.skew_ms
    fault(sim, "latency", TIME, ms=300)
    await exchange.sync_time()
    assert exchange.clock_reading() == first and exchange.skew_ms == first.offset_ms


# --- reads: bans and throttles ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "refusal"),
    [("http_418", ExchangeBanned), ("http_429", Throttled)],
    ids=["banned", "throttled"],
)
async def test_after_a_ban_or_a_throttle_the_next_read_does_not_leave(
    sim: SimServer, exchange: BinanceFutures, kind: str, refusal: type[ExchangeError]
) -> None:
    set_position(sim, SYMBOL, "40")
    fault(sim, kind, POSITIONS, count=None, retry_after=THROTTLE_S)
    with pytest.raises(ExchangeUnavailable) as answered:  # the exchange's own answer: a failed read
        await exchange.positions([SYMBOL])
    assert answered.value.code == -1003
    with pytest.raises(refusal) as caught:  # the guard's verdict, raised as itself, not as "unavailable"
        await exchange.positions([SYMBOL])
    assert type(caught.value) is refusal
    if refusal is ExchangeBanned:
        assert caught.value.code == 418 and "banned this IP" in caught.value.message
    else:
        assert "no room before the deadline" in caught.value.message
    assert hits(sim, POSITIONS) == 1  # the second read never reached the exchange


# --- orders: failures while the order is prepared ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "refusal"),
    [("http_418", ExchangeBanned), ("http_429", Throttled)],
    ids=["banned", "throttled"],
)
async def test_a_ban_or_a_throttle_while_an_order_is_prepared_is_raised_as_itself(
    sim: SimServer, exchange: BinanceFutures, kind: str, refusal: type[ExchangeError]
) -> None:
    """A fresh adapter loads exchangeInfo before its first request; that answer bans/throttles the IP, so the
    clock read the order needs cannot leave: the order is refused as banned/throttled (which Apply reports and
    alerts on as such), not as a plain NotSent."""
    set_position(sim, SYMBOL, "40")
    fault(sim, kind, INFO, count=None, retry_after=THROTTLE_S)
    count_requests(sim, TIME)
    with pytest.raises(refusal) as caught:
        await exchange.place_reduce_only_market(SYMBOL, "SELL", Decimal(1), COID)
    assert type(caught.value) is refusal
    assert (hits(sim, INFO), hits(sim, TIME)) == (1, 0)
    assert sim_orders(sim) == [] and sim_position(sim, SYMBOL) == Decimal(40)


@pytest.mark.parametrize(
    ("path", "rule", "code", "reason"),
    [
        (TIME, {"kind": "http_5xx", "status": 503}, -1001, "Internal error"),
        (TIME, {"kind": "missing_fields", "fields": ["serverTime"]}, 0, "unexpected /time reply"),
        (INFO, {"kind": "http_5xx", "status": 503}, -1001, "Internal error"),
    ],
    ids=["time-503", "time-without-serverTime", "exchangeInfo-503"],
)
async def test_an_order_whose_preparation_fails_is_not_sent_and_can_be_sent_later(
    sim: SimServer, exchange: BinanceFutures, path: str, rule: dict[str, Any], code: int, reason: str
) -> None:
    set_position(sim, SYMBOL, "40")
    fault(sim, rule["kind"], path, count=None, **{k: v for k, v in rule.items() if k != "kind"})
    with pytest.raises(NotSent, match=rf"^could not prepare the order: {reason}") as caught:
        await exchange.place_reduce_only_market(SYMBOL, "SELL", Decimal(1), COID)
    assert caught.value.code == code
    assert caught.value.signed_at_ms is None  # no order request was signed
    assert sim_orders(sim) == []
    # NotSent is the truth: once the exchange answers again the same order goes out, and exists once
    admin(sim, "DELETE", "/_sim/faults")
    report = await exchange.place_reduce_only_market(SYMBOL, "SELL", Decimal(1), COID)
    assert report.status == "FILLED" and report.executed_qty == 1
    assert [o["clientOrderId"] for o in sim_orders(sim)] == [COID]
    assert sim_position(sim, SYMBOL) == Decimal(39)


# --- order searches and lookups ------------------------------------------------------------------------------


async def test_a_symbol_the_exchange_does_not_know_has_no_orders(sim: SimServer, exchange: BinanceFutures) -> None:
    set_position(sim, SYMBOL, "40")
    await exchange.sync_time()
    since = exchange.now_ms() - 1000
    await exchange.place_reduce_only_market(SYMBOL, "SELL", Decimal(1), COID)
    assert [o.client_order_id for o in await exchange.orders_since(SYMBOL, since)] == [COID]
    assert await exchange.orders_since("NOPEUSDT", since) == []  # -1121 Invalid symbol: nothing to find


async def test_an_order_search_the_exchange_cannot_answer_is_raised_not_empty(
    sim: SimServer, exchange: BinanceFutures
) -> None:
    set_position(sim, SYMBOL, "40")
    await exchange.sync_time()
    since = exchange.now_ms() - 1000
    await exchange.place_reduce_only_market(SYMBOL, "SELL", Decimal(1), COID)
    fault(sim, "http_5xx", ALL_ORDERS, status=503)
    with pytest.raises(ExchangeUnavailable) as caught:  # "no orders" here would let the order be sent again
        await exchange.orders_since(SYMBOL, since)
    assert caught.value.code == -1001
    assert [o.client_order_id for o in await exchange.orders_since(SYMBOL, since)] == [COID]


async def test_after_a_ban_on_an_order_lookup_the_next_lookup_does_not_leave(
    sim: SimServer, exchange: BinanceFutures
) -> None:
    set_position(sim, SYMBOL, "40")
    await exchange.place_reduce_only_market(SYMBOL, "SELL", Decimal(1), COID)
    fault(sim, "http_418", ORDER, method="GET", count=None)
    with pytest.raises(ExchangeUnavailable, match=r"IP banned until .*\(code -1003\)$") as first:
        await exchange.query_order(SYMBOL, COID)
    assert first.value.code == -1003  # the executor's unknown outcome carries Binance's code
    # Banned, not "unavailable": the executor gives up looking at once instead of retrying into the ban.
    with pytest.raises(ExchangeBanned) as caught:
        await exchange.query_order(SYMBOL, COID)
    assert caught.value.code == 418
    assert hits(sim, ORDER) == 1
    assert [o["clientOrderId"] for o in sim_orders(sim)] == [COID]


@pytest.mark.parametrize("kind", ["missing_fields", "bad_json"])
async def test_an_unreadable_order_lookup_is_unavailable_never_absent(
    sim: SimServer, exchange: BinanceFutures, kind: str
) -> None:
    set_position(sim, SYMBOL, "40")
    await exchange.place_reduce_only_market(SYMBOL, "SELL", Decimal(1), COID)
    fault(sim, kind, ORDER, method="GET")
    # None would mean "no such order" and allow a resend; garbage proves nothing either way.
    with pytest.raises(ExchangeUnavailable, match=r"^unreadable order query reply \("):
        await exchange.query_order(SYMBOL, COID)
    found = await exchange.query_order(SYMBOL, COID)
    assert found is not None
    assert (found.client_order_id, found.status, found.executed_qty) == (COID, "FILLED", Decimal(1))
    assert len(sim_orders(sim)) == 1


# --- positions ------------------------------------------------------------------------------------------------


async def test_a_position_reply_that_is_not_rows_is_unavailable(sim: SimServer, exchange: BinanceFutures) -> None:
    set_position(sim, SYMBOL, "40")
    fault(sim, "missing_fields", POSITIONS, executed=True, fields=["positionAmt"])  # rows without an amount
    with pytest.raises(ExchangeUnavailable, match=r"^unexpected positionRisk reply \(field 'positionAmt'"):
        await exchange.positions([SYMBOL])
    assert (await exchange.positions([SYMBOL]))[SYMBOL].amt == Decimal(40)


@pytest.mark.parametrize(
    ("rule", "symbols"),
    [
        ({"kind": "late_execution", "answer": "empty"}, [SYMBOL]),
        ({"kind": "missing_fields", "executed": False}, [SYMBOL, "BTCUSDT"]),  # answers {} instead of rows
    ],
    ids=["empty-body", "object"],
)
async def test_a_position_reply_without_rows_is_not_read_as_flat(
    sim: SimServer, exchange: BinanceFutures, rule: dict[str, Any], symbols: list[str]
) -> None:
    set_position(sim, SYMBOL, "40")
    fault(sim, rule["kind"], POSITIONS, **{k: v for k, v in rule.items() if k != "kind"})
    with pytest.raises(ExchangeUnavailable, match=r"^unexpected positionRisk reply: "):
        await exchange.positions(symbols)
    assert (await exchange.positions([SYMBOL]))[SYMBOL].amt == Decimal(40)


# --- qt exchange check -----------------------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[str]:
    """A local address nothing listens on (bound, never listening: connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_check_stops_at_connectivity_when_the_exchange_answers_with_a_gateway_error(
    sim: SimServer, exchange: BinanceFutures
) -> None:
    fault(sim, "http_5xx", TIME, status=502, count=None)
    count_requests(sim, BALANCE)
    checks = await run_checks(exchange, [SYMBOL], sim.url)
    assert [(c.name, c.ok) for c in checks] == [("connectivity", False)]
    assert checks[0].detail.startswith(f"cannot reach the exchange at {sim.url}: ")
    assert "502 Bad Gateway" in checks[0].detail
    assert hits(sim, BALANCE) == 0  # nothing further was probed


async def test_check_stops_at_connectivity_when_nothing_listens(closed_port: str) -> None:
    exchange = exchange_at(closed_port)
    try:
        checks = await run_checks(exchange, [SYMBOL], closed_port)
    finally:
        await exchange.close()
    assert [(c.name, c.ok) for c in checks] == [("connectivity", False)]
    assert checks[0].detail.startswith(f"cannot reach the exchange at {closed_port}: ExchangeNotAvailable")


@pytest.mark.parametrize("rule", [{"kind": "missing_fields", "fields": ["dualSidePosition"]}, {"kind": "bad_json"}])
async def test_check_reports_an_unreadable_position_mode_and_goes_on(
    sim: SimServer, exchange: BinanceFutures, rule: dict[str, Any]
) -> None:
    fault(sim, rule["kind"], DUAL, **{k: v for k, v in rule.items() if k != "kind"})
    found = by_name(await run_checks(exchange, [SYMBOL], sim.url))
    mode = found["position mode"]
    assert not mode.ok
    assert mode.detail.startswith("cannot read the position mode: unexpected positionSide/dual reply: ")
    assert found["keys"].ok and found[f"filters {SYMBOL}"].ok and found["rate limits"].ok


async def test_check_reports_exchange_info_down_and_goes_on(sim: SimServer, exchange: BinanceFutures) -> None:
    fault(sim, "http_5xx", INFO, status=503, count=None)
    checks = await run_checks(exchange, [SYMBOL], sim.url)
    found = by_name(checks)
    assert not found["filters"].ok
    assert found["filters"].detail.startswith("exchangeInfo unavailable: Internal error")
    assert f"filters {SYMBOL}" not in found
    assert [c.name for c in checks if c.ok] == ["connectivity", "clock", "keys", "position mode", "rate limits"]
