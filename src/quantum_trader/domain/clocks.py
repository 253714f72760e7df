"""How far Apply may trust clocks when it calls an order "absent for good" (pure; docs/reliability.md "Clocks").

Two clocks matter. The exchange's: signed requests carry exchange time (this host's clock minus the measured
offset), and a request signed at ``t`` cannot execute after ``t + recvWindow`` on the exchange's clock; the
offset is measured from the midpoint of a ``/time`` round trip, so it is known to within half that round trip,
plus what the clocks drift apart since. And the other Apply hosts': a plan's record, its executed marker and
its intent carry the wall time of the host that wrote them, and another host that bounds "no request of this
plan can still execute" from them is wrong by the difference between the two hosts' clocks. Every Apply
publishes its reading of the exchange clock (offset and error); the difference between two hosts' offsets is
the difference between their clocks, to within both errors.

The verdict "absent for good" adds this host's error, and for sends another host may have made the largest
difference to a live peer. Past the configured bounds Apply fails closed: it plans nothing new and calls
nothing absent until the clocks are back within them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# How fast two clocks may drift apart between measurements: 100 ppm is ten times what a quartz clock without
# NTP does (NTP-disciplined ones: far less). Ten minutes between measurements: 60 ms.
DRIFT_MS_PER_S = 0.1


@dataclass(frozen=True, slots=True)
class ClockReading:
    """One host's reading of the exchange clock: ``offset_ms`` = its wall clock minus the exchange's, known to
    within ``error_ms`` when it was measured at ``measured_at`` (that host's wall clock, s)."""

    offset_ms: float
    error_ms: float
    measured_at: float

    def error_at(self, now: float) -> float:
        """The error bound ``now`` (this host's wall clock, s): the measurement's, plus the drift since."""
        return self.error_ms + DRIFT_MS_PER_S * max(0.0, now - self.measured_at)


@dataclass(frozen=True, slots=True)
class ClockState:
    """What the clocks allow now. ``own_error_ms``: this host's error to the exchange clock; ``host_gap_ms``: the
    largest difference between this host's clock and a live peer Apply's, errors included (0 without peers);
    ``problem``: why Apply must fail closed ("" when within bounds)."""

    own_error_ms: float
    host_gap_ms: float = 0.0
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


UNMEASURED = ClockState(own_error_ms=0.0, problem="the exchange clock has not been measured yet")


def judge(
    own: ClockReading | None,
    peers: Sequence[ClockReading],
    now: float,
    *,
    max_error_ms: float,
    max_host_gap_ms: float,
) -> ClockState:
    """The clock state from this host's reading and its live peers' (each aged to ``now``)."""
    if own is None:
        return UNMEASURED
    error = own.error_at(now)
    gap = max(
        (abs(own.offset_ms - peer.offset_ms) + error + peer.error_at(now) for peer in peers),
        default=0.0,
    )
    if error > max_error_ms:
        problem = f"this host's offset to the exchange clock is uncertain by {error:.0f} ms (> {max_error_ms:g} ms)"
    elif gap > max_host_gap_ms:
        problem = f"another Apply host's clock differs from this one's by up to {gap:.0f} ms (> {max_host_gap_ms:g})"
    else:
        problem = ""
    return ClockState(own_error_ms=error, host_gap_ms=gap, problem=problem)


def encode(reading: ClockReading, published_at: float) -> str:
    """A reading as the store keeps it (one hash field per Apply): offset|error|measured_at|published_at."""
    return f"{reading.offset_ms!r}|{reading.error_ms!r}|{reading.measured_at!r}|{published_at!r}"


def decode(text: str) -> tuple[ClockReading, float]:
    """The reading and when it was published. Raises ValueError on anything else."""
    offset, error, measured_at, published_at = (float(part) for part in text.split("|"))
    for value in (offset, error, measured_at, published_at):
        if not math.isfinite(value):
            raise ValueError(f"not a finite number in {text[:80]!r}")
    if error < 0:
        raise ValueError(f"a negative error in {text[:80]!r}")
    return ClockReading(offset, error, measured_at), published_at
