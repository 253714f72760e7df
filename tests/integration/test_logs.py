"""Structured logs: with JSON on, every line about a plan carries its plan_id (one grep tells its story)."""

from __future__ import annotations

import json

import pytest
import structlog

from conftest import Chain, set_position
from quantum_trader import logs, ops

pytestmark = pytest.mark.integration


async def test_every_json_line_about_a_plan_carries_its_plan_id(sim, rds, chain: Chain, capsys) -> None:
    logs.configure(json=True, level="info")
    try:
        set_position(sim, "SOLUSDT", "40")
        await chain.start()
        await ops.set_kill_switch(rds, True, "test")
        denied = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
        assert await ops.wait_result(rds, denied.plan_id, 10, denied.result_cursor) is not None
        await ops.set_kill_switch(rds, False, "test")
        done = await ops.propose(rds, "SOLUSDT", "FULL_CLOSE")
        result = await ops.wait_result(rds, done.plan_id, 10, done.result_cursor)
        assert result is not None and result.executed
        await chain.stop()
    finally:
        # back to the session's defaults: a configuration made now would keep writing to this test's captured
        # (and soon closed) stderr, and every later service would fail on its first log line
        structlog.reset_defaults()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    for plan_id in (denied.plan_id, done.plan_id):
        about = [line for line in lines if plan_id in json.dumps(line)]
        assert len(about) >= 3, f"too few lines about {plan_id}: {about}"
        assert all(line.get("plan_id") == plan_id for line in about), [x for x in about if "plan_id" not in x]
        assert {"timestamp", "level", "event"} <= set(about[0])
