"""The trail survives a store that loses everything (issue 21, point 7): the three services, as real processes,
append every audit, result and ledger line they write to the store to their local journals too; after the
store is wiped (what a failover or a host crash does to its newest lines, all at once), `qt report` and
`qt audit` still tell what happened, from the journals, and mark what only the journals kept."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from decimal import Decimal

import pytest

from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.domain.story import KEPT_IN
from quantum_trader.journal import read_journal
from quantum_trader.system import LocalSystem
from quantum_trader.views import trail

pytestmark = pytest.mark.integration

ENV = {"QT_GOVERNOR__COOLDOWN_S": "0", "QT_BRAIN__COOLDOWN_S": "0"}
CLOSES = {"XRPUSDT": Decimal("1.0"), "SOLUSDT": Decimal(1), "BNBUSDT": Decimal("0.01")}


async def _close_each(url: str) -> list[str]:
    rds = make_client(url)
    try:
        plan_ids = []
        for symbol, qty in CLOSES.items():
            sub = await ops.propose(rds, symbol, "PARTIAL_CLOSE", qty=qty, source="journal-test")
            result = await ops.wait_result(rds, sub.plan_id, 30, sub.result_cursor)
            assert result is not None and result.executed, result
            plan_ids.append(sub.plan_id)
        return plan_ids
    finally:
        await rds.aclose()


async def _wipe_and_read(system: LocalSystem, plan_id: str) -> tuple[object, list[object], int]:
    rds = make_client(system.urls["admin"])
    try:
        await rds.flushall()
        assert await rds.xlen(keys.RESULT_STREAM) == 0
        local = trail.read_local(system.settings.journal_dir)
        report = await trail.fetch_report(rds, 3600, local)
        plan, events = await trail.fetch_story(rds, plan_id, local)
        decisions = await trail.fetch_decisions(rds, 3600, symbol=None, issuer=None, decision="consumed", limit=100)
        return report, [plan, events], len(decisions)
    finally:
        await rds.aclose()


@pytest.mark.timeout(180)
def test_the_trail_of_a_wiped_store_is_told_from_the_services_journals() -> None:
    system = LocalSystem.private("qt-journal-", env=ENV)
    with system:
        system.start_infra()
        system.open_positions({"XRPUSDT": "1000.0", "SOLUSDT": "100", "BNBUSDT": "10.00"})
        system.start_services(together=True)
        plan_ids = asyncio.run(_close_each(system.urls["operator"]))
        report, (plan, events), consumed_without_journal = asyncio.run(_wipe_and_read(system, plan_ids[0]))
        cli_env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
        cli_env |= {"QT_REDIS_URL": system.urls["operator"], "QT_STATE_DIR": str(system.settings.state_dir)}
        shown = subprocess.run(
            [sys.executable, "-m", "quantum_trader", "audit", plan_ids[1]],
            env=cli_env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        reported = subprocess.run(
            [sys.executable, "-m", "quantum_trader", "report", "--since", "1h", "--json"],
            env=cli_env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    written = read_journal(system.settings.journal_dir)
    assert {r.service for r in written.records} >= {"apply", "governor", "p33"}, "each service keeps its journal"
    assert written.unreadable == {}
    # everything below comes from the journals alone: the store is empty
    assert report.executed == report.results == 3  # type: ignore[attr-defined]
    assert report.allows == 6 and report.kept_locally["results"] == 3  # type: ignore[attr-defined]
    assert report.kept_locally["ledger"] >= 3  # type: ignore[attr-defined]  # P3.3's ledger followed each fill
    steps = [e.step for e in events]  # type: ignore[attr-defined]
    assert plan[KEPT_IN] and steps.count("decision") == 2 and steps.count("consumed") == 2 and "result" in steps
    assert consumed_without_journal == 0  # without the journals the store has nothing left to tell
    assert shown.returncode == 0, shown.stderr
    assert "EXECUTED" in shown.stdout and "only in the journal of" in shown.stdout, shown.stdout
    assert reported.returncode == 0, reported.stderr
    assert json.loads(reported.stdout)["executed"] == 3
