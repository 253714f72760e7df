"""``qt chaos``: run a private chain (separate processes, AOF store, ACL users) while killing its parts.

Plans flow at a steady rate; meanwhile a random service is killed with SIGKILL and restarted every few seconds,
and once the store itself is killed and restarted on its append-only file. With ``--store-loss`` the store
also forgets, three times (at 20, 35 and 80 % of the plans): a snapshot is taken, the flow goes on for a
second or two, and the store comes back with the snapshot's data only, with the services left running (a
failover to a replica that had not caught up) or killed with it (a host's power loss), alternately.

Half of the service kills, and the store restart, are aimed: they wait (at most a second) for a moment when a
plan is inside the order path (its permits consumed, no result yet) and count where they landed. At the end,
with the Governor in manual mode, one forged Governor permit per attack is written into a waiting plan's
slot: each must be rejected, and none may execute.

An observer keeps its own copy of every audit line, plan and result as they appear (the store may forget them
later). Afterwards the exchange's orders, that copy and the store's final records are checked against the
promises, by the counts below and by the independent oracle (domain/oracle.py: it verifies the permits
consumed for every order itself, from the bytes in the ``consumed`` audit lines), and a table is printed. The
verdict (:func:`verdict`) also requires that the run did something: plans executed, services killed (and the
store lost, with --store-loss) with some of it landing inside the order path, forgeries attempted and
rejected. Exit status 1 when any promise was broken, the run proved nothing, or the chain took more than 2 s to
recover from the store restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from quantum_trader import ops
from quantum_trader.bus import keys
from quantum_trader.bus.connection import SENTINEL_SCHEMES, StoreUnavailable, make_client, split_netloc, sync_client
from quantum_trader.bus.embedded import APPENDFSYNC
from quantum_trader.domain import oracle
from quantum_trader.domain.models import GovernorPermit, Plan, from_fields
from quantum_trader.domain.permits import encode_permit, sign
from quantum_trader.domain.story import percentile
from quantum_trader.secrets import permit_key
from quantum_trader.settings import Settings
from quantum_trader.tasks import cancel_and_wait

# --stream-faults: what is armed on the simulator's user-data stream every 1-3 s (exchange/sim/stream.py); the
# silences: one shorter than the services' silence bound (events lost unnoticed: the next event or the safety
# poll corrects), one longer (noticed, reconnected, resynced)
STREAM_FAULTS: list[tuple[str, dict[str, int]]] = [
    ("drop", {}),
    ("cut", {}),  # Binance's 24-hour cut (1001)
    ("expire", {}),  # the listen key's lifetime ends: listenKeyExpired, then -1125 for a PUT
    ("silence", {"ms": 2000}),
    ("silence", {"ms": 7000}),
    ("delay", {"ms": 400, "count": 5}),
    ("duplicate", {"count": 5}),
    ("reorder", {"count": 4}),
    ("garbage", {"count": 2}),
]
SNAPSHOT_SAMPLE_S = 0.2
FILL_SAMPLE_S = 0.02  # how often the snapshots are read to time each fill's arrival in them
EVENTS_READ_S = 1.0  # how often the exchange's recorded fills are read (it keeps the last 2,000 events)
# the longest a snapshot may disagree with the exchange under those faults: a lost event waits for the next
# one of its symbol or is noticed with the silence (5 s) + the reconnect and resync (about 1 s); the poll takes
# over at 5 s meanwhile
SNAPSHOT_LAG_LIMIT_S = 15.0
CHAOS_HORIZON_MS = 3000  # the late-execution horizon of the run (shorter than the default's 10 s)
# Recovery: from the restarted store's return to a new proposal's result. New proposals wait until the exchange
# was searched for orders the store may have forgotten, after every order request sent before the restart could
# have shown (the permit window, 1.2 s by default, plus the horizon); then 2 s for the services to be back.
RECOVERY_LIMIT_S = round(1.2 + CHAOS_HORIZON_MS / 1000 + 2.0, 1)
# After a store loss: how long a client waits for the result of a proposal the store no longer has before it
# calls the proposal forgotten (Apply's search for orders the store forgot runs within seconds of the loss).
FORGOTTEN_AFTER_S = 15.0
OBSERVER_CATCH_UP_S = 0.5  # the observer's reads block 200 ms at most
PROPOSE_PATIENCE_S = 60.0  # a store that takes no proposal for this long is not coming back: the run fails
AIM_S = 10.0  # an aimed kill waits at most this long for a plan inside the order path (one comes within a second)
# An aimed kill (and a store loss) holds the next order at the exchange this long (inside its 1 s recvWindow,
# so it still fills): the plan that sends it is in the order path (consumed, no result) for that long, so the
# kill or the loss lands there by construction.
HELD_ORDER = {"kind": "latency", "ms": 700, "path": "/fapi/v1/order", "method": "POST", "count": 1}
# Before the store restart the next position reads are slowed (Apply reads the position to plan a proposal; P3.3
# polls the same endpoint), so proposals Apply has read but not yet planned are in flight when the store dies,
# by construction: the restart waits for one (at most AIM_S). A restart that lost nothing must refuse none.
HELD_POSITION_READS = {"kind": "latency", "ms": 1500, "path": "/fapi/v2/positionRisk", "method": "GET", "count": 6}
# The plain run's store fsyncs every write (appendfsync always): its restart loses nothing, so it may refuse
# nothing. The --store-loss run keeps the default (everysec): its losses are what a host crash under it loses.
LOSSLESS_APPENDFSYNC = "always"
LOSS_CONSUMPTION_S = 20.0  # a store loss waits at most this long for a consumption after its snapshot
IN_ORDER_PATH_S = 10.0  # an intent recorded this recently is a plan inside the order path (older: stuck, not live)
# with --store-loss: when this share of the plans has been proposed (away from the store restart at half)
STORE_LOSSES = (0.2, 0.35, 0.8)
# with --failover (the store a primary, two replicas, three Sentinels: bus/embedded_ha.py): the faults, each when
# this share of the plans has been proposed. A killed primary is started again (it rejoins as a replica) once a
# replica was promoted; a paused one is resumed once a replica was promoted.
FAILOVER_FAULTS = ((0.15, "kill_primary"), (0.35, "pause_primary"), (0.6, "kill_primary"), (0.8, "restart_sentinel"))
# From a fault to the first decision on the new primary: the Sentinels' down-after (2 s) and election (about
# 1 s), the services' socket timeout when the primary hangs instead of closing (5 s), then the search for orders
# the old primary may have taken, which new proposals wait for: the failover fence (min-replicas-max-lag 5 s of
# bus/embedded_ha.py, plus 1 s), the permit window (1.2 s) and the late-execution horizon.
FAILOVER_LIMIT_S = round(2.0 + 1.5 + 5.0 + 6.0 + 1.2 + CHAOS_HORIZON_MS / 1000, 1)
SYMBOLS = {
    "BTCUSDT": ("100.000", "0.001"),
    "ETHUSDT": ("1000.000", "0.010"),
    "SOLUSDT": ("100000", "1"),
    "BNBUSDT": ("10000.00", "0.01"),
    "XRPUSDT": ("1000000.0", "1.0"),
}
# 1,000 plans at 20/s are 1,200 orders a minute, Binance's default ORDERS limit, and ~11 request weight each:
# the simulator states a (VIP-like) raised account limit in exchangeInfo and the services adopt it from there,
# so the run measures recovery from faults, not queueing behind the default limits.
CHAOS_SIM_ARGS = ["--weight-limit", "100000", "--orders-10s-limit", "5000", "--orders-1m-limit", "20000"]
CHAOS_ENV = {
    # closes come faster than the default cooldowns and rate limits allow: the point is volume under faults
    "QT_GOVERNOR__COOLDOWN_S": "0",
    "QT_GOVERNOR__MAX_PER_SYMBOL": "1000000",
    "QT_GOVERNOR__MAX_TOTAL": "1000000",
    "QT_BRAIN__COOLDOWN_S": "0",
    "QT_BRAIN__SNAPSHOT_INTERVAL_S": "1",
    "QT_CLAIM_IDLE_S": "5",
    "QT_EXCHANGE__LATE_EXECUTION_HORIZON_MS": str(CHAOS_HORIZON_MS),
}


@dataclass
class ChaosReport:
    plans: int = 0
    results: int = 0
    executions: int = 0
    orders: int = 0
    duplicate_orders: int = 0
    lost_plans: int = 0
    duplicate_results: int = 0
    results_disagreeing_with_exchange: int = 0
    executions_without_two_permits: int = 0
    service_kills: int = 0
    store_restarts: int = 0
    store_losses: int = 0
    adopted_from_exchange: int = 0  # results published from an order the store had forgotten
    # proposals answered store_changed: older than the store instance (in flight at a restart or loss, or sent
    # in a restarted store's first second), never executed for that reason (issue 20's goal: none)
    refused_after_store_change: int = 0
    # the plain run's store restart: proposals Apply had read but not planned when the store died (at least one,
    # by construction), and how many of those the restart refused (store_changed; a lossless restart: none)
    unplanned_at_restart: int = 0
    unplanned_at_restart_refused: int = 0
    lossless_restart: bool = False  # the restart lost nothing (appendfsync always): it may refuse nothing
    # --failover: the faults of the high-availability store, each failover's time from the fault to the first
    # answer to a proposal sent after it, and what a paused primary did with a write once resumed
    failover_run: bool = False
    failovers: int = 0
    failover_seconds: list[float] = field(default_factory=list)
    sentinel_restarts: int = 0
    writes_taken_by_a_resumed_primary: int = 0
    forgotten_proposals: int = 0  # proposals the store forgot before anything came of them: the client retries
    answered_then_forgotten: int = 0  # proposals the store forgot after their answer was seen: not sent again
    resent_after_a_fill: int = 0  # ... of which the first plan had in fact filled (its order must answer it)
    resent_closed_twice: int = 0  # ... of which the retry closed again (a second order for one proposal id)
    max_recovery_s: float = 0.0
    seconds: float = 0.0
    store_loss_run: bool = False  # --store-loss: store losses are required
    # where the faults landed: a kill (or the store restart) while a plan's permits were consumed and its result
    # not out; a loss that made the store forget a consumption the observer had seen
    kills_in_order_path: int = 0
    losses_in_order_path: int = 0
    forgotten_consumptions: int = 0
    forgeries_attempted: int = 0
    forgeries_rejected: int = 0  # forged permits Apply audited as rejected
    forgeries_executed: int = 0  # plans with a forged permit that have an order (must be 0)
    # the independent oracle (domain/oracle.py): its named counts, and how many orders it verified itself
    oracle: dict[str, int] = field(default_factory=lambda: dict.fromkeys(oracle.KINDS, 0))
    orders_verified: int = 0
    # --stream-faults: faults of the exchange's user-data stream armed during the run (by kind), and how long
    # P3.3's snapshot of a symbol disagreed with the exchange's position (sampled every SNAPSHOT_SAMPLE_S)
    stream_faults_run: bool = False
    stream_faults: dict[str, int] = field(default_factory=dict)
    snapshot_lag_max_s: float = 0.0
    snapshot_disagreements_at_end: int = 0
    # per fill: ms from the exchange's event to P3.3's snapshot first showing that position (or a later fill's);
    # read every FILL_SAMPLE_S, so each figure is up to that much late
    fills_timed: int = 0
    fill_shown_ms: dict[str, float | None] = field(default_factory=dict)  # p50, p99, max
    fills_never_shown: int = 0
    # why the plans that did not execute did not: "error: reason" -> count (permit timeouts during kills, ...)
    not_executed: dict[str, int] = field(default_factory=dict)
    # for each broken promise, up to ten of the plans that broke it (the logs tell their story)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def broken(self) -> dict[str, int]:
        """Every promise that was broken, with how often (empty when all were kept)."""
        counts = {
            "duplicate orders": self.duplicate_orders,
            "lost plans": self.lost_plans,
            "duplicate results": self.duplicate_results,
            "results that disagree with the exchange": self.results_disagreeing_with_exchange,
            "executions without two permits": self.executions_without_two_permits,
            "retried proposals that closed twice": self.resent_closed_twice,
            "forged permits that executed": self.forgeries_executed,
            "writes taken by a resumed old primary": self.writes_taken_by_a_resumed_primary,
            **{f"oracle: {kind}": n for kind, n in self.oracle.items()},
        }
        return {name: n for name, n in counts.items() if n}

    @property
    def ok(self) -> bool:
        return not verdict(self)


def _position_changes(event: dict[str, Any]) -> list[tuple[int, str, Decimal]]:
    """The positions an exchange event says changed: (event ms, symbol, position after), one-way mode."""
    if event.get("e") != "ACCOUNT_UPDATE":
        return []
    return [
        (int(event["E"]), str(row["s"]), Decimal(str(row["pa"])))
        for row in event.get("a", {}).get("P", [])
        if row.get("ps", "BOTH") == "BOTH"
    ]


def fill_shown_ms(
    fills: list[tuple[int, str, Decimal]],
    shown: dict[str, list[tuple[int, Decimal | None]]],
    outages: Sequence[tuple[int, int]] = (),
) -> tuple[list[int], int]:
    """For each fill (event ms, symbol, position after): how long P3.3 was up until its symbol's snapshot
    showed that position or a later fill's (0 when it already did as the fill happened; ``outages``, P3.3's
    downtimes, do not count: nothing writes snapshots then); and how many never did. ``shown[symbol]`` is the
    snapshot's position as read, oldest first, kept only when it changed."""
    lags: list[int] = []
    unshown = 0
    by_symbol: dict[str, list[tuple[int, Decimal]]] = defaultdict(list)
    for at_ms, symbol, amount in sorted(fills, key=lambda fill: fill[0]):  # stable: a millisecond's in event order
        by_symbol[symbol].append((at_ms, amount))
    for symbol, changes in by_symbol.items():
        reads = shown.get(symbol, [])
        for i, (at_ms, _) in enumerate(changes):
            this_or_later = {amount for _, amount in changes[i:]}
            # the read current when the fill happened, then every read after it
            current = max((k for k, (read_ms, _) in enumerate(reads) if read_ms <= at_ms), default=0)
            found = next((read_ms for read_ms, amount in reads[current:] if amount in this_or_later), None)
            if found is None:
                unshown += 1
            else:
                down = sum(max(0, min(end, found) - max(start, at_ms)) for start, end in outages)
                lags.append(max(0, found - at_ms - down))
    return lags, unshown


