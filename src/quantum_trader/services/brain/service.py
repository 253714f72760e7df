"""The P3.3 service: reconcile first, then three loops (services/brain/__init__.py); and the plan decisions."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from quantum_trader.bus import keys
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.bus.permit_writes import p33_permit_write
from quantum_trader.bus.streams import ensure_topology
from quantum_trader.clock import SYSTEM_CLOCK, Clock
from quantum_trader.domain import reasons
from quantum_trader.domain.brain import BrainInputs, BrainPolicy, BrainVerdict, decide_in_order
from quantum_trader.domain.brain.snapshot_age import behind_ledger
from quantum_trader.domain.models import Plan
from quantum_trader.exchange import sim_url_for
from quantum_trader.exchange.base import Exchange, ExchangeError
from quantum_trader.exchange.binance import stream_base
from quantum_trader.exchange.userstream import ListenKeys, UserDataStream
from quantum_trader.secrets import permit_key
from quantum_trader.services.brain.follower import LedgerFollower
from quantum_trader.services.brain.inputs import InputsRead, read_inputs
from quantum_trader.services.brain.ledger import LedgerChange, ledger_audit_fields
from quantum_trader.services.brain.push import PushedPositions
from quantum_trader.services.brain.snapshots import SnapshotPoller
from quantum_trader.services.consumer import STORE_ERRORS, Backoff, Entries, consume_group
from quantum_trader.services.issuer import PermitIssuer
from quantum_trader.services.metrics import BrainMetrics, stream_metrics
from quantum_trader.settings import Settings
from quantum_trader.tasks import cancel_and_wait

RESULTS_CATCH_UP_S = 1.0  # how long a plan on a symbol marked for a finished plan waits for its result's record
RESULTS_POLL_S = 0.01  # how often it looks again meanwhile (another instance may be the one recording)
# Deny reasons that a result on its way to the ledger can explain (the exchange already shows the fill).
LEDGER_DISAGREES = frozenset({reasons.QTY_MISMATCH, reasons.SIDE_MISMATCH})

Decided = list[tuple[str, Plan]]  # (plan entry id, plan)


def policy_from(settings: Settings) -> BrainPolicy:
    b = settings.brain
    return BrainPolicy(
        managed=frozenset(settings.symbols),
        snapshot_max_age_s=b.snapshot_max_age_s,
        qty_tolerance_pct=b.qty_tolerance_pct,
        cooldown_s=b.cooldown_s,
    )


def _verdict_details(verdict: BrainVerdict) -> dict[str, str]:
    return {"safe_close_qty": str(verdict.safe_close_qty), "exchange_amt": str(verdict.exchange_position_amt)}


class BrainService(PermitIssuer):
    name = "p33"

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        exchange: Exchange,
        *,
        watch: StoreWatch | None = None,
        consumer: str = "",
        registry: CollectorRegistry | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(settings, redis, consumer=consumer, clock=clock)
        self.exchange = exchange
        self.metrics = BrainMetrics(registry or CollectorRegistry())
        self.policy = policy_from(settings)
        self.symbols = list(settings.symbols)
        self.ready = asyncio.Event()
        self._secret = permit_key(settings, "p33")
        self.snapshots = SnapshotPoller(settings, redis, exchange, self.metrics, self.log, clock, self._ledger_moved)
        self.follower = LedgerFollower(
            redis, self.metrics, self.log, clock, settings.audit_maxlen, self._ledger_moved, self.ask_refresh
        )
        for symbol in self.symbols:
            self.metrics.snapshot_age.labels(symbol).set_function(functools.partial(self.snapshot_age, symbol))
        self.pushed: PushedPositions | None = None
        self.stream = self._user_stream(exchange)
        stream_metrics(self.metrics.registry, "p33", lambda: self.stream.health if self.stream else None)
        if watch is not None:
            watch.subscribe(self._store_changed)  # last: a change already seen is delivered at once

    def _user_stream(self, exchange: Exchange) -> UserDataStream | None:
        """The user-data stream, unless push is off (``QT_STREAM__PUSH=false``: poll only) or the exchange has
        no listen key (a stand-in exchange in tests)."""
        settings = self.settings
        if not settings.stream.push or not isinstance(exchange, ListenKeys):
            return None
        owner = self.pushed = PushedPositions(
            self.snapshots,
            self.redis,
            self.metrics,
            self.log,
            self._clock,
            settings.audit_maxlen,
            self.journal.append,
            self.consumer,
        )
        base = stream_base(settings.exchange, sim_url_for(settings), settings.stream.url)
        stream = UserDataStream(exchange, base, owner, settings.stream, self.symbols)
        self.snapshots.stream_healthy = lambda: stream.health.healthy
        self.snapshots.stream_missed = stream.restart  # a fill the stream never showed: resync it
        self.snapshots.sequence = stream.sequence
        return stream

    async def run(self) -> None:
        self.log.info("P3.3 Position State Brain starting (event-driven mode)", consumer=self.consumer)
        await self.until_store(lambda: ensure_topology(self.redis))
        await self._reconcile_until_done()
        self.ready.set()
        self.metrics.ready.set(1)
        self.log.info(f"Consumer group: {keys.P33_GROUP} on {keys.PLAN_STREAM}")
        loops = [
            asyncio.create_task(self.snapshots.run(), name="p33-snapshots"),
            asyncio.create_task(
                self._consume(keys.RESULT_STREAM, keys.LEDGER_GROUP, keys.RESULT_DLQ), name="p33-ledger"
            ),
            asyncio.create_task(self._consume(keys.PLAN_STREAM, keys.P33_GROUP, keys.PLAN_DLQ), name="p33-plans"),
        ]
        if self.stream is not None:
            loops.append(asyncio.create_task(self.stream.run(), name="p33-user-stream"))
        try:
            await asyncio.gather(*loops)
        finally:
            await cancel_and_wait(loops)
            if self.pushed is not None:
                await self.pushed.close()
            await self.snapshots.close()

    async def _consume(self, stream: str, group: str, dlq: str) -> None:
        plans = stream == keys.PLAN_STREAM
        await consume_group(
            self.redis,
            stream=stream,
            group=group,
            consumer=self.consumer,
            handle=self.handle_plan if plans else self.follower.handle_result,
            handle_batch=self.handle_plans if plans else self.follower.handle_results,
            log=self.log,
            store_up=self._store_up,
            failover=self.failover(dlq),
            service=self.name,
        )

    # what tests and the metrics read of the snapshot poller
    def snapshot_age(self, symbol: str) -> float:
        return self.snapshots.snapshot_age(symbol)

    def ask_refresh(self, symbols: list[str], fills: dict[str, int] | None = None) -> None:
        self.snapshots.ask_refresh(symbols, fills=fills)

    async def refresh_snapshots(self, symbols: list[str] | None = None) -> None:
        await self.snapshots.refresh_snapshots(symbols)

    async def reconcile(self) -> int:
        return await self.snapshots.reconcile()

    def _store_up(self, up: bool) -> None:
        self.metrics.store_up.set(1 if up else 0)

    def _store_changed(self, before: Any, after: Any, new_epoch: bool = False) -> None:
        """Another store instance than before (a restart from older data, a failover): the ledgers may lack
        results it forgot. Reconcile them to the exchange at the next poll (fills already counted by the
        reconcile are not counted again when their results come: domain/ledger.py)."""
        if before is None:
            return
        self.log.warning("the store is another instance than before: reconciling the ledger", run_id=after.run_id)
        self.snapshots.reconcile_soon()

    async def _reconcile_until_done(self) -> None:
        backoff = Backoff()
        while True:
            try:
                await self.reconcile()
                return
            except (ExchangeError, *STORE_ERRORS) as exc:
                message = exc.message if isinstance(exc, ExchangeError) else str(exc)
                self.log.warning("reconcile failed; issuing nothing until it succeeds", error=message)
                await backoff.wait()

    def _ledger_moved(self, change: LedgerChange) -> None:
        """Every ledger change, once written (its audit line goes to the journal too)."""
        self.journal.append(keys.LEDGER_AUDIT_STREAM, ledger_audit_fields(change))
        self.metrics.ledger_updates.labels(change.why).inc()
        log = self.log.bind(plan_id=change.plan_id) if change.plan_id else self.log
        was = change.before.last_known_amt if change.before else "none"
        log.info(f"{change.symbol}: ledger {was} -> {change.after.last_known_amt} ({change.why})")

    # --- plans ------------------------------------------------------------------------------------------

    async def handle_plan(self, entry_id: str, fields: dict[str, str]) -> None:
        await self.handle_plans([(entry_id, fields)])

    async def handle_plans(self, entries: Entries) -> None:
        """Decide the plans of one read: inputs per symbol in one round trip, the decisions in order (an allow
        marks its symbol for the plans after it), the permits in one more round trip.

        A symbol marked in flight for a plan whose result is already published but not yet recorded in the
        ledger (a client saw the result and proposed again at once) waits for the ledger follower, up to 1 s;
        the plans of the other symbols are decided first, so they do not wait with it."""
        started = time.perf_counter()
        plans, dead = await self.accept_plans(entries, keys.P33_GROUP)
        if dead:
            self.metrics.dead_letters.labels("plan").inc(dead)
        if not plans:
            return
        read = await self._inputs(list(dict.fromkeys(plan.symbol for _, plan in plans)), follower=True)
        inputs, unrecorded = read.inputs, read.unrecorded
        deciding = {plan.plan_id for _, plan in plans}
        marks = {
            s: got.in_flight_plan
            for s, got in inputs.items()
            if got.in_flight_plan is not None and got.in_flight_plan not in deciding
        }
        # only while results wait to be recorded can a mark belong to a finished plan
        finishing = await self._results_published(marks) if unrecorded else {}
        now_plans = [(entry_id, plan) for entry_id, plan in plans if plan.symbol not in finishing]
        if now_plans:
            await self._decide(now_plans, inputs, started, unrecorded)
        later = [(entry_id, plan) for entry_id, plan in plans if plan.symbol in finishing]
        if later:
            await self._until_recorded(finishing)
            inputs.update((await self._inputs(list(finishing))).inputs)
            await self._decide(later, inputs, started, unrecorded=False)

    async def _decide(self, plans: Decided, inputs: dict[str, BrainInputs], started: float, unrecorded: bool) -> None:
        """Decide and issue. While results wait to be recorded, a ledger that disagrees with the exchange may
        only be behind a fill whose result is on its way: those symbols wait for the ledger follower (at most
        ``RESULTS_CATCH_UP_S``) and are decided again on what it then holds, instead of being denied now."""
        verdicts = await self._verdicts(plans, inputs)
        waiting: set[str] = set()
        if unrecorded:
            waiting = {p.symbol for (_, p), v in zip(plans, verdicts, strict=True) if v.reason in LEDGER_DISAGREES}
        now_plans = [(pair, v) for pair, v in zip(plans, verdicts, strict=True) if pair[1].symbol not in waiting]
        if now_plans:
            await self._issue([pair for pair, _ in now_plans], [v for _, v in now_plans], started)
        later = [pair for pair in plans if pair[1].symbol in waiting]
        if later:
            await self._until_results_recorded()
            inputs.update((await self._inputs(list(waiting))).inputs)
            await self._issue(later, await self._verdicts(later, inputs), started)

    async def _verdicts(self, plans: Decided, inputs: dict[str, BrainInputs]) -> list[BrainVerdict]:
        symbols = list(dict.fromkeys(plan.symbol for _, plan in plans))
        ledgers = {s: inputs[s].ledger for s in symbols}
        behind = {  # symbol -> its ledger, for those whose snapshot predates the ledger's last change
            s: ledger
            for s, ledger in ledgers.items()
            if ledger is not None and behind_ledger(inputs[s].snapshot, ledger)
        }
        if behind:
            # A fill was applied after the last snapshot: look at the exchange now rather than deny on old data.
            since = max(ledger.updated_at for ledger in behind.values())
            fills = {
                s: ledger.last_fill_ms
                for s, ledger in behind.items()
                if ledger.source == "result" and ledger.last_fill_ms
            }
            if not await self.snapshots.snapshots_since(list(behind), since, fills):
                self.log.warning("no fresh snapshot within the exchange timeout; deciding on what is known")
            inputs.update((await self._inputs(list(behind))).inputs)
        return decide_in_order(
            [plan for _, plan in plans], [inputs[p.symbol] for _, p in plans], self.policy, self._clock.wall()
        )

    async def _issue(self, plans: Decided, verdicts: list[BrainVerdict], started: float) -> None:
        now = self._clock.wall()
        writes = [
            p33_permit_write(
                self.settings,
                self._secret,
                plan,
                verdict,
                claim_owner=f"p33:{self.consumer}:{entry_id}",
                now=now,
                entry_id=entry_id,
            )
            for (entry_id, plan), verdict in zip(plans, verdicts, strict=True)
        ]
        await self.issue_decisions(plans, verdicts, writes, started, _verdict_details)

    async def _inputs(self, symbols: list[str], follower: bool = False) -> InputsRead:
        return await read_inputs(self.redis, symbols, self.snapshots.filters, follower=follower)

    async def _until_results_recorded(self) -> None:
        """Wait until the ledger follower group has no result left to record (no lag, nothing pending), looking
        every 10 ms, at most ``RESULTS_CATCH_UP_S``."""
        deadline = self._clock.mono() + RESULTS_CATCH_UP_S
        while self._clock.mono() < deadline:
            await asyncio.sleep(RESULTS_POLL_S)
            groups = await self.redis.xinfo_groups(keys.RESULT_STREAM)
            ledger = [g for g in groups if g["name"] == keys.LEDGER_GROUP]
            if not ledger or (not ledger[0]["pending"] and ledger[0].get("lag") == 0):
                return

    async def _results_published(self, marks: dict[str, str]) -> dict[str, str]:
        """Of the symbols marked in flight (symbol -> marking plan), those whose plan has its result published
        (Apply's result marker, set in the script that publishes the result)."""
        if not marks:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for plan_id in marks.values():
                pipe.exists(keys.result_marker(plan_id))
            published = await pipe.execute()
        return {symbol: plan_id for (symbol, plan_id), out in zip(marks.items(), published, strict=True) if out}

    async def _until_recorded(self, finishing: dict[str, str]) -> None:
        """Wait until the results of these finished plans are recorded (the follower's "result seen" key, written
        in the same transaction as the ledger: by this instance or another), looking every 10 ms, at most
        ``RESULTS_CATCH_UP_S``. Not for the mark to go: its TTL can free the symbol before the ledger has the fill."""
        seen_keys = [keys.p33_result_seen(plan_id) for plan_id in finishing.values()]
        deadline = self._clock.mono() + RESULTS_CATCH_UP_S
        while self._clock.mono() < deadline:
            await asyncio.sleep(RESULTS_POLL_S)
            if await self.redis.exists(*seen_keys) == len(seen_keys):
                return
