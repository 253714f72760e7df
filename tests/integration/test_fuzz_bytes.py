"""Every byte is input (hypothesis): entries whose names and values are arbitrary bytes (not UTF-8, empty or
repeated names, thousands of fields, megabyte values) XADDed to every stream the services read, and arbitrary
bytes in the keys they read (permit slots, switches, hashes), against the running services.

No service dies, every unusable entry is dead-lettered with its reason and its exact bytes (read back from the
letter), the letters are readable by `qt audit --dead-letters` and the dashboard, and a good proposal sent
afterwards is still executed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from programs import qt

from conftest import (
    SIM_ADMIN,
    Chain,
    assert_nothing_pending,
    make_settings,
    plan_waiting_for_governor,
    set_position,
    sim_orders,
)
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.bus.entries import MAX_FIELDS, MAX_VALUE_CHARS, defect_of, raw_pairs
from quantum_trader.views.dashboard import dashboard_state
from quantum_trader.views.trail import fetch_report, fetch_story

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("QT_FUZZ_EXAMPLES", "4"))
# the streams the services read, and the dead-letter stream each one's defective entries go to
STREAMS = {
    keys.PROPOSAL_STREAM: keys.PROPOSAL_DLQ,
    keys.PLAN_STREAM: keys.PLAN_DLQ,
    keys.RESULT_STREAM: keys.RESULT_DLQ,
    keys.AUDIT_STREAM: keys.AUDIT_DLQ,
}
# streams only observers read (`qt report`, `qt audit`, the dashboard): nothing to dead-letter, nothing may break
OBSERVED = (keys.OPS_AUDIT_STREAM, keys.SERVICE_EVENTS_STREAM, keys.LEDGER_AUDIT_STREAM)
NOT_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80abc", b"ok\xfe"])
ANY_BYTES = st.one_of(st.binary(max_size=30), NOT_UTF8, st.builds(lambda a, b: a + b, st.binary(max_size=5), NOT_UTF8))
FIELD_NAMES = [b"proposal_id", b"symbol", b"action", b"qty", b"plan_id", b"issuer", b"decision", b"executed"]


def hostile_entry() -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    """A field list that is unusable for a byte-level reason (not merely a bad value)."""
    pair = st.tuples(st.one_of(st.sampled_from(FIELD_NAMES), ANY_BYTES), ANY_BYTES)
    not_utf8_name = st.tuples(NOT_UTF8, ANY_BYTES)
    not_utf8_value = st.tuples(st.sampled_from(FIELD_NAMES), NOT_UTF8)
    return st.one_of(
        st.builds(
            lambda pairs, bad: [*pairs, bad], st.lists(pair, max_size=4), st.one_of(not_utf8_name, not_utf8_value)
        ),
        st.builds(lambda name, v1, v2: [(name, v1), (name, v2)], st.sampled_from(FIELD_NAMES), ANY_BYTES, ANY_BYTES),
        st.builds(lambda v: [(b"", v), (b"symbol", b"BTCUSDT")], ANY_BYTES),
        st.just([(b"f%d" % n, b"v") for n in range(2000)]),  # thousands of fields
        st.just([(b"proposal_id", b"x"), (b"symbol", b"BTCUSDT"), (b"source", b"\x00" * (1 << 20))]),  # a megabyte
    )


def is_defective(pairs: list[tuple[bytes, bytes]]) -> bool:
    """Unusable for a byte-level reason, or carrying a value far beyond any schema's limit (refused there)."""
    flat = [part.decode("utf-8", "surrogateescape") for pair in pairs for part in pair]
    return bool(defect_of(flat)) or any(len(value) > 65_536 for _, value in pairs)


