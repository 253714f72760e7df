"""`qt break-glass` (issue 21, point 7): the close for the hour the chain fails closed. As an operator runs it, a
real process against the simulator over HTTP (the ccxt path used for testnet): refused without the explicit
flag, one reduce-only order with the operator's own key when the store is down, the intent and the outcome in
the local journal at once, and in the store's operator audit once one answers (`qt break-glass record`)."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import redis as sync_redis

from conftest import SIM_KEY, SIM_SECRET, set_position, sim_orders, sim_position
from quantum_trader.bus import keys
from quantum_trader.domain.oracle import plan_of_order
from quantum_trader.exchange.sim import SimServer
from quantum_trader.journal import read_journal
from quantum_trader.secrets import write_secret_file

pytestmark = pytest.mark.integration

SYMBOL = "BTCUSDT"
NO_STORE = "redis://127.0.0.1:1/0"  # nothing listens: the store is down


def _env(tmp_path: Path, sim: SimServer, store: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    env |= {
        "QT_STATE_DIR": str(tmp_path / "state"),
        "QT_EXCHANGE__MODE": "sim",
        "QT_EXCHANGE__SIM_URL": sim.url,
        "QT_REDIS_URL": store,
        "QT_OPERATOR": "alice",
    }
    return env


def _keys(tmp_path: Path) -> list[str]:
    write_secret_file(tmp_path / "op.key", SIM_KEY)
    write_secret_file(tmp_path / "op.secret", SIM_SECRET)
    return ["--key-file", str(tmp_path / "op.key"), "--secret-file", str(tmp_path / "op.secret")]


def _qt(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quantum_trader", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_the_explicit_flag_nothing_is_sent(sim: SimServer, tmp_path: Path) -> None:
    set_position(sim, SYMBOL, "0.05")
    done = _qt("break-glass", "close", SYMBOL, *_keys(tmp_path), env=_env(tmp_path, sim, NO_STORE))
    assert done.returncode == 2 and "refusing" in done.stderr and "--bypass-the-permit-chain" in done.stderr
    assert sim_orders(sim, SYMBOL) == [] and sim_position(sim, SYMBOL) == Decimal("0.05")


def test_a_close_with_the_store_down_is_journaled_and_recorded_once_a_store_answers(
    sim: SimServer, tmp_path: Path, store_url: str
) -> None:
    set_position(sim, SYMBOL, "0.05")
    env = _env(tmp_path, sim, NO_STORE)
    done = _qt("break-glass", "close", SYMBOL, "--qty", "0.02", *_keys(tmp_path), "--bypass-the-permit-chain", env=env)
    assert done.returncode == 0, done.stderr
    assert "FILLED" in done.stdout and "no store answered" in done.stdout, done.stdout
    [order] = sim_orders(sim, SYMBOL)
    assert order["reduceOnly"] in (True, "true") and order["side"] == "SELL"
    assert plan_of_order(order["clientOrderId"]) is None  # never mistaken for a plan's forgotten order
    assert sim_position(sim, SYMBOL) == Decimal("0.03")
    lines = [r.fields for r in read_journal(tmp_path / "state" / "journal").records]
    assert [f["action"] for f in lines] == ["break_glass_close", "break_glass_result"]
    assert all(f["who"] == "alice" for f in lines) and order["clientOrderId"] in lines[0]["value"]

    env["QT_REDIS_URL"] = store_url
    recorded = _qt("break-glass", "record", env=env)
    assert recorded.returncode == 0 and "2 break-glass line(s) added" in recorded.stdout, recorded.stderr
    again = _qt("break-glass", "record", env=env)
    assert "0 break-glass line(s) added" in again.stdout  # each line once
    with sync_redis.Redis.from_url(store_url, decode_responses=True) as store:
        audit = [fields for _, fields in store.xrange(keys.OPS_AUDIT_STREAM) if fields["action"].startswith("break")]
    assert audit == lines


def test_a_close_larger_than_the_position_sends_nothing(sim: SimServer, tmp_path: Path) -> None:
    set_position(sim, SYMBOL, "-0.01")
    env = _env(tmp_path, sim, NO_STORE)
    done = _qt("break-glass", "close", SYMBOL, "--qty", "0.02", *_keys(tmp_path), "--bypass-the-permit-chain", env=env)
    assert done.returncode == 1 and "at most the position's size 0.01" in done.stderr, done.stderr
    assert sim_orders(sim, SYMBOL) == [] and read_journal(tmp_path / "state" / "journal").records == []


def test_a_key_file_others_can_read_is_refused_by_name(sim: SimServer, tmp_path: Path) -> None:
    set_position(sim, SYMBOL, "0.05")
    args = _keys(tmp_path)
    (tmp_path / "op.key").chmod(0o644)
    done = _qt("break-glass", "close", SYMBOL, *args, "--bypass-the-permit-chain", env=_env(tmp_path, sim, NO_STORE))
    assert done.returncode == 2 and "op.key must be mode 0600" in done.stderr, done.stderr
    assert SIM_KEY not in done.stderr + done.stdout and sim_orders(sim, SYMBOL) == []


def test_a_close_that_cannot_be_journaled_is_not_sent(sim: SimServer, tmp_path: Path) -> None:
    """The journal is the record that survives everything: no record, no order."""
    set_position(sim, SYMBOL, "0.05")
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the journal directory should be")
    env = _env(tmp_path, sim, NO_STORE) | {"QT_JOURNAL__DIR": str(blocked)}
    done = _qt("break-glass", "close", SYMBOL, *_keys(tmp_path), "--bypass-the-permit-chain", env=env)
    assert done.returncode == 1 and "nothing was sent" in done.stderr, done.stderr
    assert sim_orders(sim, SYMBOL) == [] and sim_position(sim, SYMBOL) == Decimal("0.05")


@pytest.mark.parametrize("qty", ["NaN", "-0.01", "0", "Infinity"])
def test_a_quantity_that_is_not_a_positive_number_is_refused_before_anything(
    sim: SimServer, tmp_path: Path, qty: str
) -> None:
    set_position(sim, SYMBOL, "0.05")
    args = ("break-glass", "close", SYMBOL, "--qty", qty, *_keys(tmp_path), "--bypass-the-permit-chain")
    done = _qt(*args, env=_env(tmp_path, sim, NO_STORE))
    assert done.returncode == 2 and "--qty" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert sim_orders(sim, SYMBOL) == []
