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
    floor: StreamId  # proposals above it were added to this instance (its start, or when it was first used)
    # wall time (epoch s) at or after the moment it became this instance: its start if it has been a primary
    # since (a restart), else when an Apply first saw it (a promoted replica: the promotion is not dated)
    since: float
    # the newest proposal at or below the floor: what the instance kept of what came before it (anything the
    # store forgot was written after it)
    kept: StreamId = (0, 0)
    searched: bool = False  # an Apply has searched the exchange for orders this instance forgot
    # run_id|replid|floor|since of the instance that began the epoch, as its record holds it: what the scripts
    # compare, inside the store, to refuse a step decided on this epoch's word once the store is an instance
    # that does not continue it ("": not known)
    key: str = ""
    # how many restarts that lost nothing this epoch has been continued through (bus/identity.py CLAIM_EPOCH):
    # its word stands on the instance now as it did on the one that began it
    continued: int = 0
    # the instance is a promoted replica (not a primary since it started): its old primary, cut off, may have
    # taken writes a while after the promotion (the failover fence: prior_sends_signed_before)
    promoted: bool = False
    # when the latest promotion the instance's data knows of was first seen (0: none): its own since if it is
    # the promoted replica, inherited by a restart after it (the cut-off old primary is not gone with it)
    promoted_at: float = 0.0

    def same_as(self, other: Epoch | None) -> bool:
        """The same epoch (what was learnt about it since, e.g. ``searched``, aside): begun by the same instance
        with the same floor, on that instance or one that continues it."""
        if other is None:
            return False
        if self.key and other.key:
            return self.key == other.key
        return (self.identity, self.floor, self.since) == (other.identity, other.floor, other.since)

    def trusts(self, proposal_entry_id: str, now: float) -> bool:
        """The proposal lived its whole life on this instance (so did its plan, permits, markers and order), and
        is young enough that the plan's records cannot have expired (they live ``RECORDS_LIVE_S``): an older
        one may have had an order whose records are gone."""
        try:
            entry = stream_id(proposal_entry_id)
        except ValueError:
            return False
        return entry > self.floor and entry[0] > (now - TRUST_MAX_AGE_S) * 1000


# A plan's records (plan, markers, intent, result) live a day (bus/keys.py PLAN_BOOKKEEPING_TTL_S); a proposal
# still unanswered close to that age is looked up, whatever its place relative to the instance.
RECORDS_LIVE_S = 24 * 3600
TRUST_MAX_AGE_S = RECORDS_LIVE_S - 3600


def started_before_ms(server_now_ms: int, uptime_s: int) -> int:
    """The latest moment (server clock, ms) a server can have started, given its ``uptime_in_seconds``: that is
    whole seconds of now (the server's cached clock, which can only lag) minus whole seconds of the start, so
    the start lies in the second ``now_s - uptime_s``, and its end bounds it (at most a second late: never
    early). A bound later than the start is safe to use; an earlier one is not. (Until issue 20 this was
    ``now - (uptime - 1) s``, up to two seconds late: proposals sent in a restarted store's first two seconds
    counted as older than the instance.)"""
    return (server_now_ms // 1000 - uptime_s + 1) * 1000


def trusted(epoch: Epoch | None, proposal_entry_id: str, now: float) -> bool:
    return epoch is not None and epoch.trusts(proposal_entry_id, now)


def prior_sends_signed_before(
    epoch: Epoch | None, plan_created_at: float | None, window_s: float, now: float, fence_s: float = 0.0
) -> float:
    """The latest wall time (epoch s) at which any attempt at a plan, seen here or not, can have signed its order
    request: every send leaves inside the plan's permit window (its deadline is checked right before the
    request is signed).

    With the plan's record, its own window bounds it: the record is the plan's only incarnation (a record that
    predates the instance survived the change; one made on this instance is for a proposal newer than it, as an
    older one is never planned again). Without a record, an attempt the store forgot consumed its permits on
    an earlier instance, so before ``epoch.since``, inside a window that began before that; after a promotion,
    before ``epoch.promoted_at + fence_s`` too: the old primary, cut off by a partition, took writes until its
    replicas' acknowledgements were ``min-replicas-max-lag`` old, and the promotion came after the cut (a
    restart of the promoted primary soon after does not end that). With no epoch known either, only ``now``
    bounds it.
    """
    if plan_created_at is not None:
        return plan_created_at + window_s
    if epoch is None:
        return now + window_s
    fenced = epoch.promoted_at + fence_s if epoch.promoted_at else 0.0
    return max(epoch.since, fenced) + window_s