def verdict(report: ChaosReport) -> list[str]:
    """Why the run failed (empty: it passed). A run fails when a promise was broken, recovery was too slow, or
    it proved nothing: nothing executed, nothing killed, no fault inside the order path, no forgery rejected."""
    failures = [f"{name}: {n}" for name, n in report.broken.items()]
    if report.max_recovery_s > RECOVERY_LIMIT_S:
        failures.append(f"recovery after the store restart took {report.max_recovery_s} s > {RECOVERY_LIMIT_S} s")
    if report.executions == 0:
        failures.append("nothing executed")
    if report.failover_run:
        expected = sum(1 for _, fault in FAILOVER_FAULTS if fault != "restart_sentinel")
        if report.failovers < expected:
            failures.append(f"{report.failovers} failovers of the {expected} faults of the primary")
        slow = [t for t in report.failover_seconds if t > FAILOVER_LIMIT_S]
        if slow or len(report.failover_seconds) < report.failovers:
            failures.append(f"failovers over {FAILOVER_LIMIT_S} s (or never answered): {report.failover_seconds}")
        if report.sentinel_restarts == 0:
            failures.append("no Sentinel was restarted")
        if report.kills_in_order_path == 0:
            failures.append("no fault of the primary landed inside the order path")
    elif report.store_restarts == 0:
        failures.append("the store was never restarted")
    elif report.unplanned_at_restart == 0:
        failures.append("no proposal was in flight unplanned when the store restarted")
    if report.lossless_restart and report.refused_after_store_change:
        failures.append(
            f"a store restart that lost nothing refused {report.refused_after_store_change} proposals (store_changed)"
        )
    if report.failover_run:  # its faults are the store's
        pass
    elif report.store_loss_run:  # the losses take most of a short run: they are its faults, kills may not come
        if report.store_losses == 0:
            failures.append("the store never forgot anything")
        elif report.losses_in_order_path == 0:
            failures.append("no store loss forgot a consumption")
    elif report.service_kills == 0:
        failures.append("no service was killed")
    elif report.kills_in_order_path == 0:
        failures.append("no kill landed inside the order path")
    if report.stream_faults_run:
        if sum(report.stream_faults.values()) == 0:
            failures.append("no fault of the user-data stream was armed")
        if report.snapshot_disagreements_at_end:
            failures.append(f"{report.snapshot_disagreements_at_end} snapshots disagree with the exchange at the end")
        if report.snapshot_lag_max_s > SNAPSHOT_LAG_LIMIT_S:
            failures.append(
                f"a snapshot disagreed with the exchange for {report.snapshot_lag_max_s} s > {SNAPSHOT_LAG_LIMIT_S} s"
            )
        if report.fills_timed == 0:
            failures.append("no fill was timed into the snapshots")
        if report.fills_never_shown:
            failures.append(f"{report.fills_never_shown} fills never showed in the snapshots")
        slowest = report.fill_shown_ms.get("max")
        if slowest is not None and slowest > SNAPSHOT_LAG_LIMIT_S * 1000:
            failures.append(f"a fill showed in its snapshot after {slowest} ms > {SNAPSHOT_LAG_LIMIT_S * 1000:.0f} ms")
    if report.forgeries_attempted == 0:
        failures.append("no forgery was attempted")
    elif report.forgeries_rejected == 0:
        failures.append("no forgery was rejected")
    return failures


