from __future__ import annotations

from quantum_trader.domain import reasons
from quantum_trader.domain.brain.state import BrainInputs, BrainPolicy
from quantum_trader.domain.models import Ledger, Plan, Snapshot


def behind_ledger(snapshot: Snapshot | None, ledger: Ledger | None) -> bool:
    """The snapshot was taken before the ledger's last change (a fill just applied): it no longer shows the
    position the ledger describes, so comparing the two would report a mismatch that is not there.

    When the ledger last moved by results and the snapshot shows every fill up to the latest of them (by the
    exchange's clock: a pushed position often arrives before the fill's result is recorded), it is not
    behind, whatever the local times say."""
    if snapshot is None or ledger is None:
        return False
    if ledger.source == "result" and ledger.last_fill_ms and snapshot.synced_ms >= ledger.last_fill_ms:
        return False
    return snapshot.ts < ledger.updated_at


def check(plan: Plan, inputs: BrainInputs, policy: BrainPolicy, now: float) -> str | None:
    """A snapshot older than ``snapshot_max_age_s``, none at all, or one older than the ledger's last change
    says nothing reliable about the position now. (The service refreshes the snapshot before deciding when it
    is behind the ledger; this rule is what keeps it safe when that refresh failed.)"""
    snap = inputs.snapshot
    if snap is None or now - snap.ts > policy.snapshot_max_age_s or behind_ledger(snap, inputs.ledger):
        return reasons.STALE_SNAPSHOT
    return None
