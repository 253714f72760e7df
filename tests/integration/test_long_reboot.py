"""A long reboot, with real processes and a real gap of more than a minute (issue 20, what was seen 2).

A PARTIAL_CLOSE executes; the host loses power (store and services killed) and the store comes back from a
snapshot taken before that proposal; the host stays down 65 s; a strategy proposes a close of another symbol
before Apply is back; then the services start. Before the fix the search for forgotten orders started a
minute before the instance's start (the newest entry was the one added after it), missed the filled order,
and the strategy's retry of the unanswered proposal closed the position a second time. Now: the forgotten
order is found and answered under its proposal id (``adopted``), the other symbol's close executes, and the
retry closes nothing.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import pytest
from test_order_properties import services

from conftest import set_position, sim_orders, sim_position, until
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.bus.embedded import EmbeddedStore
from quantum_trader.domain.oracle import plan_of_order

pytestmark = pytest.mark.integration

DOWN_S = 65.0  # longer than the search's one-minute margin before the newest proposal the store kept
FORGOTTEN, OTHER = "XRPUSDT", "SOLUSDT"
START = {FORGOTTEN: Decimal("5000.0"), OTHER: Decimal(500)}
CLOSE = {FORGOTTEN: Decimal("10.0"), OTHER: Decimal(1)}


def orders_of(sim, plan_id: str) -> list[dict]:
    return [o for o in sim_orders(sim) if plan_of_order(o["clientOrderId"]) == plan_id]


# A real 65 s gap: make test-long. Its rule (the search starts a minute before the newest proposal the instance
# kept, whatever came after) is checked in make test by tests/integration/test_apply_sweep.py (``with_floor``).
@pytest.mark.long
@pytest.mark.timeout(240)
async def test_an_order_forgotten_across_a_long_power_loss_is_found_and_its_retry_closes_nothing(
    sim, tmp_path: Path
) -> None:
    for symbol, amt in START.items():
        set_position(sim, symbol, str(amt))
    store = EmbeddedStore(Path(tempfile.mkdtemp(prefix="qt-reboot-")), persist=True)
    url = store.start()
    system = services(url, sim.url, tmp_path)
    rds = make_client(url)
    try:
        system.start_services(together=True)
        snapshot = tmp_path / "before.rdb"
        store.snapshot(url, snapshot)
        first = await ops.propose(rds, FORGOTTEN, "PARTIAL_CLOSE", qty=CLOSE[FORGOTTEN], proposal_id="reboot-1")
        result = await ops.wait_result(rds, first.plan_id, 30, first.result_cursor)
        assert result is not None and result.executed

        # power loss: everything dies; the host stays down for more than a minute
        for service in ("apply", "governor", "brain"):
            system.stop_service(service, kill=True)
        store.kill()
        await rds.aclose()
        down_from = time.monotonic()
        await asyncio.sleep(DOWN_S)
        store.start_from(snapshot, url)
        rds = make_client(url)
        assert not await rds.xrange(keys.PROPOSAL_STREAM, first.entry_id, first.entry_id)  # forgotten
        # (past the instance's first second or so: a proposal added then counts as older than the instance, as its
        # start is known to the second only, and would be answered store_changed)
        await asyncio.sleep(2.0)
        other = await ops.propose(rds, OTHER, "PARTIAL_CLOSE", qty=CLOSE[OTHER], proposal_id="reboot-2")
        system.start_services(together=True)
        assert time.monotonic() - down_from > DOWN_S

        done = await ops.wait_result(rds, other.plan_id, 60, other.result_cursor)
        assert done is not None and done.executed, done

        async def forgotten_answered() -> bool:
            return await ops.result_of(rds, first.plan_id) is not None

        await until(forgotten_answered, timeout=60)
        adopted = await ops.result_of(rds, first.plan_id)
        assert adopted is not None
        assert (adopted.proposal_id, adopted.executed, adopted.adopted, adopted.filled_qty) == (
            "reboot-1",
            True,
            True,
            CLOSE[FORGOTTEN],
        )

        # the strategy never saw an answer survive: it sends the proposal again
        retry = await ops.propose(rds, FORGOTTEN, "PARTIAL_CLOSE", qty=CLOSE[FORGOTTEN], proposal_id="reboot-1")

        async def retry_handled() -> bool:
            return int((await rds.xpending(keys.PROPOSAL_STREAM, keys.APPLY_GROUP))["pending"]) == 0

        await until(retry_handled, timeout=30)
        await asyncio.sleep(0.5)  # anything that would send twice has had its chance
        assert retry.plan_id == first.plan_id
        assert len(orders_of(sim, first.plan_id)) == 1
        assert sim_position(sim, FORGOTTEN) == START[FORGOTTEN] - CLOSE[FORGOTTEN]
        assert sim_position(sim, OTHER) == START[OTHER] - CLOSE[OTHER]
    finally:
        system.stop()
        await rds.aclose()
        store.stop()