async def run(entries, permits, switches, sim, store_url: str, tmp: Path) -> None:
    settings_ = make_settings(tmp, store_url, sim.url, apply={"permit_wait_ms": 1500, "metrics_port": 0})
    chain = Chain(settings_)
    rds = make_client(store_url)
    raw = redis.Redis.from_url(store_url)  # a client that is not the project's own: bytes in, bytes out
    set_position(sim, "SOLUSDT", "40")
    set_position(sim, "ETHUSDT", "-0.5")
    try:
        await chain.start()
        # a plan waiting for its Governor permit, whose slots get arbitrary bytes
        victim = await plan_waiting_for_governor(rds, "ETHUSDT")
        for slot, value in permits:
            key = keys.governor_permit(victim.plan_id) if slot == "governor" else keys.p33_permit(victim.plan_id)
            raw.set(key, value, ex=60)
            raw.xadd(
                keys.AUDIT_STREAM,
                {b"plan_id": victim.plan_id.encode(), b"issuer": slot.encode(), b"decision": b"allow"},
            )
        # arbitrary bytes where the services read switches and hashes
        for name, value in switches:
            if name == "kill_switch":
                raw.set(keys.KILL_SWITCH, value)
            elif name == "mode":
                raw.set(keys.GOVERNOR_MODE, value)
            else:
                raw.hset(keys.snapshot("BNBUSDT"), b"mark_price", value)
        written: dict[str, list[tuple[str, list[tuple[bytes, bytes]]]]] = {stream: [] for stream in STREAMS}
        for stream, pairs in entries:
            entry_id = raw.execute_command("XADD", stream, "*", *[part for pair in pairs for part in pair]).decode()
            written[stream].append((entry_id, pairs))
            for observed in OBSERVED:  # the same bytes where only people read them
                raw.execute_command("XADD", observed, "*", *[part for pair in pairs for part in pair])
        victim_result = await ops.wait_result(rds, victim.plan_id, 10, victim.result_cursor)
        assert victim_result is not None and not victim_result.executed
        raw.delete(keys.KILL_SWITCH)
        await ops.set_governor_mode(rds, "auto", "fuzz")

        # every service is alive and still serves a good proposal
        assert all(not task.done() for task in chain.tasks.values()), "a service died on bytes"
        good = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
        result = await ops.wait_result(rds, good.plan_id, 15, good.result_cursor)
        assert result is not None and result.executed, result
        assert [o["clientOrderId"] for o in sim_orders(sim)] == [good.client_order_id]

        # every entry written is unusable (the strategy's promise), so each must come back as a dead letter
        assert all(is_defective(pairs) for pairs in (p for batch in written.values() for _, p in batch))
        # every defective entry was dead-lettered, with its reason and its exact bytes
        for stream, dlq in STREAMS.items():
            expected = {entry_id: pairs for entry_id, pairs in written[stream] if is_defective(pairs)}
            deadline = time.monotonic() + 10
            while True:
                letters = {f["source_id"]: f for _, f in await rds.xrange(dlq) if f.get("source_stream") == stream}
                if set(expected) <= set(letters) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert set(expected) <= set(letters), f"{stream}: not dead-lettered: {set(expected) - set(letters)}"
            for entry_id, pairs in expected.items():
                letter = letters[entry_id]
                assert letter["error"].startswith("malformed_entry: "), letter["error"]
                assert not getattr(letter, "defect", ""), "a dead letter must itself be readable text"
                kept = raw_pairs(letter)
                assert kept == [tuple(pair) for pair in pairs], f"{stream} {entry_id}: the letter lost bytes"
        # no group left anything pending (served, skipped or dead-lettered)
        await assert_nothing_pending(rds)
        # the operator's views read everything, hostile entries included, without failing
        report = await fetch_report(rds, 3600)
        assert report.plans >= 1 and json.dumps(report.as_dict())
        for plan_id in (victim.plan_id, good.plan_id):
            _, events = await fetch_story(rds, plan_id)
            assert events
        # the dashboard and `qt audit --dead-letters` read the letters
        state = await dashboard_state(rds, settings_)
        json.dumps(state)  # the page gets it as JSON
        letters_total = sum([await rds.xlen(dlq) for dlq in STREAMS.values()])
        assert state["dead_letters"]["count"] == letters_total
        if letters_total:
            assert state["dead_letters"]["latest"] and all(row["error"] for row in state["dead_letters"]["latest"])
    finally:
        await chain.stop()
        await rds.aclose()
        raw.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    entries=st.lists(st.tuples(st.sampled_from(sorted(STREAMS)), hostile_entry()), min_size=1, max_size=12),
    permits=st.lists(
        st.tuples(st.sampled_from(["governor", "p33"]), st.one_of(ANY_BYTES, st.just(b"\xff" * 100_000))), max_size=3
    ),
    switches=st.lists(st.tuples(st.sampled_from(["kill_switch", "mode", "snapshot"]), ANY_BYTES), max_size=3),
)
def test_no_bytes_crash_a_service_and_every_unusable_entry_is_dead_lettered_with_its_bytes(
    entries, permits, switches, sim_server, embedded_store, tmp_path_factory
) -> None:
    httpx.post(f"{sim_server.url}/_sim/reset", headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()
    client = redis.Redis.from_url(embedded_store)
    client.flushdb()
    client.close()
    asyncio.run(run(entries, permits, switches, sim_server, embedded_store, tmp_path_factory.mktemp("fzb")))


def test_the_limits_of_a_usable_entry() -> None:
    """The byte-level rules themselves, exactly at their limits."""
    fields = [part for n in range(MAX_FIELDS) for part in (f"f{n}", "v")]
    assert defect_of(fields) == ""
    assert defect_of([*fields, "one", "more"]) == f"{MAX_FIELDS + 1} fields (at most {MAX_FIELDS})"
    assert defect_of(["a", "x" * MAX_VALUE_CHARS]) == ""
    assert "characters long" in defect_of(["a", "x" * (MAX_VALUE_CHARS + 1)])
    assert defect_of(["a", "1", "a", "2"]) == "field name 'a' appears more than once"
    assert defect_of(["", "1"]) == "field 1 has an empty name"
    assert defect_of(["a", b"\xff".decode("utf-8", "surrogateescape")]) == "value of 'a' is not valid UTF-8"
    assert defect_of(["a"]) == "odd number of field names and values"


def test_qt_audit_lists_dead_letters_as_text(store_url: str, tmp_path: Path) -> None:
    """A letter of an entry that was bytes, not text, printed by the operator's command (table and JSON)."""
    raw = redis.Redis.from_url(store_url)
    try:
        raw.execute_command(
            "XADD",
            keys.PROPOSAL_DLQ,
            "*",
            b"orig.symbol",
            b"\\xff",
            b"error",
            b"malformed_entry: x",
            b"source_stream",
            keys.PROPOSAL_STREAM.encode(),
            b"source_id",
            b"1-0",
            b"service",
            b"apply",
        )
        raw.execute_command("XADD", keys.PLAN_DLQ, "*", b"error\xff", b"written into the DLQ directly")
    finally:
        raw.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    env.update({"QT_REDIS_URL": store_url, "QT_STATE_DIR": str(tmp_path)})
    table = qt("audit", "--dead-letters", env=env)
    assert table.returncode == 0, table.stderr
    assert "malformed_entry: x" in table.stdout and "unreadable dead letter" in table.stdout
    listed = json.loads(qt("audit", "--dead-letters", "--json", env=env).stdout)
    assert {row["dead_letter_stream"] for row in listed} == {keys.PROPOSAL_DLQ, keys.PLAN_DLQ}
    assert Decimal(len(listed)) == 2
