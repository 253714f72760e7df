"""The store forgets: a snapshot is taken at a point of the order path, the flow goes on to its end (the order
fills, the result is published, the ledger follows), then the store is killed and comes back with the
snapshot's data only, as after a host's power loss (``appendfsync everysec`` loses the last second or two) or
a failover to a replica that had not caught up.

Either the services die with it (host crash: restarted afterwards, P3.3 reconciles on start) or they are left
running (failover: they reconnect to an instance that has forgotten). Every case: exactly one order on the
exchange, the plan's last result agrees with it, P3.3's ledger ends equal to the exchange, and the chain
still executes a new plan afterwards. The independent oracle (domain/oracle.py) judges each case too, from
the audit lines and plans observed before the loss and after it: both orders' consumed permits verified with
the issuers' keys, one result each in the store, agreeing with the exchange.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from conftest import SIM_ADMIN, Chain, make_settings, set_position, sim_orders, sim_position, until, wait_key
from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.bus.embedded import EmbeddedStore
from quantum_trader.bus.streams import ensure_group
from quantum_trader.domain import oracle
from quantum_trader.domain.models import Ledger, from_fields
from quantum_trader.domain.oracle import plan_of_order
from quantum_trader.secrets import permit_key

pytestmark = pytest.mark.integration

SYMBOL, START, CLOSE = "XRPUSDT", Decimal("1000.0"), Decimal(10)
POINTS = (
    "before_proposal",
    "proposal_read",
    "plan_published",
    "permits_consumed",
    "order_sent",
    "result_published",
    "ledger_followed",
)


def add_fault(sim, **rule) -> None:
    httpx.post(f"{sim.url}/_sim/faults", json=rule, headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()


async def results_of(rds: aioredis.Redis, plan_id: str) -> list[dict[str, str]]:
    return [f for _, f in await rds.xrange(keys.RESULT_STREAM) if f.get("plan_id") == plan_id]


async def ledger_amt(rds: aioredis.Redis) -> Decimal | None:
    fields = await rds.hgetall(keys.ledger(SYMBOL))
    return from_fields(Ledger, fields).last_known_amt if fields else None


class Run:
    """One store, one chain, one plan: drive it to ``point``, snapshot, finish, lose what came after."""

    def __init__(self, sim, tmp: Path) -> None:
        self.sim = sim
        self.store = EmbeddedStore(Path(tempfile.mkdtemp(prefix="qt-loss-")), persist=True)
        self.url = self.store.start()
        self.snapshot = tmp / "snapshot.rdb"
        self.settings = make_settings(
            tmp,
            self.url,
            sim.url,
            apply={"permit_wait_ms": 3000, "metrics_port": 0, "order_resolve_timeout_s": 10},
            governor={"max_per_symbol": 1000, "max_total": 1000, "cooldown_s": 0, "metrics_port": 0},
        )
        self.chain = Chain(self.settings)
        self.rds = make_client(self.url)
        # the observer's copy of the audit and plan streams: what the store forgets stays here
        self.seen: dict[str, dict[str, dict[str, str]]] = {keys.AUDIT_STREAM: {}, keys.PLAN_STREAM: {}}

    async def observe(self) -> None:
        for stream, copy in self.seen.items():
            copy.update(await self.rds.xrange(stream))

    async def judge(self, plan_ids: list[str]) -> oracle.Findings:
        """The oracle over the exchange's orders for ``plan_ids``, the observed evidence and the store's results."""
        await self.observe()
        wanted = set(plan_ids)
        return oracle.check(
            [o for o in sim_orders(self.sim, SYMBOL) if oracle.plan_of_order(o["clientOrderId"]) in wanted],
            self.seen[keys.AUDIT_STREAM].values(),
            self.seen[keys.PLAN_STREAM].values(),
            [f for _, f in await self.rds.xrange(keys.RESULT_STREAM)],
            oracle.IssuerKeys(permit_key(self.settings, "governor"), permit_key(self.settings, "p33")),
            expected=plan_ids,
            ttl_s=self.settings.permit_ttl_s,
        )

    async def drive_to(self, point: str) -> ops.Submitted:
        """Propose one close and take the snapshot at ``point``; returns when the flow has finished."""
        rds, chain = self.rds, self.chain
        if point == "before_proposal":
            # the store will forget the proposal itself: no redelivery can bring the plan back
            await chain.start()
            self.store.snapshot(self.url, self.snapshot)
            sub = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=CLOSE)
        elif point == "proposal_read":
            # the proposal is delivered to Apply's group and nothing else has happened: read it as Apply would
            # (Apply ran before, so the store instance's epoch is recorded, as it is in a running system)
            await chain.start()
            await chain.crash("apply")
            sub = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=CLOSE)
            await ensure_group(rds, keys.PROPOSAL_STREAM, keys.APPLY_GROUP)
            read = await rds.xreadgroup(keys.APPLY_GROUP, "apply-test", {keys.PROPOSAL_STREAM: ">"}, count=10)
            assert [entry_id for entry_id, _ in read[0][1]] == [sub.entry_id]
            self.store.snapshot(self.url, self.snapshot)
            await chain.start("apply")  # its pending proposal first
        elif point == "plan_published":
            await chain.start()
            await ops.set_governor_mode(rds, "manual", "test")
            sub = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=CLOSE)
            await wait_key(rds, keys.p33_permit(sub.plan_id))
            self.store.snapshot(self.url, self.snapshot)
            await ops.set_governor_mode(rds, "auto", "test")
            await ops.decide_manually(rds, self.settings, sub.plan_id, grant=True, reason="", operator="test")
        elif point == "permits_consumed":
            add_fault(self.sim, kind="latency", ms=600, path="/fapi/v1/order", method="POST", count=1)
            await chain.start()
            sub = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=CLOSE)
            await wait_key(rds, keys.executed_marker(sub.plan_id))
            self.store.snapshot(self.url, self.snapshot)
            assert sim_orders(self.sim, SYMBOL) == [], "the snapshot must predate the order"
        elif point == "order_sent":
            add_fault(self.sim, kind="timeout_after_fill", ms=1500, path="/fapi/v1/order", method="POST", count=1)
            await chain.start()
            sub = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=CLOSE)
            await until(_has_order(self.sim, sub.plan_id))
            assert not await rds.exists(keys.result_marker(sub.plan_id))
            self.store.snapshot(self.url, self.snapshot)
        elif point == "result_published":
            # P3.3 decides, then stops before the result comes: the snapshot has the result, not the ledger's move
            add_fault(self.sim, kind="latency", ms=300, path="/fapi/v1/order", method="POST", count=1)
            await chain.start()
            sub = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=CLOSE)
            await wait_key(rds, keys.decision_claim("p33", sub.plan_id))
            await chain.crash("brain")
            await wait_key(rds, keys.result_marker(sub.plan_id))
            assert await ledger_amt(rds) == START
            self.store.snapshot(self.url, self.snapshot)
            await chain.start_one("brain")
        else:
            assert point == "ledger_followed"
            await chain.start()
            sub = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=CLOSE)

            async def followed() -> bool:
                return await ledger_amt(rds) == START - CLOSE

            await until(followed)
            self.store.snapshot(self.url, self.snapshot)
        result = await ops.wait_result(rds, sub.plan_id, 20, sub.result_cursor)
        assert result is not None and result.executed and result.filled_qty == CLOSE

        async def followed_end() -> bool:
            return await ledger_amt(rds) == START - CLOSE

        await until(followed_end)
        return sub

    async def lose(self, services_die: bool) -> None:
        """The store comes back with the snapshot's data only; with ``services_die`` (host crash) the services
        die with it and start again afterwards, otherwise they ride it out (failover)."""
        await self.observe()  # what the store is about to forget happened
        self.store.kill()
        if services_die:
            for name in list(self.chain.tasks):
                await self.chain.crash(name)
        self.store.start_from(self.snapshot, self.url)
        await self.rds.connection_pool.disconnect()  # this observer's connections went with the old instance
        if services_die:
            await self.chain.start()

    async def close(self) -> None:
        await self.chain.stop()
        await self.rds.aclose()
        self.store.stop()


def _has_order(sim, plan_id: str):
    async def check() -> bool:
        return any(plan_of_order(o["clientOrderId"]) == plan_id for o in sim_orders(sim, SYMBOL))

    return check


# Every point with the services dying too (a host's power loss) in make test; with the services left running (a
# failover to a replica that had not caught up) the points of the order path (the consume, the send, the result)
# in make test and the rest in make test-long (each ~12 s; make test stays under its 15 minutes).
FAILOVER_IN_MAKE_TEST = ("permits_consumed", "order_sent", "result_published")
LOSS_CASES = [
    pytest.param(
        point,
        dies,
        id=f"{point}-{'host_crash' if dies else 'failover'}",
        marks=() if dies or point in FAILOVER_IN_MAKE_TEST else (pytest.mark.long,),
    )
    for point in POINTS
    for dies in (True, False)
]


@pytest.mark.parametrize(("point", "services_die"), LOSS_CASES)
async def test_a_store_that_forgets_never_causes_a_second_order_nor_a_false_result(
    sim, tmp_path: Path, point: str, services_die: bool
) -> None:
    set_position(sim, SYMBOL, str(START))
    run = Run(sim, tmp_path)
    try:
        sub = await run.drive_to(point)
        orders = [o for o in sim_orders(sim, SYMBOL) if plan_of_order(o["clientOrderId"]) == sub.plan_id]
        assert len(orders) == 1

        rds = run.rds
        first_result = await rds.get(keys.result_marker(sub.plan_id))
        await run.lose(services_die)
        kept = await rds.xrange(keys.RESULT_STREAM, first_result, first_result)
        forgot_result = point not in ("result_published", "ledger_followed")
        assert bool(kept) != forgot_result, "the store must have forgotten exactly what came after the snapshot"

        async def has_result() -> bool:
            return bool(await results_of(rds, sub.plan_id))

        await until(has_result, timeout=40)
        await asyncio.sleep(0.5)  # anything that would send twice has had its chance: the order would be there
        orders = [o for o in sim_orders(sim, SYMBOL) if plan_of_order(o["clientOrderId"]) == sub.plan_id]
        assert len(orders) == 1, f"{point}: {len(orders)} orders for one plan"
        assert sim_position(sim, SYMBOL) == START - CLOSE
        last = (await results_of(rds, sub.plan_id))[-1]
        assert last["executed"] == "true", f"{point}: the last result says {last} though the order filled"
        assert Decimal(last["filled_qty"]) == Decimal(orders[0]["executedQty"]) == CLOSE
        assert last["order_id"] == str(orders[0]["orderId"])
        # found on the exchange, not re-sent: adopted when the store had forgotten the consumption too,
        # recovered from its intent (the executed marker) when it had not
        assert (last["adopted"] == "true") == (point in ("before_proposal", "proposal_read", "plan_published"))

        # the ledger ends where the exchange is, and the chain still closes (the snapshot of "plan_published"
        # has the Governor in manual mode, as the operator had set it then)
        await ops.set_governor_mode(rds, "auto", "test")

        async def ledger_agrees() -> bool:
            return await ledger_amt(rds) == sim_position(sim, SYMBOL)

        await until(ledger_agrees, timeout=20)
        after = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=CLOSE)
        result = await ops.wait_result(rds, after.plan_id, 30, after.result_cursor)
        assert result is not None and result.executed, f"{point}: the next plan did not execute: {result}"
        assert sim_position(sim, SYMBOL) == START - 2 * CLOSE
        await until(ledger_agrees, timeout=20)
        found = await run.judge([sub.plan_id, after.plan_id])
        assert found.ok, f"{point}: the oracle: {found.describe()}"
        assert (found.orders_checked, found.orders_verified, found.plans_checked) == (2, 2, 2)
    finally:
        await run.close()


async def test_a_plan_the_store_forgot_before_the_send_is_not_sent_while_an_earlier_send_could_land(
    sim, tmp_path: Path
) -> None:
    """The loss takes away the permits' consumption while the order request is still on its way (the exchange
    holds it and executes it late). The re-planned plan must not send: the exchange is asked, and absence only
    counts once the first request can no longer execute."""
    set_position(sim, SYMBOL, str(START))
    run = Run(sim, tmp_path)
    try:
        add_fault(sim, kind="latency", ms=700, path="/fapi/v1/order", method="POST", count=1)
        await run.chain.start()
        await ops.set_governor_mode(run.rds, "manual", "test")  # nothing is consumed before the snapshot
        sub = await ops.propose(run.rds, SYMBOL, "PARTIAL_CLOSE", qty=CLOSE)
        await wait_key(run.rds, keys.p33_permit(sub.plan_id))
        run.store.snapshot(run.url, run.snapshot)  # the plan is published; its consumption is yet to come
        await ops.decide_manually(run.rds, run.chain.settings, sub.plan_id, grant=True, reason="", operator="t")
        await wait_key(run.rds, keys.executed_marker(sub.plan_id))
        consumed = [i for i, f in await run.rds.xrange(keys.AUDIT_STREAM) if f.get("decision") == "consumed"]
        await run.lose(services_die=False)  # while the order request is held by the exchange
        assert len(consumed) == 2 and not await run.rds.xrange(keys.AUDIT_STREAM, consumed[0], consumed[-1])
        started = time.monotonic()

        async def has_result() -> bool:
            return bool(await results_of(run.rds, sub.plan_id))

        await until(has_result, timeout=40)
        orders = [o for o in sim_orders(sim, SYMBOL) if plan_of_order(o["clientOrderId"]) == sub.plan_id]
        assert len(orders) == 1
        last = (await results_of(run.rds, sub.plan_id))[-1]
        assert last["executed"] == "true" and Decimal(last["filled_qty"]) == CLOSE, last
        assert time.monotonic() - started < 40
        found = await run.judge([sub.plan_id])
        assert found.ok and found.orders_verified == found.plans_checked == 1, found.describe()
    finally:
        await run.close()


@pytest.mark.parametrize("loss", [None, "host_crash", "failover"])
async def test_a_retry_with_the_same_proposal_id_closes_once(sim, tmp_path: Path, loss: str | None) -> None:
    """A strategy's retry (the same proposal id, the same request, a new entry) after its proposal executed:
    no second order, and the client finds its proposal's one result by its id. With a store loss in between
    (the store comes back without the proposal, its plan and its result) the exchange decides: the search for
    forgotten orders answers the plan with its order before the retry is handled (issue 20, what was seen 1)."""
    set_position(sim, SYMBOL, str(START))
    run = Run(sim, tmp_path)
    try:
        rds = run.rds
        await run.chain.start()
        run.store.snapshot(run.url, run.snapshot)  # before the proposal: a loss forgets all of it
        sub = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=CLOSE, proposal_id="strategy-retry-1")
        first = await ops.wait_result(rds, sub.plan_id, 20, sub.result_cursor)
        assert first is not None and first.executed and first.proposal_id == "strategy-retry-1"
        if loss is not None:
            await run.lose(services_die=loss == "host_crash")
            assert not await rds.xrange(keys.PROPOSAL_STREAM, sub.entry_id, sub.entry_id)  # forgotten
        retry = await ops.propose(rds, SYMBOL, "PARTIAL_CLOSE", qty=CLOSE, proposal_id="strategy-retry-1")
        assert retry.plan_id == sub.plan_id

        async def answered() -> bool:
            pending = await rds.xpending(keys.PROPOSAL_STREAM, keys.APPLY_GROUP)
            return bool(await results_of(rds, sub.plan_id)) and int(pending["pending"]) == 0

        await until(answered, timeout=40)
        await asyncio.sleep(0.5)  # anything that would send twice has had its chance: the order would be there
        orders = [o for o in sim_orders(sim, SYMBOL) if plan_of_order(o["clientOrderId"]) == sub.plan_id]
        assert len(orders) == 1 and sim_position(sim, SYMBOL) == START - CLOSE
        results = [f for _, f in await rds.xrange(keys.RESULT_STREAM) if f.get("proposal_id") == "strategy-retry-1"]
        assert len(results) == 1, results  # the store holds one answer to the proposal id
        (answer,) = results
        assert (answer["plan_id"], answer["executed"], Decimal(answer["filled_qty"])) == (sub.plan_id, "true", CLOSE)
        assert answer["adopted"] == ("false" if loss is None else "true")  # after a loss: found on the exchange
        plans = [f for _, f in await rds.xrange(keys.PLAN_STREAM) if f.get("proposal_id") == "strategy-retry-1"]
        assert len(plans) == (1 if loss is None else 0)  # the forgotten plan is not published again
    finally:
        await run.close()