def _patient_client(url: str) -> aioredis.Redis:
    """The observer's own connection: it rides out the store restarts (retries for ~20 s) instead of failing.
    Through Sentinel, no retries below the caller's loops: redis-py's nest there, and a client waited 29 s for a
    failover that took 3."""
    if urlsplit(url).scheme in SENTINEL_SCHEMES:
        return make_client(url)
    return make_client(url, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=40))


@dataclass
class Observed:
    """What the observer saw appear, kept even when the store later forgets it."""

    audit: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))
    results: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))
    plans: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))
    consumed: list[tuple[str, str]] = field(default_factory=list)  # (audit entry id, plan id) of consumptions
    result_ids: list[tuple[str, str]] = field(default_factory=list)  # (plan id, stream id) of every result seen


class Chaos:
    def __init__(
        self,
        system: Any,
        plans: int,
        rate: float,
        seed: int,
        store_loss: bool = False,
        lossless: bool = False,
        failover: bool = False,
        stream_faults: bool = False,
    ) -> None:
        self.system = system
        self.plans = plans
        self.rate = rate
        self.store_loss = store_loss
        self.rng = random.Random(seed)
        self.submitted: list[ops.Submitted] = []
        self.symbol_of: dict[str, str] = {}
        self.resent: set[str] = set()  # client order ids of proposals sent again after the store forgot them
        self.report = ChaosReport(
            store_loss_run=store_loss, lossless_restart=lossless and not store_loss, failover_run=failover
        )
        self.failover = failover
        self.stream_faults = stream_faults
        self.report.stream_faults_run = stream_faults
        # each fault of the primary: when (wall clock, s), and how many proposals had been sent by then
        self.fault_at: list[tuple[float, int]] = []
        self.sent_order: dict[str, int] = {}  # plan id -> its place in the order proposals were first sent
        self.unplanned_at_restart: set[str] = set()  # plan ids
        self.forged: dict[str, str] = {}  # plan id -> the attack written into its Governor slot
        self.seen = Observed()
        self.finished = asyncio.Event()
        self.last_loss = 0.0
        # --stream-faults: the exchange's position changes (event ms, symbol, position after), and each
        # snapshot's position as read (read ms, position; kept when it changed)
        self.fills: list[tuple[int, str, Decimal]] = []
        self.shown: dict[str, list[tuple[int, Decimal | None]]] = defaultdict(list)
        # when P3.3 was down (killed, until started again), wall ms: nothing writes snapshots then, so a fill
        # made meanwhile is timed from P3.3's return
        self.brain_down: list[list[int | None]] = []
        self.events_after: int | None = None  # the exchange's last recorded event read (None: not read yet)

    async def run(self) -> ChaosReport:
        started = time.monotonic()
        rds = _patient_client(self.system.urls["operator"])
        observer = asyncio.create_task(self._observe())
        try:
            if self.stream_faults:
                await self._read_fills_once()  # where the run's fills begin
            chaos = asyncio.create_task(self._kill_things(rds))
            streams = [
                asyncio.create_task(self._stream_chaos()),
                asyncio.create_task(self._watch_snapshots()),
                asyncio.create_task(self._time_fills()),
            ]
            try:
                await self._drive(rds)
                self.finished.set()
                await chaos
            finally:
                await cancel_and_wait(streams[:1])  # no new stream fault; the watch goes on until settled
            await self._settle(rds)
            if self.stream_faults:
                await self._snapshots_agree_at_end(rds)
            await cancel_and_wait(streams[1:])
            await self._judge_fill_times(rds)
            await self._resend_forgotten(rds)
            try:
                await self._forge(rds)
                await self._settle(rds, timeout=60.0)
            finally:  # only now: back in auto mode the Governor would still grant a forged plan that is waiting
                await ops.set_governor_mode(rds, "auto", "chaos")
            await asyncio.sleep(1.0)  # the observer catches up with the last lines
            await self._judge(rds)
        finally:
            await cancel_and_wait([observer])  # its reads can lose a cancel (tasks.py): re-cancelled until it ends
            await rds.aclose()
        self.report.seconds = round(time.monotonic() - started, 1)
        return self.report

    async def _drive(self, rds: aioredis.Redis) -> None:
        """Propose at ``rate`` per second; a proposal the store did not take is retried (it was never sent)."""
        symbols = sorted(SYMBOLS)
        interval = 1 / self.rate
        for n in range(self.plans):
            await self._propose(rds, symbols[n % len(symbols)], "chaos")
            await asyncio.sleep(interval)

    async def _propose(self, rds: aioredis.Redis, symbol: str, source: str, proposal_id: str = "") -> ops.Submitted:
        deadline = time.monotonic() + PROPOSE_PATIENCE_S
        qty = Decimal(SYMBOLS[symbol][1])
        while True:
            try:
                sub = await ops.propose(rds, symbol, "PARTIAL_CLOSE", qty=qty, source=source, proposal_id=proposal_id)
                self.sent_order.setdefault(sub.plan_id, len(self.sent_order))
                self.submitted.append(sub)
                self.symbol_of[sub.plan_id] = symbol
                return sub
            except (RedisError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"the store took no proposal for {PROPOSE_PATIENCE_S:g} s: {exc}") from exc
                await asyncio.sleep(0.05)

    async def _observe(self) -> None:
        """Tail the audit and result streams into ``self.seen``. After a store loss new entries have ids past
        the old cursor (ids are times), so one cursor per stream sees everything that ever appears."""
        rds = _patient_client(self.system.urls["operator"])
        cursors = {keys.AUDIT_STREAM: "0-0", keys.RESULT_STREAM: "0-0", keys.PLAN_STREAM: "0-0"}
        into = {
            keys.AUDIT_STREAM: self.seen.audit,
            keys.RESULT_STREAM: self.seen.results,
            keys.PLAN_STREAM: self.seen.plans,
        }
        try:
            while True:
                try:
                    reply = await rds.xread(cursors, count=5000, block=200)
                except (RedisError, OSError):
                    await asyncio.sleep(0.1)
                    continue
                for stream, entries in reply or ():
                    for entry_id, fields in entries:
                        cursors[stream] = entry_id
                        into[stream][fields.get("plan_id", "")].append(dict(fields))
                        if stream == keys.RESULT_STREAM:
                            self.seen.result_ids.append((fields.get("plan_id", ""), entry_id))
                        if stream == keys.AUDIT_STREAM and fields.get("decision") == "consumed":
                            self.seen.consumed.append((entry_id, fields.get("plan_id", "")))
        finally:
            await rds.aclose()

    def _sim_admin(self) -> httpx.AsyncClient:
        """The simulator's admin API, for the loop's own async tasks (SimAdmin is the blocking one)."""
        token = self.system.sim_admin_token()
        return httpx.AsyncClient(base_url=self.system.sim_url, headers={"X-Sim-Admin-Token": token}, timeout=5.0)

    async def _stream_chaos(self) -> None:
        """With --stream-faults: a fault of the user-data stream every 1-3 s, each of STREAM_FAULTS once per round
        in a random order."""
        if not self.stream_faults:
            return
        admin = self._sim_admin()
        try:
            await asyncio.sleep(0.5)  # the first one early: a short run has one by construction
            faults: list[tuple[str, dict[str, int]]] = []
            while not self.finished.is_set():
                if not faults:  # every kind once per round, in a random order: a long run meets each of them
                    faults = self.rng.sample(STREAM_FAULTS, len(STREAM_FAULTS))
                kind, rule = faults.pop()
                with contextlib.suppress(httpx.HTTPError):
                    (await admin.post("/_sim/stream-faults", json={"kind": kind, **rule})).raise_for_status()
                    self.report.stream_faults[kind] = self.report.stream_faults.get(kind, 0) + 1
                await asyncio.sleep(self.rng.uniform(1.0, 3.0))
        finally:
            await admin.aclose()

    async def _positions_now(
        self, admin: httpx.AsyncClient, rds: aioredis.Redis
    ) -> dict[str, tuple[Decimal, Decimal | None]]:
        """Each symbol's position on the exchange and in P3.3's snapshot, read one right after the other."""
        reply = await admin.get("/_sim/state")
        reply.raise_for_status()
        exchange = {row["symbol"]: Decimal(str(row["positionAmt"])) for row in reply.json()["positions"]}
        names = sorted(SYMBOLS)
        snapshots = await asyncio.wait_for(
            asyncio.gather(*(rds.hget(keys.snapshot(symbol), "position_amt") for symbol in names)), 2.0
        )
        return {
            symbol: (exchange.get(symbol, Decimal(0)), Decimal(snap) if snap else None)
            for symbol, snap in zip(names, snapshots, strict=True)
        }

    async def _watch_snapshots(self) -> None:
        """With --stream-faults: how long each symbol's snapshot disagrees with the exchange (the longest), while
        P3.3 runs (a kill's downtime is the kill's, judged by the other verdicts)."""
        if not self.stream_faults:
            return
        admin = self._sim_admin()
        rds = _patient_client(self.system.urls["operator"])
        since: dict[str, float] = {}
        try:
            while True:
                await asyncio.sleep(SNAPSHOT_SAMPLE_S)
                try:
                    now, pairs = time.monotonic(), await self._positions_now(admin, rds)
                except (httpx.HTTPError, RedisError, OSError, TimeoutError, KeyError, ArithmeticError):
                    continue  # a store restart or loss: its own checks cover it
                if any(end is None for _, end in self.brain_down):
                    since.clear()  # nothing writes snapshots while P3.3 is down: timed from its return
                    continue
                for symbol, (on_exchange, in_snapshot) in pairs.items():
                    if on_exchange == in_snapshot:
                        since.pop(symbol, None)
                        continue
                    started = since.setdefault(symbol, now)
                    lag = round(now - started, 2)
                    self.report.snapshot_lag_max_s = max(self.report.snapshot_lag_max_s, lag)
        finally:
            await admin.aclose()
            await rds.aclose()

    async def _time_fills(self) -> None:
        """With --stream-faults: each snapshot's position read every FILL_SAMPLE_S (kept when it changes), and
        the exchange's recorded position changes (ACCOUNT_UPDATE), for ``_judge_fill_times``."""
        if not self.stream_faults:
            return
        admin = self._sim_admin()
        rds = _patient_client(self.system.urls["operator"])
        next_read = 0.0
        try:
            while True:
                await asyncio.sleep(FILL_SAMPLE_S)
                await self._sample_snapshots(rds)
                if time.monotonic() >= next_read:
                    next_read = time.monotonic() + EVENTS_READ_S
                    await self._read_fills(admin)
        finally:
            await admin.aclose()
            await rds.aclose()

    async def _sample_snapshots(self, rds: aioredis.Redis) -> None:
        """Each snapshot's position now, kept where it changed (a store that is down: no sample)."""
        names = sorted(SYMBOLS)
        with contextlib.suppress(RedisError, OSError, TimeoutError, ArithmeticError):
            pipe = rds.pipeline(transaction=False)
            for symbol in names:
                pipe.hget(keys.snapshot(symbol), "position_amt")
            values = await asyncio.wait_for(pipe.execute(), 2.0)
            now_ms = int(time.time() * 1000)  # after the reply: a figure is up to a read's time late as well
            for symbol, value in zip(names, values, strict=True):
                amount = Decimal(value) if value else None
                seen = self.shown[symbol]
                if not seen or seen[-1][1] != amount:
                    seen.append((now_ms, amount))

    async def _read_fills(self, admin: httpx.AsyncClient) -> None:
        """The exchange's position changes recorded since the last read (the first read only marks where the
        run's begin: the positions opened before it are not its fills)."""
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError, ArithmeticError):
            reply = await admin.get("/_sim/user-events", params={"after": self.events_after or 0})
            reply.raise_for_status()
            body = reply.json()
            if self.events_after is not None:
                for row in body["events"]:
                    self.fills += _position_changes(row["event"])
            self.events_after = int(body["last"])

    async def _read_fills_once(self) -> None:
        admin = self._sim_admin()
        try:
            await self._read_fills(admin)
        finally:
            await admin.aclose()

    async def _judge_fill_times(self, rds: aioredis.Redis) -> None:
        if not self.stream_faults:
            return
        await self._read_fills_once()  # the last ones, made after the watcher's last read
        await self._sample_snapshots(rds)  # and the snapshots once more: the end agreement may be ms old
        lags, unshown = fill_shown_ms(self.fills, self.shown, self._brain_outages())
        self.report.fills_timed = len(lags) + unshown
        self.report.fills_never_shown = unshown
        self.report.fill_shown_ms = {
            "p50": percentile(lags, 50),
            "p99": percentile(lags, 99),
            "max": max(lags) if lags else None,
        }

    async def _snapshots_agree_at_end(self, rds: aioredis.Redis) -> None:
        """Once the flow has settled, every snapshot shows the exchange's position within the lag bound."""
        admin = self._sim_admin()
        try:
            deadline = time.monotonic() + SNAPSHOT_LAG_LIMIT_S
            while True:
                pairs = await self._positions_now(admin, rds)
                wrong = [symbol for symbol, (a, b) in pairs.items() if a != b]
                if not wrong or time.monotonic() > deadline:
                    self.report.snapshot_disagreements_at_end = len(wrong)
                    return
                await asyncio.sleep(SNAPSHOT_SAMPLE_S)
        finally:
            await admin.aclose()

    async def _in_order_path(self, rds: aioredis.Redis) -> int:
        """How many plans are inside the order path now: permits consumed (intent recorded), no result yet."""
        try:
            return int(
                await asyncio.wait_for(rds.zcount(keys.APPLY_INTENTS, time.time() - IN_ORDER_PATH_S, "+inf"), 1.0)
            )
        except (RedisError, OSError, TimeoutError):
            return 0

    def _hold_next_order(self) -> None:
        self._add_fault(HELD_ORDER)

    def _clear_faults(self) -> None:
        admin = self.system.admin()
        try:
            admin.clear_faults()
        finally:
            admin.close()

    def _add_fault(self, fault: dict[str, Any]) -> None:
        admin = self.system.admin()
        try:
            admin.add_fault(fault)
        finally:
            admin.close()

    async def _unplanned(self, rds: aioredis.Redis) -> set[str]:
        """The plans of proposals Apply has read (pending in its group) and not planned yet (no plan record)."""
        try:
            pending = await asyncio.wait_for(
                rds.xpending_range(keys.PROPOSAL_STREAM, keys.APPLY_GROUP, "-", "+", 10_000), 1.0
            )
            read = {row["message_id"] for row in pending}
            subs = [sub for sub in self.submitted if sub.entry_id in read]
            if not subs:
                return set()
            planned = await asyncio.wait_for(
                asyncio.gather(*(rds.exists(keys.plan_record(sub.plan_id)) for sub in subs)), 1.0
            )
        except (RedisError, OSError, TimeoutError):
            return set()
        return {sub.plan_id for sub, has_plan in zip(subs, planned, strict=True) if not has_plan}

    async def _stop_service(self, service: str) -> None:
        """SIGKILL ``service``; P3.3's downtime is kept (``brain_down``)."""
        if service == "brain":
            self.brain_down.append([int(time.time() * 1000), None])
        await asyncio.to_thread(self.system.stop_service, service, kill=True)

    async def _start_service(self, service: str) -> None:
        await asyncio.to_thread(self.system.start_service, service)
        if service == "brain":
            self._brain_back()

    def _brain_back(self) -> None:
        for outage in self.brain_down:
            if outage[1] is None:
                outage[1] = int(time.time() * 1000)

    def _brain_outages(self) -> list[tuple[int, int]]:
        """P3.3's downtimes (wall ms), the one going on ending now."""
        now = int(time.time() * 1000)
        return [(start or 0, end if end is not None else now) for start, end in self.brain_down]

    async def _wait_unplanned(self, rds: aioredis.Redis) -> set[str]:
        """Slow the next position reads, propose a few closes (the flow may be over by now: a kill was being
        aimed), and wait (at most ``AIM_S``) until Apply has read a proposal it has not planned yet: those
        proposals' plan ids (empty if it never had one). Apply plans from P3.3's snapshot when it is fresh
        (services/apply/position_reads.py): P3.3 is killed (SIGKILL) and the snapshots of those symbols
        removed first, so that nothing writes them again and their plans read the exchange, as when P3.3 is
        down, and wait on the slowed read. P3.3 starts again with the store (``_restart_store``)."""
        if "brain" in self.system.processes:
            await self._stop_service("brain")
            self.report.service_kills += 1
        await asyncio.to_thread(self._add_fault, HELD_POSITION_READS)
        aimed = sorted(SYMBOLS)[:3]
        with contextlib.suppress(RedisError, OSError):
            await rds.delete(*(keys.snapshot(symbol) for symbol in aimed))
        for symbol in aimed:
            await self._propose(rds, symbol, "chaos-restart")
        deadline = time.monotonic() + AIM_S
        while time.monotonic() < deadline:
            unplanned = await self._unplanned(rds)
            if unplanned:
                return unplanned
            await asyncio.sleep(0.005)
        return set()

    async def _aim(self, rds: aioredis.Redis) -> bool:
        """Hold the next order at the exchange, and wait (at most ``AIM_S``) until a plan is inside the order
        path; whether one is (the run fails if none ever is: a run that aimed at nothing proved nothing)."""
        await asyncio.to_thread(self._hold_next_order)
        deadline = time.monotonic() + AIM_S
        while time.monotonic() < deadline:
            if await self._in_order_path(rds):
                return True
            await asyncio.sleep(0.002)
        return False

    async def _kill_things(self, rds: aioredis.Redis) -> None:
        """A random service every 1-3 s (every other one aimed at the order path); the store once, when half of
        the plans have been proposed; with --store-loss, the store forgetting three times (``STORE_LOSSES``);
        with --failover, the faults of the high-availability store instead (``FAILOVER_FAULTS``)."""
        if self.failover:
            await self._fail_over(rds)
            return
        restarted_store = False
        losses = [int(self.plans * share) for share in STORE_LOSSES] if self.store_loss else []
        next_kill = time.monotonic() + self.rng.uniform(1.0, 3.0)
        while not (self.finished.is_set() and restarted_store and not losses):
            await asyncio.sleep(0.05)
            if losses and len(self.submitted) >= losses[0]:
                losses.pop(0)
                await self._lose_store(host_crash=self.report.store_losses % 2 == 1)
            elif not restarted_store and len(self.submitted) >= self.plans // 2:
                await self._restart_store(rds)
                restarted_store = True
            elif not self.finished.is_set() and time.monotonic() >= next_kill:
                service = self.rng.choice(("apply", "governor", "brain"))
                landed = (
                    await self._aim(rds) if self.report.service_kills % 2 == 0 else bool(await self._in_order_path(rds))
                )
                await self._stop_service(service)
                self.report.kills_in_order_path += landed
                await asyncio.sleep(self.rng.uniform(0.1, 1.0))
                await self._start_service(service)
                self.report.service_kills += 1
                next_kill = time.monotonic() + self.rng.uniform(1.0, 3.0)

    async def _fail_over(self, rds: aioredis.Redis) -> None:
        """Each fault of ``FAILOVER_FAULTS`` when its share of the plans has been proposed."""
        ha = self.system.ha_set
        for share, fault in FAILOVER_FAULTS:
            deadline = time.monotonic() + PROPOSE_PATIENCE_S
            while time.monotonic() < deadline:
                if len(self.submitted) >= int(self.plans * share):
                    break
                await asyncio.sleep(0.05)
            if fault == "restart_sentinel":
                await asyncio.to_thread(ha.restart_sentinel, self.rng.randrange(ha.sentinels))
                self.report.sentinel_restarts += 1
                continue
            primary = await asyncio.to_thread(ha.primary_port)
            if primary is None:
                continue
            landed = await self._aim(rds)
            if fault == "kill_primary":
                await asyncio.to_thread(ha.kill_node, primary)
            else:
                await asyncio.to_thread(ha.pause_node, primary)
            self.fault_at.append((time.time(), len(self.sent_order)))
            self.report.kills_in_order_path += landed
            if await self._promoted(primary):
                self.report.failovers += 1
            # a proposal sent after the fault whatever the flow does (it may be over): its answer times the failover
            await self._propose(rds, sorted(SYMBOLS)[len(self.fault_at) % len(SYMBOLS)], "chaos-failover")
            if fault == "kill_primary":
                await asyncio.to_thread(ha.restart_node, primary)  # it rejoins as a replica
            else:
                await asyncio.to_thread(ha.resume_node, primary)
                if await asyncio.to_thread(_takes_a_write, primary, self.system.urls["admin"]):
                    self.report.writes_taken_by_a_resumed_primary += 1
            self.last_loss = time.monotonic()  # a failover may lose what the replicas had not received

    async def _promoted(self, old: int, timeout_s: float = 30.0) -> bool:
        """Whether the Sentinels named another primary than ``old`` within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self.system.ha_set.primary_port) not in (None, old):
                return True
            await asyncio.sleep(0.2)
        return False

    def _failover_times(self) -> list[float]:
        """For each fault of the primary: seconds from it to the first result of a proposal sent after it, when
        that result was written (its stream id is the time its primary wrote it). Such a proposal is newer than
        the new primary's epoch or waits for it, so the search for orders the old primary may have taken (the
        failover fence included) is part of this time."""
        times = []
        for at, sent_before in self.fault_at:
            after = {plan for plan, n in self.sent_order.items() if n >= sent_before}
            written = [int(entry.partition("-")[0]) / 1000 for plan, entry in self.seen.result_ids if plan in after]
            if written:
                times.append(round(min(written) - at, 2))
        return times

    async def _restart_store(self, rds: aioredis.Redis) -> None:
        port = int(self.system.redis_url.rsplit(":", 1)[1])
        await self._wait_unplanned(rds)
        landed = await self._aim(rds)
        unplanned = await self._unplanned(rds)
        if not unplanned:  # planned while the kill was aimed at the order path: slow the reads again
            unplanned = await self._wait_unplanned(rds)
            landed = bool(await self._in_order_path(rds))
        self.system.store.kill()  # SIGKILL: no shutdown save, only what the append-only file holds
        self.unplanned_at_restart = unplanned
        self.report.unplanned_at_restart = len(self.unplanned_at_restart)
        self.report.kills_in_order_path += landed
        await asyncio.sleep(self.rng.uniform(0.3, 1.0))
        await asyncio.to_thread(self.system.start_store, port)  # same data, same port, same users
        await asyncio.to_thread(self._clear_faults)  # the slowed reads left over
        await self._start_service("brain")  # killed by _wait_unplanned
        back = time.monotonic()
        self.report.store_restarts += 1
        # recovery: from the store's return until a brand-new proposal gets its result
        rds = _patient_client(self.system.urls["operator"])
        try:
            probe = await self._propose(rds, "XRPUSDT", "chaos-probe")
            await ops.wait_result(rds, probe.plan_id, 60, probe.result_cursor)
        finally:
            await rds.aclose()
        self.report.max_recovery_s = max(self.report.max_recovery_s, round(time.monotonic() - back, 3))

    async def _lose_store(self, *, host_crash: bool) -> None:
        """Snapshot now, let the flow go on, then the store comes back with the snapshot only."""
        store, admin = self.system.store, self.system.urls["admin"]
        snapshot = Path(tempfile.mkdtemp(prefix="qt-chaos-snap-")) / "dump.rdb"
        seen_before = len(self.seen.consumed)  # consumptions the observer saw after this may be forgotten
        await asyncio.to_thread(store.snapshot, admin, snapshot)
        # the flow goes on until a consumption came after the snapshot (its order held at the exchange, so the
        # loss lands inside the order path by construction), then a second or so more
        await asyncio.to_thread(self._hold_next_order)
        deadline = time.monotonic() + LOSS_CONSUMPTION_S
        while time.monotonic() < deadline:
            if len(self.seen.consumed) > seen_before:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.rng.uniform(0.3, 1.0))
        # what the store is about to forget happened: pause its writes and let the observer read everything
        await asyncio.to_thread(_pause_writes, admin)
        await asyncio.sleep(OBSERVER_CATCH_UP_S)
        store.kill()
        if host_crash:
            for service in ("apply", "governor", "brain"):
                await self._stop_service(service)
        await asyncio.sleep(self.rng.uniform(0.2, 0.6))
        await asyncio.to_thread(store.start_from, snapshot, admin)
        # which consumptions the store came back without (read at once: nothing has consumed them again yet)
        candidates = {plan_id for _, plan_id in self.seen.consumed[seen_before:]}
        forgot = await self._forgotten_consumptions(candidates)
        self.report.forgotten_consumptions += forgot
        self.report.losses_in_order_path += forgot > 0
        if host_crash:
            await asyncio.to_thread(self.system.start_services)
            self._brain_back()
        self.report.store_losses += 1
        self.last_loss = time.monotonic()

    async def _forgotten_consumptions(self, plan_ids: set[str]) -> int:
        """How many of these consumed plans the store no longer has an executed marker for."""
        rds = _patient_client(self.system.urls["admin"])
        try:
            names = sorted(plan_ids)
            present = await rds.exists(*[keys.executed_marker(p) for p in names]) if names else 0
            return len(names) - int(present)
        except (RedisError, OSError):
            return 0
        finally:
            await rds.aclose()

    async def _forge(self, rds: aioredis.Redis) -> None:
        """With the Governor in manual mode (no real permit comes), write one forged Governor permit per attack
        into a fresh plan's slot, as an attacker with write access to the permit keys would. Apply reads the
        slot at the latest when the window ends: every forgery must be rejected, the plan must time out."""
        governor_key, p33_key = permit_key(self.system.settings, "governor"), permit_key(self.system.settings, "p33")

        def forged(plan: Plan, attack: str) -> bytes:
            permit = GovernorPermit(
                granted=attack != "tampered_deny_to_grant",
                plan_id=plan.plan_id,
                plan_hash="0" * 64 if attack == "plan_hash_mismatch" else plan.plan_hash,
                issuer="p33" if attack == "wrong_issuer" else "governor",
                reason="policy_passed",
                created_at=time.time(),
            )
            signed = sign(permit, p33_key if attack == "signed_with_p33_key" else governor_key)
            if attack == "tampered_deny_to_grant":  # genuinely signed as a deny, then flipped
                signed = msgspec.structs.replace(signed, granted=True)
            return encode_permit(signed)

        attacks = ("tampered_deny_to_grant", "signed_with_p33_key", "plan_hash_mismatch", "wrong_issuer")
        await ops.set_governor_mode(rds, "manual", "chaos")  # the caller sets it back once the plans are done
        for attack, symbol in zip(attacks, sorted(SYMBOLS), strict=False):
            sub = await self._propose(rds, symbol, "chaos-forgery")
            plan = await self._published(rds, sub.plan_id)
            if plan is None or plan.decision != "EXECUTE":
                continue  # the symbol was busy (a SKIP plan): no permit is waited for, nothing to forge
            await rds.set(keys.governor_permit(plan.plan_id), forged(plan, attack), ex=60)
            self.forged[plan.plan_id] = attack
            self.report.forgeries_attempted += 1

    async def _published(self, rds: aioredis.Redis, plan_id: str, timeout: float = 10.0) -> Plan | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = await rds.hgetall(keys.plan_record(plan_id))
            if fields:
                return from_fields(Plan, fields)
            await asyncio.sleep(0.005)
        return None

    async def _settle(self, rds: aioredis.Redis, timeout: float = 120.0) -> None:
        """Wait (bounded) until every submitted plan has its result, or its proposal is gone from the store (it
        forgot it) and the search for forgotten orders has had its time since the last loss."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = await self._with_results(rds)
            waiting = [sub for sub in self.submitted if sub.plan_id not in done]
            if not waiting:
                return
            if time.monotonic() > self.last_loss + FORGOTTEN_AFTER_S and not [
                sub for sub in waiting if await rds.xrange(keys.PROPOSAL_STREAM, sub.entry_id, sub.entry_id)
            ]:
                return
            await asyncio.sleep(0.5)

    async def _with_results(self, rds: aioredis.Redis) -> set[str]:
        return {f.get("plan_id", "") for _, f in await rds.xrange(keys.RESULT_STREAM)}

    async def _resend_forgotten(self, rds: aioredis.Redis) -> None:
        """What a client does when the store forgot its proposal before it saw any answer: no result, and the
        proposal is no longer in the stream. It sends the same proposal again (its retry: the same proposal id).
        A client that did see an answer (the observer read a result of the plan) has its answer and does not
        send again, even if the store forgot that answer since. Counted, and checked against the exchange: had
        the first plan filled, its order is the retry's answer and no second order may follow."""
        done = await self._with_results(rds) | {p for p, seen in self.seen.results.items() if seen}
        forgotten = []
        for sub in list(self.submitted):
            if sub.plan_id in done:
                continue
            if not await rds.xrange(keys.PROPOSAL_STREAM, sub.entry_id, sub.entry_id):
                forgotten.append(sub)
        if not forgotten:
            return
        filled = self._filled_orders()
        for sub in forgotten:
            self.submitted.remove(sub)
            self.report.forgotten_proposals += 1
            if sub.client_order_id in filled:
                self.report.resent_after_a_fill += 1
            self.resent.add(sub.client_order_id)
            await self._propose(rds, self.symbol_of[sub.plan_id], "chaos-resent", proposal_id=sub.proposal_id)
        await self._settle(rds, timeout=60.0)

    def _orders(self) -> list[dict[str, Any]]:
        admin = self.system.admin()
        try:
            return list(admin.orders())
        finally:
            admin.close()

    def _filled_orders(self) -> dict[str, Decimal]:
        return {
            o["clientOrderId"]: Decimal(str(o.get("executedQty") or 0))
            for o in self._orders()
            if Decimal(str(o.get("executedQty") or 0)) > 0
        }

    async def _judge(self, rds: aioredis.Redis) -> None:
        r = self.report
        final = [f for _, f in await rds.xrange(keys.RESULT_STREAM)]
        per_plan = Counter(f["plan_id"] for f in final)
        # A proposal whose answer the client saw and which the store then forgot entirely (proposal and result)
        # is answered: the client has its answer and sends nothing again (_resend_forgotten). Its answer is the
        # one seen, checked against the exchange with every result seen; the store owes it nothing more.
        answered_then_forgotten = {
            sub.plan_id
            for sub in self.submitted
            if per_plan[sub.plan_id] == 0
            and self.seen.results.get(sub.plan_id)
            and not await rds.xrange(keys.PROPOSAL_STREAM, sub.entry_id, sub.entry_id)
        }
        r.answered_then_forgotten = len(answered_then_forgotten)
        plan_ids = [sub.plan_id for sub in self.submitted if sub.plan_id not in answered_then_forgotten]
        r.plans = len(plan_ids) + len(answered_then_forgotten)
        r.results = sum(1 for p in plan_ids if per_plan[p] >= 1) + len(answered_then_forgotten)
        r.lost_plans = sum(1 for p in plan_ids if per_plan[p] == 0)
        r.examples["lost plans"] = [p for p in plan_ids if per_plan[p] == 0][:10]
        r.duplicate_results = sum(1 for p in plan_ids if per_plan[p] > 1)
        executed = {f["plan_id"] for f in final if f.get("executed") == "true"}
        why = Counter(
            f"{f.get('error')}: {f.get('reason') or 'missing ' + f.get('missing', '?')}"
            for f in final
            if f.get("executed") != "true"
        )
        r.not_executed = dict(why.most_common())
        r.executions = len(executed)
        r.adopted_from_exchange = sum(1 for f in final if f.get("adopted") == "true")
        r.refused_after_store_change = sum(1 for f in final if f.get("error") == "store_changed")
        r.failover_seconds = self._failover_times()
        r.unplanned_at_restart_refused = sum(
            1 for f in final if f.get("error") == "store_changed" and f.get("plan_id") in self.unplanned_at_restart
        )
        placed = self._orders()
        r.orders = len(placed)
        orders = Counter(o["clientOrderId"] for o in placed)
        r.duplicate_orders = sum(1 for n in orders.values() if n > 1)
        r.examples["duplicate orders"] = [coid for coid, n in orders.items() if n > 1][:10]
        r.resent_closed_twice = sum(1 for coid in self.resent if orders[coid] > 1)
        filled: dict[str, Decimal] = defaultdict(Decimal)  # by plan id
        for o in placed:
            filled[oracle.plan_of_order(o["clientOrderId"]) or ""] += Decimal(str(o.get("executedQty") or 0))
        # every result ever seen, and every final one, must say what the exchange says about its plan's order
        seen_results = [f for results in self.seen.results.values() for f in results] + final
        disagreeing = [f for f in seen_results if not _agrees(f, filled.get(f.get("plan_id", ""), Decimal(0)))]
        r.results_disagreeing_with_exchange = len(disagreeing)
        r.examples["results that disagree with the exchange"] = [
            f"{f.get('plan_id')} executed={f.get('executed')} error={f.get('error')} filled={f.get('filled_qty')}"
            f" exchange={filled.get(f.get('plan_id', ''), 0)}"
            for f in disagreeing[:10]
        ]
        # no order without two permits, judged from the observer's own copy of the audit trail
        allowed: dict[str, set[str]] = defaultdict(set)
        consumed: Counter[str] = Counter()
        for plan_id, lines in self.seen.audit.items():
            for f in lines:
                if f.get("decision") == "allow":
                    allowed[plan_id].add("governor" if f.get("issuer") == "operator" else f.get("issuer", ""))
                elif f.get("decision") == "consumed":
                    consumed[plan_id] += 1
        r.executions_without_two_permits = sum(
            1
            for plan_id, qty in filled.items()
            if qty > 0 and (allowed[plan_id] != {"governor", "p33"} or consumed[plan_id] < 2)
        )
        # the forgeries: each audited as rejected (from the observer's copy), none with an order
        r.forgeries_rejected = sum(
            1
            for plan_id in self.forged
            if any(f.get("decision") == "rejected" and f.get("subject") == "governor" for f in self.seen.audit[plan_id])
        )
        ordered = {oracle.plan_of_order(coid) for coid in orders}
        r.forgeries_executed = sum(1 for plan_id in self.forged if plan_id in ordered)
        r.examples["forged permits that executed"] = [f"{p} ({a})" for p, a in self.forged.items() if p in ordered]
        # the independent oracle, from what was observed (the store may have forgotten some of it)
        settings = self.system.settings
        found = oracle.check(
            placed,
            (f for lines in self.seen.audit.values() for f in lines),
            (f for entries in self.seen.plans.values() for f in entries),
            final,
            oracle.IssuerKeys(permit_key(settings, "governor"), permit_key(settings, "p33")),
            expected=plan_ids,
            ttl_s=settings.permit_ttl_s,
        )
        r.oracle = dict(found.counts)
        r.orders_verified = found.orders_verified
        for kind, shown in found.examples.items():
            r.examples[f"oracle: {kind}"] = shown


