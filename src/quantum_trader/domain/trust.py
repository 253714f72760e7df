"""When Apply may take the store's word for "this plan's order was never sent" (pure; docs/reliability.md).

A store instance never loses a write it acknowledged while it stays the same instance: a loss takes a restart
(a new ``run_id``), a failover (another server) or a demotion (a new replication id once it is primary again).
The first Apply to use an instance records, in the instance itself, the proposal stream's last id at that
moment (the *floor*) and the time (``since``). A proposal added after the floor lived its whole life on this
instance, so the store's records of its plan are complete: no marker means no order. Every other plan is
looked up on the exchange by its client order id before Apply sends it or reports it not executed.
"""

from __future__ import annotations

from dataclasses import dataclass

StreamId = tuple[int, int]


def stream_id(text: str) -> StreamId:
    """``"1700000000000-3"`` as (ms, seq), ordered as the store orders ids. Raises ValueError."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """One store instance: its process (``run_id``) and its replication history (``replid``)."""

    run_id: str
    replid: str


@dataclass(frozen=True, slots=True)
class Epoch:
    """The store instance Apply talks to, as recorded in it by the first Apply that used it."""

    identity: StoreIdentity
    floor: StreamId  # the proposal stream's last id when the instance was first used
    # wall time (epoch s) at or after the moment it became this instance: its start if it has been a primary
    # since (a restart), else when an Apply first saw it (a promoted replica: the promotion is not dated)
    since: float

    def trusts(self, proposal_entry_id: str) -> bool:
        """The proposal lived its whole life on this instance (so did its plan, permits, markers and order)."""
        try:
            return stream_id(proposal_entry_id) > self.floor
        except ValueError:
            return False


def trusted(epoch: Epoch | None, proposal_entry_id: str) -> bool:
    return epoch is not None and epoch.trusts(proposal_entry_id)


def prior_sends_signed_before(epoch: Epoch | None, plan_created_at: float | None, window_s: float, now: float) -> float:
    """The latest wall time (epoch s) at which an earlier, forgotten attempt at a plan can have signed its
    order request, for a plan the store cannot vouch for.

    Any such attempt consumed the permits on an earlier instance, so before ``epoch.since``; its plan was
    created before that, and every send leaves inside the plan's permit window (the deadline is checked
    right before the request is signed). A plan record that predates the instance bounds it more tightly.
    With no epoch yet, nothing is known: the bound is ``now`` plus the window.
    """
    start = epoch.since if epoch is not None else now
    if plan_created_at is not None:
        start = min(start, plan_created_at)
    return start + window_s
