"""Which pushed exchange events to apply: each change at most once, and never an older state over a newer one.

Binance's user-data stream can deliver an event twice (ccxt #18028), late, or after a later one; a REST read
after every (re)connect may already contain what the stream then delivers. Every event the chain applies is a
*state* (a position's amount, an order's cumulative fill), never a delta to add, so the rule is one comparison
per thing: a state is applied when it is newer than the one held.

- A position's version is ``(T, E)``: the transaction time of the change, then the event's time. A REST read
  counts as ``(updateTime, after every E)``: an event of the same millisecond is taken as already in it (two
  transactions in one millisecond with the read between them would leave the second to the next read: the
  safety-net poll).
- An order's version is ``(z, rank of X, T)``: its cumulative filled quantity never shrinks and its status
  only moves forward (NEW, PARTIALLY_FILLED, then a final one), so a duplicate is equal and a late one smaller.
  Readers take the cumulative fields (``z``, ``ap``), never add up ``l``: an event passed over as stale is
  then lost to nobody.
- A mark price's version is its event time.

Plain data and comparisons: tested without I/O (tests/unit/test_stream_sequence.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

READ: Final = 1 << 62  # a REST read's place among the events of its own millisecond: after all of them
ORDERS_KEPT: Final = 10_000  # orders remembered; an event of an older one is compared with nothing (applied)
STATUS_RANK: Final = {"NEW": 0, "PARTIALLY_FILLED": 1}  # every other status is final (rank 2)

PositionVersion = tuple[int, int]
OrderVersion = tuple[Decimal, int, int]


def order_version(cumulative: Decimal, status: str, transaction_ms: int) -> OrderVersion:
    return (cumulative, STATUS_RANK.get(status, 2), transaction_ms)


@dataclass
class Sequence:
    """The newest state applied of every position, order and mark price."""

    positions: dict[str, PositionVersion] = field(default_factory=dict)
    orders: OrderedDict[tuple[str, int], OrderVersion] = field(default_factory=OrderedDict)
    marks: dict[str, int] = field(default_factory=dict)
    # the newest transaction time any position event carried, applied or not (``stream_gap``)
    pushed: dict[str, int] = field(default_factory=dict)

    def position(self, symbol: str, transaction_ms: int, event_ms: int) -> bool:
        """True (and held) when this position state is newer than the one held."""
        self.pushed[symbol] = max(self.pushed.get(symbol, -1), transaction_ms)
        version = (transaction_ms, event_ms)
        if version <= self.positions.get(symbol, (-1, -1)):
            return False
        self.positions[symbol] = version
        return True

    def resynced(self, symbol: str, update_time_ms: int) -> bool:
        """A REST read of the position (its ``updateTime``): held unless the stream already brought a newer
        change. True when the read is the state to keep (also when it is the very state held: a read that
        confirms it says it is still true now)."""
        version = (update_time_ms, READ)
        if version < self.positions.get(symbol, (-1, -1)):
            return False
        self.positions[symbol] = version
        return True

    def order(self, symbol: str, order_id: int, cumulative: Decimal, status: str, transaction_ms: int) -> bool:
        """True (and held) when this order state is newer than the one held."""
        key = (symbol, order_id)
        version = order_version(cumulative, status, transaction_ms)
        held = self.orders.get(key)
        if held is not None and version <= held:
            return False
        self.orders[key] = version
        self.orders.move_to_end(key)
        while len(self.orders) > ORDERS_KEPT:
            self.orders.popitem(last=False)
        return True

    def mark(self, symbol: str, event_ms: int) -> bool:
        if event_ms <= self.marks.get(symbol, -1):
            return False
        self.marks[symbol] = event_ms
        return True


def stream_gap(
    held: Decimal | None, read: Decimal, read_update_ms: int, pushed_ms: int, asked_ms: int, grace_ms: int
) -> str | None:
    """A REST read while the stream is healthy, against what the stream brought: ``"missed"`` when it shows a
    position other than the one held, changed (``read_update_ms``) after the newest change any event of the
    stream carried (``pushed_ms``, stale ones included: one not yet written still counts as brought) and at
    least ``grace_ms`` before the read was sent; ``"young"`` when such a change is younger than that (it may be
    on its way: look again once the grace is over, ``still_missed``); None otherwise."""
    if held is None or held == read or pushed_ms >= read_update_ms:
        return None
    return "missed" if read_update_ms <= asked_ms - grace_ms else "young"


def still_missed(pushed_ms: int, read_update_ms: int) -> bool:
    """After the grace: the stream has still brought no event of the change the read showed."""
    return pushed_ms < read_update_ms
