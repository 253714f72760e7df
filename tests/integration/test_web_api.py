"""The dashboard's HTTP API over a real store: state, and the kill switch behind the operator token."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from quantum_trader.bus import keys
from quantum_trader.settings import Settings
from quantum_trader.web.app import create_app

pytestmark = pytest.mark.integration
TOKEN = "web-test-token-0123456789"


@pytest.fixture
def client(tmp_path: Path, store_url: str):
    web = {"operator_token": TOKEN, "max_clients": 2}
    settings = Settings(redis_url=store_url, state_dir=tmp_path, web=web)  # type: ignore[arg-type]
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as running:
        yield running


def test_the_state_lists_switches_positions_and_plans(client: TestClient) -> None:
    state = client.get("/api/state").json()
    assert state["kill_switch"] is False and state["plans"] == [] and state["unresolved_orders"] == 0
    assert [row["symbol"] for row in state["symbols"]] == ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT"]
    assert client.get("/").text.startswith("<!doctype html>")


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}x", "Bearer "])
def test_the_kill_switch_needs_the_operator_token(client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    reply = client.post("/api/kill-switch", json={"on": True}, headers=headers)
    assert reply.status_code == 401 and "operator token" in reply.json()["error"]
    assert client.get("/api/state").json()["kill_switch"] is False


@pytest.mark.parametrize("body", [{"on": "yes"}, {}, [], {"on": 1}])
def test_a_malformed_flip_is_refused(client: TestClient, body: object) -> None:
    reply = client.post("/api/kill-switch", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 400


def test_with_the_token_the_switch_flips_and_is_audited(client: TestClient, store_url: str) -> None:
    import redis

    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/api/kill-switch", json={"on": True}, headers=auth).json() == {"kill_switch": True}
    assert client.get("/api/state").json()["kill_switch"] is True
    assert client.post("/api/kill-switch", json={"on": False}, headers=auth).status_code == 200
    store = redis.Redis.from_url(store_url, decode_responses=True)
    actions = [(f["action"], f["value"], f["who"]) for _, f in store.xrange(keys.OPS_AUDIT_STREAM)]
    store.close()
    assert actions == [("kill_switch", "on", "web"), ("kill_switch", "off", "web")]


def test_events_stream_a_state_at_once(client: TestClient) -> None:
    with client.stream("GET", "/events") as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = reply.iter_lines()
        assert next(lines) == "event: state"
        assert next(lines).startswith('data: {"at":')


def test_only_the_allowed_host_names_are_answered(client: TestClient) -> None:
    """A DNS-rebinding page reaches the port under its own name: it gets nothing, and cannot flip the switch."""
    headers = {"Host": "attacker.example", "Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/state", headers={"Host": "attacker.example"}).status_code == 400
    assert client.post("/api/kill-switch", json={"on": True}, headers=headers).status_code == 400
    assert client.get("/api/state", headers={"Host": "localhost"}).status_code == 200


def test_open_pages_are_capped_and_share_one_feed(client: TestClient) -> None:
    with client.stream("GET", "/events") as first, client.stream("GET", "/events") as second:
        for reply in (first, second):
            lines = reply.iter_lines()
            assert next(lines) == "event: state"
        third = client.get("/events")
        assert third.status_code == 503 and "too many" in third.json()["error"]
