"""P3.3's view of the exchange: position snapshots every ``snapshot_interval_s`` and whenever asked (a fill's
symbol, a plan that needs a snapshot newer than its ledger), the ledger reconciled to the exchange (at start,
on an operator's request, after a store change) and positions opened outside the chain adopted.

Requests go through one shared reader (services/shared_reads.py): plans and fills asking at the same moment
share one exchange request, and each gets a snapshot asked for after it asked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.clock import Clock
from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.domain.ledger import adopt_outside_growth, synced_at
from quantum_trader.domain.models import Snapshot, to_fields
from quantum_trader.exchange.base import Exchange, ExchangeError, PositionInfo
from quantum_trader.services.brain.ledger import LedgerChange, adopt_growth, ledgers_and_marks, reconcile_symbol
from quantum_trader.services.consumer import STORE_ERRORS
from quantum_trader.services.metrics import BrainMetrics
from quantum_trader.services.shared_reads import SharedReads
from quantum_trader.settings import Settings

SNAPSHOT_ATTEMPTS = 2  # polls a plan asks for before it is decided on the snapshot it has


class SnapshotPoller:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        exchange: Exchange,
        metrics: BrainMetrics,
        log: Any,
        clock: Clock,
        moved: Callable[[LedgerChange], None],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.exchange = exchange
        self.metrics = metrics
        self.log = log
        self.symbols = list(settings.symbols)
        self.filters: dict[str, SymbolFilters] = {}
        self._clock = clock
        self._moved = moved  # told of every ledger change
        self._snapshot_at: dict[str, float] = {}  # per symbol: when the request behind its snapshot was sent
        # the store is another instance: its ledgers may have lost results (asked for, and done, in order)
        self._reconcile_asks = self._reconciled = 0
        self._reads: SharedReads[str, float] = SharedReads(self._poll, "p33-snapshots")
        self._running = False  # the poll loop runs: asks go to the shared reader (before: kept in _early)
        self._early: dict[str, None] = {}

    def snapshot_age(self, symbol: str) -> float:
        """Seconds since the symbol's snapshot was written by this instance (inf before the first)."""
        at = self._snapshot_at.get(symbol)
        return self._clock.wall() - at if at is not None else float("inf")

    async def run(self) -> None:
        """Every ``snapshot_interval_s`` all symbols, each full poll due an interval after the last one started
        (a slow or failed poll does not push the next one back); asked-for symbols never starve the others: a
        full poll joins the next request whatever else is asked meanwhile. Asks that came before this loop (a
        store change during the start-up reconcile) are polled first."""
        interval = self.settings.brain.snapshot_interval_s
        self._running = True
        if self._early:
            self._reads.ask(self._early)
            self._early.clear()
        try:
            next_full = self._clock.mono() + interval  # reconcile wrote every snapshot just before this loop
            while True:
                await asyncio.sleep(max(0.0, next_full - self._clock.mono()))
                next_full = self._clock.mono() + interval
                with contextlib.suppress(ExchangeError, *STORE_ERRORS):  # logged by _poll
                    await self._reads.get(self.symbols)
        finally:
            self._running = False
            await self._reads.aclose()

    def ask_refresh(self, symbols: list[str]) -> None:
        """A snapshot of ``symbols`` soon (a fill moved them); nobody waits for it. Before the poll loop runs,
        the asks wait for it (nothing is polled before the start-up reconcile is done)."""
        if self._running:
            self._reads.ask(self._managed(symbols))
        else:
            self._early.update(dict.fromkeys(self._managed(symbols)))

    def _managed(self, symbols: list[str]) -> list[str]:
        """The managed ones of ``symbols`` (only those are polled); all symbols when none is (a full poll)."""
        return [s for s in self.symbols if s in symbols] or self.symbols

    def reconcile_soon(self) -> None:
        """Reconcile every ledger at the next poll (the store is another instance than before)."""
        self._reconcile_asks += 1
        self.ask_refresh(self.symbols)

    async def snapshots_since(self, symbols: list[str], since: float) -> bool:
        """Ask for snapshots of ``symbols`` and wait for them, until each was asked for at or after ``since``.
        A poll that fails (a connection the store restart broke, a 5xx) is asked for once more; False when
        that one fails too (or wrote older snapshots: another instance's ledger clock is ahead), or after the
        exchange timeout."""

        def fresh() -> bool:
            return all(self._snapshot_at.get(symbol, 0.0) >= since for symbol in symbols)

        deadline = self._clock.mono() + self.settings.exchange.timeout_ms / 1000 + 1
        for _ in range(SNAPSHOT_ATTEMPTS):
            if fresh():
                break
            try:
                await asyncio.wait_for(self._reads.get(self._managed(symbols)), max(0.0, deadline - self._clock.mono()))
            except TimeoutError:  # (before the store errors: TimeoutError is an OSError)
                break
            except (ExchangeError, *STORE_ERRORS):
                pass  # logged by _poll; asked for once more
            if self._clock.mono() >= deadline:
                break
        return fresh()

    async def _poll(self, symbols: list[str]) -> dict[str, float]:
        """One request through the shared reader: failures are counted and logged here, once per request."""
        try:
            await self.refresh_snapshots(symbols)
        except ExchangeError as exc:
            self.metrics.snapshot_errors.inc()
            self.log.warning("snapshot poll failed; snapshots will go stale", error=exc.message)
            raise
        except STORE_ERRORS as exc:
            self.log.warning("snapshot write failed: store unavailable", error=str(exc))
            raise
        except Exception:  # a bug: logged here, where a poll nobody waits for would otherwise drop it
            self.log.exception("snapshot poll failed unexpectedly")
            raise
        return {symbol: self._snapshot_at[symbol] for symbol in symbols if symbol in self._snapshot_at}

    async def refresh_snapshots(self, symbols: list[str] | None = None) -> None:
        """Poll the exchange for ``symbols`` (default: all), write the snapshots, then follow positions opened
        outside the chain; or reconcile everything when an operator asked for it (``qt brain reconcile``)."""
        symbols = symbols or self.symbols
        reconcile_asked, before = await ledgers_and_marks(self.redis, symbols)
        asks = self._reconcile_asks
        if reconcile_asked or asks > self._reconciled:
            await self.reconcile()  # on failure nothing is marked done: the next poll tries again
            self._reconciled = asks
            if reconcile_asked:
                await self.redis.delete(keys.RECONCILE_REQUEST)
            return
        # Read before the exchange call: a fill applied meanwhile must not be mistaken for outside growth.
        # The snapshot's time is when the request was sent: a reply can only show fills that happened before it
        # arrived, and every fill whose result P3.3 applied after this moment may be missing from it.
        asked_at, asked_ms = self._clock.wall(), self.exchange.now_ms()
        positions = await self.exchange.positions(symbols)
        await self._write_snapshots(positions, asked_at)
        for symbol, position in positions.items():
            ledger, in_flight = before[symbol]
            if ledger is not None:
                self.metrics.ledger_drift.labels(symbol).set(float(position.amt - ledger.last_known_amt))
            if in_flight is None and adopt_outside_growth(ledger, position.amt, asked_at) is not None:
                synced_ms = synced_at(position.update_time_ms, asked_ms)
                change = await adopt_growth(
                    self.redis, symbol, ledger, position.amt, self._clock.wall(), synced_ms, self.settings.audit_maxlen
                )
                if change is not None:
                    self._moved(change)

    async def reconcile(self) -> int:
        """Set every managed symbol's ledger to the exchange's position; one audit entry per change. A ledger
        that moved after the exchange was asked (a result recorded meanwhile) is left for the next poll: the
        reply may not show that fill yet."""
        self.filters = await self.exchange.filters()
        asked_at, asked_ms = self._clock.wall(), self.exchange.now_ms()
        positions = await self.exchange.positions(self.symbols)
        changed = skipped = 0
        for symbol, position in positions.items():
            synced_ms = synced_at(position.update_time_ms, asked_ms)
            done = await reconcile_symbol(
                self.redis, symbol, position.amt, asked_at, synced_ms, self.settings.audit_maxlen
            )
            if isinstance(done, LedgerChange):
                self._moved(done)
                changed += 1
            skipped += done == "later"
        if skipped:  # a ledger moved while the exchange was read: reconcile again at the next poll
            self._reconcile_asks += 1
        await self._write_snapshots(positions, asked_at)
        for symbol in positions:
            self.metrics.ledger_drift.labels(symbol).set(0)  # the ledger was just set to the exchange
        self.log.info("ledger reconciled", symbols=len(positions), changed=changed)
        return changed

    async def _write_snapshots(self, positions: dict[str, PositionInfo], now: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for symbol, p in positions.items():
                snap = Snapshot(position_amt=p.amt, entry_price=p.entry_price, mark_price=p.mark_price, ts=now)
                pipe.hset(keys.snapshot(symbol), mapping=to_fields(snap))
            await pipe.execute()
        self._snapshot_at.update(dict.fromkeys(positions, now))