def _takes_a_write(port: int, admin_url: str) -> bool:
    """Whether the node on ``port`` may take a write right now: only the refusals that mean "not as a primary"
    (NOREPLICAS while it is cut off from its replicas, READONLY once the Sentinels demoted it) say no; an
    accepted write, or any other answer (an auth failure, a timeout: nothing was proven), counts as yes."""
    import redis

    user, password, _ = split_netloc(urlsplit(admin_url).netloc)
    client = redis.Redis(port=port, username=user, password=password, socket_timeout=2.0)
    try:
        client.set("quantum:chaos:write-after-resume", "1")
    except redis.RedisError as exc:
        return not str(exc).startswith(("NOREPLICAS", "READONLY", "You can't write against a read only"))
    finally:
        client.close()
    return True


def _pause_writes(admin_url: str) -> None:

    client = sync_client(admin_url)
    try:
        client.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
    finally:
        client.close()


def _agrees(result: dict[str, str], filled: Decimal) -> bool:
    """A result agrees with the exchange: executed with the order's fill, or not executed and nothing filled."""
    if result.get("executed") == "true":
        try:
            return filled > 0 and Decimal(result.get("filled_qty", "")) == filled
        except ArithmeticError:
            return False
    return filled == 0


def run_chaos(
    settings: Settings,
    plans: int,
    rate: float,
    seed: int,
    store_loss: bool = False,
    failover: bool = False,
    stream_faults: bool = False,
) -> tuple[ChaosReport, Path]:
    from quantum_trader.system import LocalSystem

    system = LocalSystem.private(
        "qt-chaos-",
        env=CHAOS_ENV,
        persist_store=True,
        sim_args=CHAOS_SIM_ARGS,
        appendfsync=APPENDFSYNC if store_loss or failover else LOSSLESS_APPENDFSYNC,
        ha=failover,
    )
    with system:
        system.start_infra()
        system.open_positions({symbol: amount for symbol, (amount, _) in SYMBOLS.items()})
        system.start_services()
        chaos = Chaos(
            system,
            plans,
            rate,
            seed,
            store_loss,
            lossless=not (store_loss or failover),
            failover=failover,
            stream_faults=stream_faults,
        )
        report = asyncio.run(chaos.run())
    return report, system.settings.state_dir


