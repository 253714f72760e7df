"""P3.3's view of the exchange: position snapshots every ``snapshot_interval_s`` and whenever asked (a fill's
symbol, a plan that needs a snapshot newer than its ledger), the ledger reconciled to the exchange (at start,
on an operator's request, after a store change) and positions opened outside the chain adopted.

Requests go through one shared reader (services/shared_reads.py): plans and fills asking at the same moment
share one exchange request, and each gets a snapshot asked for after it asked.

With the user-data stream (services/brain/push.py) the snapshots are also written from pushed positions and
mark prices; while the stream is healthy the full poll is only the safety net (``safety_poll_s``), fills ask
for no poll of their own, and a plan that needs a snapshot newer than its ledger waits for the stream first.
A poll's reply never overwrites a position the stream already brought newer (``sequence``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis

from quantum_trader.bus import keys
from quantum_trader.clock import Clock
from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.domain.ledger import adopt_outside_growth, pushed_is_newer, synced_at
from quantum_trader.domain.models import Ledger, Snapshot, to_fields
from quantum_trader.domain.stream_sequence import Sequence, still_missed, stream_gap
from quantum_trader.exchange.base import Exchange, ExchangeError, PositionInfo
from quantum_trader.services.brain.ledger import LedgerChange, adopt_growth, ledgers_and_marks, reconcile_symbol
from quantum_trader.services.consumer import STORE_ERRORS
from quantum_trader.services.metrics import BrainMetrics
from quantum_trader.services.shared_reads import SharedReads
from quantum_trader.settings import Settings
from quantum_trader.tasks import cancel_and_wait

SNAPSHOT_ATTEMPTS = 2  # polls a plan asks for before it is decided on the snapshot it has
# pushed marks are written at most this often per symbol (they come every second: with many symbols, writing
# each would cost the store and P3.3 more than the snapshots' ts and the Governor's notional check need)
MARK_WRITE_EVERY_S = 2.0
# a fill's result applied while the stream is healthy: its snapshot must show the fill within this long, or the
# stream lost it (an event dropped without a disconnect): the symbol is polled and the stream resynced
FILL_SHOWN_S = 1.0
PUSH_WAIT_S = 0.25  # a plan behind its ledger's fills waits this long for the stream to show them, then polls


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
        # the stream, when there is one: whether it is healthy now, and its order of position states
        self.stream_healthy: Callable[[], bool] = lambda: False
        self.stream_missed: Callable[[str], None] = lambda why: None  # the stream lost an event: resync it
        self.sequence: Sequence | None = None
        self._known: dict[str, PositionInfo] = {}  # the position each snapshot shows now (polled or pushed)
        self._writing = asyncio.Lock()
        self._synced_ms: dict[str, int] = {}  # per symbol: the exchange time up to which its snapshot shows fills
        self._wrote = asyncio.Event()
        self._rechecks: set[asyncio.Future[None]] = set()  # _follow_known tasks, held until done
        self._mark_written: dict[str, float] = {}  # per symbol: when a pushed mark was last written

    def snapshot_age(self, symbol: str) -> float:
        """Seconds since the symbol's snapshot was written by this instance (inf before the first)."""
        at = self._snapshot_at.get(symbol)
        return self._clock.wall() - at if at is not None else float("inf")

    async def run(self) -> None:
        """Every ``snapshot_interval_s`` all symbols, each full poll due an interval after the last one started
        (a slow or failed poll does not push the next one back); asked-for symbols never starve the others: a
        full poll joins the next request whatever else is asked meanwhile. Asks that came before this loop (a
        store change during the start-up reconcile) are polled first."""
        self._running = True
        if self._early:
            self._reads.ask(self._early)
            self._early.clear()
        try:
            last_full = self._clock.mono()  # reconcile wrote every snapshot just before this loop
            while True:
                # the interval is looked at again every second: a stream that stops being healthy brings the
                # poll back to its own interval at once, not after the safety net's
                due = last_full + self.poll_interval()
                await asyncio.sleep(max(0.0, min(1.0, due - self._clock.mono())))
                if self._clock.mono() < last_full + self.poll_interval() and not await self._reconcile_asked():
                    continue
                last_full = self._clock.mono()
                with contextlib.suppress(ExchangeError, *STORE_ERRORS):  # logged by _poll
                    await self._reads.get(self.symbols)
        finally:
            self._running = False
            await self._reads.aclose()

    async def _reconcile_asked(self) -> bool:
        """An operator asked for a reconcile (``qt brain reconcile``): served at the next second, not at the
        next full poll (a minute apart while the stream is healthy). Only looked at between long polls."""
        if self.poll_interval() <= 1.0:
            return False  # the next poll is due within the second anyway
        try:
            return bool(await self.redis.exists(keys.RECONCILE_REQUEST))
        except STORE_ERRORS:
            return False  # the poll loop's own requests report the outage

    def poll_interval(self) -> float:
        """Between full polls: the safety net's while the stream is healthy, the poll's own otherwise."""
        brain = self.settings.brain
        return brain.safety_poll_s if self.stream_healthy() else brain.snapshot_interval_s

    def ask_refresh(self, symbols: list[str], *, force: bool = False, fills: dict[str, int] | None = None) -> None:
        """A snapshot of ``symbols`` soon (a fill moved them); nobody waits for it. Before the poll loop runs,
        the asks wait for it (nothing is polled before the start-up reconcile is done). While the stream is
        healthy it brings the change itself: no poll unless ``force``, or unless a fill of ``fills`` (symbol ->
        the fill's exchange time) is not shown within ``FILL_SHOWN_S``."""
        if self.stream_healthy() and not force:
            # no poll: but growth pushed while a plan of the chain was in flight was not adopted then; the
            # fill's result ends that, so the position as pushed is looked at again now
            for work in (self._follow_known(self._managed(symbols)), self._check_shown(fills or {})):
                task = asyncio.ensure_future(work)
                self._rechecks.add(task)
                task.add_done_callback(self._rechecks.discard)
            return
        if self._running:
            self._reads.ask(self._managed(symbols))
        else:
            self._early.update(dict.fromkeys(self._managed(symbols)))

    async def close(self) -> None:
        """Stop the looks at pushed positions still running (the poll loop stops with its own task)."""
        await cancel_and_wait(list(self._rechecks))

    async def _check_shown(self, fills: dict[str, int]) -> None:
        """After ``FILL_SHOWN_S``: the fills whose snapshot does not show them were lost by the stream (an event
        dropped while the connection stayed up): poll those symbols now and have the stream resync, rather than
        wait for the safety poll with a snapshot that looks fresh and is not."""
        if not fills:
            return
        await asyncio.sleep(FILL_SHOWN_S)
        managed = set(self.symbols)
        missed = sorted(s for s, at_ms in fills.items() if s in managed and self._synced_ms.get(s, 0) < at_ms)
        if not missed or not self.stream_healthy():
            return  # shown; or the stream is down, and the poll is back to every few seconds anyway
        self._stream_missed(missed, f"it did not show a fill of {', '.join(missed)} within {FILL_SHOWN_S:g} s")
        self._reads.ask(missed)

    async def _follow_known(self, symbols: list[str]) -> None:
        """``follow_outside`` for the positions as last written (pushed), after a ledger change."""
        held = [s for s in symbols if s in self._known]
        if not held:
            return
        try:
            _, before = await ledgers_and_marks(self.redis, held)
            for symbol in held:
                position = self._known[symbol]
                synced_ms = position.update_time_ms - 1  # pushed: see follow_outside
                await self.follow_outside(
                    symbol, position, before[symbol], self._clock.wall(), synced_ms, pushed=position.update_time_ms > 0
                )
        except STORE_ERRORS as exc:
            self.log.warning("could not look at pushed positions again: store unavailable", error=str(exc))
        except Exception:  # a bug: logged, never lost in a task nobody awaits
            self.log.exception("looking at pushed positions again failed unexpectedly")

    def _managed(self, symbols: list[str]) -> list[str]:
        """The managed ones of ``symbols`` (only those are polled); all symbols when none is (a full poll)."""
        return [s for s in self.symbols if s in symbols] or self.symbols

    def reconcile_soon(self) -> None:
        """Reconcile every ledger at the next poll (the store is another instance than before)."""
        self._reconcile_asks += 1
        self.ask_refresh(self.symbols, force=True)

    async def snapshots_since(self, symbols: list[str], since: float, fills: dict[str, int] | None = None) -> bool:
        """Ask for snapshots of ``symbols`` and wait for them, until each was asked for at or after ``since``.
        A poll that fails (a connection the store restart broke, a 5xx) is asked for once more; False when
        that one fails too (or wrote older snapshots: another instance's ledger clock is ahead), or after the
        exchange timeout. ``fills``: for a symbol whose ledger last moved by fills, the latest fill's exchange
        time: a snapshot that shows it is fresh enough whenever it was written (a pushed one often is before the
        fill's result is recorded)."""
        shows = fills or {}  # symbol -> exchange time of a fill the snapshot must show

        def fresh() -> bool:
            return all(
                self._snapshot_at.get(symbol, 0.0) >= since
                or (symbol in shows and self._synced_ms.get(symbol, 0) >= shows[symbol])
                for symbol in symbols
            )

        if shows and all(symbol in shows for symbol in symbols) and self.stream_healthy():
            # the fills are known by their exchange time and the stream pushes each within milliseconds: wait
            # for it a moment before asking the exchange
            pushed_by = self._clock.mono() + PUSH_WAIT_S
            while not fresh() and self.stream_healthy() and self._clock.mono() < pushed_by:
                self._wrote.clear()  # set by the next snapshot write
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wrote.wait(), min(1.0, max(0.0, pushed_by - self._clock.mono())))
            if fresh():
                return True
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

    async def resync(self) -> dict[str, int]:
        """After every (re)connect of the stream: a full poll (the reconcile, when one is due); each position's
        ``updateTime`` as read, for the stream's order rule."""
        read = await self.refresh_snapshots(self.symbols)
        return {symbol: position.update_time_ms for symbol, position in read.items()}

    async def refresh_snapshots(self, symbols: list[str] | None = None) -> dict[str, PositionInfo]:
        """Poll the exchange for ``symbols`` (default: all), write the snapshots, then follow positions opened
        outside the chain; or reconcile everything when an operator asked for it (``qt brain reconcile``)."""
        symbols = symbols or self.symbols
        reconcile_asked, before = await ledgers_and_marks(self.redis, symbols)
        asks = self._reconcile_asks
        if reconcile_asked or asks > self._reconciled:
            _, read = await self._reconcile_counted()  # on failure nothing is marked done: the next poll tries again
            self._reconciled = asks
            if reconcile_asked:
                await self.redis.delete(keys.RECONCILE_REQUEST)
            return read
        # Read before the exchange call: a fill applied meanwhile must not be mistaken for outside growth.
        # The snapshot's time is when the request was sent: a reply can only show fills that happened before it
        # arrived, and every fill whose result P3.3 applied after this moment may be missing from it.
        asked_at, asked_ms = self._clock.wall(), self.exchange.now_ms()
        positions = await self.exchange.positions(symbols)
        await self._write_snapshots(positions, asked_at, asked_ms)
        for symbol, position in positions.items():
            synced_ms = synced_at(position.update_time_ms, asked_ms)
            await self.follow_outside(symbol, position, before[symbol], asked_at, synced_ms)
        return positions

    async def follow_outside(
        self,
        symbol: str,
        position: PositionInfo,
        before: tuple[Ledger | None, str | None],
        at: float,
        synced_ms: int,
        *,
        pushed: bool = False,
    ) -> LedgerChange | None:
        """A position read (polled or pushed) against the ledger read before it: the drift gauge, and growth
        made outside the chain adopted (when no plan of the chain is in flight on the symbol, and a pushed one is
        not older than the ledger's last change: ``pushed_is_newer``). ``synced_ms``: up
        to when (exchange ms) the position shows every fill; for a pushed one the millisecond before its
        transaction, as another fill of the same millisecond may not be in it (a result of that fill must
        still move the adopted ledger)."""
        ledger, in_flight = before
        if ledger is not None:
            self.metrics.ledger_drift.labels(symbol).set(float(position.amt - ledger.last_known_amt))
        if in_flight is not None or adopt_outside_growth(ledger, position.amt, at) is None:
            return None
        if pushed and not pushed_is_newer(ledger, position.update_time_ms):
            return None  # the pushed state may predate the ledger's last change: the next push or poll decides
        change = await adopt_growth(
            self.redis, symbol, ledger, position.amt, self._clock.wall(), synced_ms, self.settings.audit_maxlen
        )
        if change is not None:
            self._moved(change)
        return change

    def _newer(self, positions: dict[str, PositionInfo], asked_ms: float) -> dict[str, PositionInfo]:
        """The read positions to write: all of them without a healthy stream (nothing newer can arrive); with
        one, those not older than what it brought, and those that show the very position held (a pushed update
        that moved no amount, say a funding fee, advances the stream's version past the REST ``updateTime``,
        which only trades move: the read still confirms the position). With a healthy stream, a read that shows
        a change the stream never brought has it resynced (``_missed_by_stream``)."""
        if self.sequence is None or not self.stream_healthy():
            if self.sequence is not None:
                for symbol, p in positions.items():
                    self.sequence.resynced(symbol, p.update_time_ms)
            return positions
        sequence = self.sequence
        newer = {
            s: p
            for s, p in positions.items()
            if sequence.resynced(s, p.update_time_ms) or _same_position(self._known.get(s), p)
        }
        self._missed_by_stream(newer, asked_ms)
        return newer

    def _missed_by_stream(self, read: dict[str, PositionInfo], asked_ms: float) -> None:
        """A poll while the stream is healthy that finds a change the stream never brought (a manual trade, a
        liquidation, a fill whose events it lost with the connection up): resync the stream, as for a fill of
        the chain it did not show (``_check_shown``), rather than trust its next events. A change younger than
        ``FILL_SHOWN_S`` is looked at again once that is over (the poll writes it now: nothing later would
        tell)."""
        assert self.sequence is not None
        grace_ms = int(FILL_SHOWN_S * 1000)
        missed = []
        for symbol, p in read.items():
            pushed_ms = self.sequence.pushed.get(symbol, -1)
            held = _held_amt(self._known.get(symbol))
            gap = stream_gap(held, p.amt, p.update_time_ms, pushed_ms, int(asked_ms), grace_ms)
            if gap == "missed":
                missed.append(symbol)
            elif gap == "young":
                wait_s = (p.update_time_ms + grace_ms - asked_ms) / 1000
                task = asyncio.ensure_future(self._look_again(symbol, p.update_time_ms, wait_s))
                self._rechecks.add(task)
                task.add_done_callback(self._rechecks.discard)
        if missed:
            self._stream_missed(sorted(missed), f"a poll found changes of {', '.join(sorted(missed))} it never brought")

    async def _look_again(self, symbol: str, update_ms: int, wait_s: float) -> None:
        await asyncio.sleep(max(0.0, wait_s))
        sequence = self.sequence
        if sequence is not None and self.stream_healthy() and still_missed(sequence.pushed.get(symbol, -1), update_ms):
            self._stream_missed([symbol], f"a poll found a change of {symbol} it never brought")

    def _stream_missed(self, symbols: list[str], why: str) -> None:
        """The stream lost what ``symbols`` show (``why``): a gap counted, and the stream resynced."""
        self.metrics.stream_gaps.inc(len(symbols))
        self.log.warning("the user-data stream lost an event: resyncing it", symbols=symbols, why=why)
        self.stream_missed(why)

    async def reconcile(self) -> int:
        changed, _ = await self._reconcile_counted()
        return changed

    async def _reconcile_counted(self) -> tuple[int, dict[str, PositionInfo]]:
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
        await self._write_snapshots(positions, asked_at, asked_ms)
        for symbol in positions:
            self.metrics.ledger_drift.labels(symbol).set(0)  # the ledger was just set to the exchange
        self.log.info("ledger reconciled", symbols=len(positions), changed=changed)
        return changed, positions

    async def _write_snapshots(self, positions: dict[str, PositionInfo], now: float, asked_ms: float) -> None:
        """Write polled positions (those the stream has nothing newer of: ``_newer``, decided under the lock
        every snapshot write takes, so a pushed state and a poll's reply never overtake each other). A read
        sent at ``asked_ms`` (exchange clock) shows every fill before then."""
        async with self._writing:
            newer = self._newer(positions, asked_ms)
            await self._write(newer, now, {s: synced_at(p.update_time_ms, asked_ms) for s, p in newer.items()})

    async def _write(self, positions: dict[str, PositionInfo], now: float, synced: dict[str, int]) -> None:
        if not positions:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for symbol, p in positions.items():
                snap = Snapshot(
                    position_amt=p.amt,
                    entry_price=p.entry_price,
                    mark_price=p.mark_price,
                    ts=now,
                    synced_ms=synced.get(symbol, self._synced_ms.get(symbol, 0)),
                )
                pipe.hset(keys.snapshot(symbol), mapping=to_fields(snap))
            await pipe.execute()
        self._known.update(positions)
        self._synced_ms.update(synced)
        self._snapshot_at.update(dict.fromkeys(positions, now))
        self._wrote.set()

    # --- pushed by the stream ---------------------------------------------------------------------------

    def known(self, symbol: str) -> PositionInfo | None:
        """The position the snapshot of ``symbol`` shows as this instance last wrote it (polled or pushed)."""
        return self._known.get(symbol)

    async def pushed_position(
        self, symbol: str, amt: Decimal, entry_price: Decimal, update_ms: int, version: tuple[int, int], at: float
    ) -> PositionInfo | None:
        """The stream brought the position of ``symbol`` at ``version`` (its order rule's); written unless a
        newer state (a poll's reply, another event) was held meanwhile. The position written, or None."""
        async with self._writing:
            if self.sequence is not None and self.sequence.positions.get(symbol) != version:
                return None
            was = self._known.get(symbol)
            mark = was.mark_price if was is not None else Decimal(0)
            position = PositionInfo(symbol, amt, entry_price, mark, update_ms)
            await self._write({symbol: position}, at, {symbol: update_ms})
        return position

    async def pushed_mark(self, symbol: str, mark: Decimal, at: float) -> None:
        """A mark price from the stream: the snapshot's ``mark_price``, and its ``ts`` moved to ``at`` (the frame's
        receipt: the stream is healthy and delivers in order on its one connection). Only those two fields are
        written: the position stays whatever the newest write (this instance's or another's) put there."""
        if at - self._mark_written.get(symbol, 0.0) < MARK_WRITE_EVERY_S:
            return  # a mark a second or two old serves the notional check and the staleness rule alike
        async with self._writing:
            if symbol not in self._known:
                return  # no position read yet: nothing to vouch for
            self._mark_written[symbol] = at
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(keys.snapshot(symbol), mapping={"mark_price": str(mark), "ts": repr(at)})
                await pipe.execute()
            self._known[symbol] = replace(self._known[symbol], mark_price=mark)
            self._snapshot_at[symbol] = max(at, self._snapshot_at.get(symbol, 0.0))
            self._wrote.set()


def _held_amt(known: PositionInfo | None) -> Decimal | None:
    return known.amt if known is not None else None


def _same_position(known: PositionInfo | None, read: PositionInfo) -> bool:
    return known is not None and known.amt == read.amt and known.entry_price == read.entry_price