def print_report(report: ChaosReport, state_dir: Path, as_json: bool) -> None:
    import json

    if as_json:
        failures = verdict(report)
        doc = {**asdict(report), "ok": not failures, "failures": failures, "logs": str(state_dir / "logs")}
        print(json.dumps(doc, indent=2))
        return
    from rich.table import Table

    from quantum_trader.cli.render import console

    table = Table(title="qt chaos", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("must be", justify="right")
    kills_bound = "" if report.store_loss_run else "> 0"
    rows = [
        ("plans", report.plans, ""),
        ("results", report.results, "= plans"),
        ("executions", report.executions, ""),
        ("orders on the exchange", report.orders, ""),
        ("duplicate orders", report.duplicate_orders, "0"),
        ("lost plans", report.lost_plans, "0"),
        ("duplicate results", report.duplicate_results, "0"),
        ("results that disagree with the exchange", report.results_disagreeing_with_exchange, "0"),
        ("executions without two permits", report.executions_without_two_permits, "0"),
        ("orders whose permits the oracle verified", report.orders_verified, "= orders"),
        *((f"oracle: {kind.replace('_', ' ')}", n, "0") for kind, n in report.oracle.items()),
        (
            "service kills (SIGKILL)",
            report.service_kills,
            "" if report.store_loss_run or report.failover_run else "> 0",
        ),
        ("store restarts", report.store_restarts, "" if report.failover_run else "> 0"),
        ("  kills inside the order path (consumed, no result)", report.kills_in_order_path, kills_bound),
        *(
            (
                ("failovers (a replica promoted after a fault of the primary)", report.failovers, "3"),
                (
                    "  seconds from each fault to the first answer to a proposal sent after it",
                    ", ".join(f"{t:g}" for t in report.failover_seconds),
                    f"<= {FAILOVER_LIMIT_S}",
                ),
                ("  writes taken by a resumed old primary", report.writes_taken_by_a_resumed_primary, "0"),
                ("  Sentinel restarts", report.sentinel_restarts, "> 0"),
            )
            if report.failover_run
            else ()
        ),
        ("store losses (back from a snapshot)", report.store_losses, "> 0" if report.store_loss_run else ""),
        ("  losses that forgot a consumption", report.losses_in_order_path, "> 0" if report.store_loss_run else ""),
        ("  consumptions the store forgot", report.forgotten_consumptions, ""),
        ("forged permits written", report.forgeries_attempted, "> 0"),
        ("  rejected by Apply", report.forgeries_rejected, "> 0"),
        ("  executed", report.forgeries_executed, "0"),
        ("results adopted from the exchange", report.adopted_from_exchange, ""),
        (
            "proposals refused after a store change (store_changed)",
            report.refused_after_store_change,
            "0" if report.lossless_restart else "",
        ),
        (
            "read but not planned when the store restarted",
            report.unplanned_at_restart,
            "" if report.failover_run else "> 0",
        ),
        ("  of which refused (store_changed)", report.unplanned_at_restart_refused, ""),
        ("proposals the store forgot after their answer was seen", report.answered_then_forgotten, ""),
        ("proposals the store forgot (sent again)", report.forgotten_proposals, ""),
        ("  of which the first plan had filled", report.resent_after_a_fill, ""),
        ("  of which the retry closed again", report.resent_closed_twice, "0"),
        *(
            (
                (
                    "user-data stream faults armed",
                    ", ".join(f"{k} {n}" for k, n in report.stream_faults.items()),
                    "> 0",
                ),
                (
                    "  longest a snapshot disagreed with the exchange (s)",
                    report.snapshot_lag_max_s,
                    f"<= {SNAPSHOT_LAG_LIMIT_S}",
                ),
                ("  snapshots disagreeing at the end", report.snapshot_disagreements_at_end, "0"),
                ("  fills timed into the snapshots", report.fills_timed, "> 0"),
                (
                    "  fill to snapshot p50 / p99 / max (ms)",
                    " / ".join(str(report.fill_shown_ms.get(q)) for q in ("p50", "p99", "max")),
                    f"max <= {SNAPSHOT_LAG_LIMIT_S * 1000:.0f}",
                ),
                ("  fills never shown", report.fills_never_shown, "0"),
            )
            if report.stream_faults_run
            else ()
        ),
        ("max recovery after store restart (s)", report.max_recovery_s, f"<= {RECOVERY_LIMIT_S}"),
        ("run time (s)", report.seconds, ""),
    ]
    rows += [(f"  not executed: {why}", n, "") for why, n in report.not_executed.items()]
    for name, value, bound in rows:
        table.add_row(name, str(value), bound)
    console.print(table)
    for name in report.broken:
        console.print(f"{name}: " + "; ".join(report.examples.get(name, [])))
    failures = verdict(report)
    for failure in failures:
        console.print(f"[red]{failure}[/red]")
    said = "[green]all promises kept[/green]" if not failures else "[red]FAILED[/red]"
    console.print(f"{said} (logs: {state_dir / 'logs'})")
