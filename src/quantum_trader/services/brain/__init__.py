"""P3.3 Position State Brain: permit two, from the exchange snapshot and the ledger.

Three loops, started only after the ledger has been reconciled to the exchange (until then nothing is issued):
- plans (service.py): consumer group ``p33`` on the plan stream (XREADGROUP BLOCK 1000); decide with the pure
  ``domain.brain.decide`` over what inputs.py reads; permit + audit + order-in-flight marker + ack in one
  atomic script (bus/permit_writes.py);
- snapshots (snapshots.py): poll the exchange every ``snapshot_interval_s`` and whenever asked (a fill, a plan
  whose ledger is newer than its snapshot), reconcile and adopt outside growth;
- ledger (follower.py, ledger.py): follow the result stream (own group); executed fills move ``last_known_amt``.
"""

from quantum_trader.services.brain.service import BrainService

__all__ = ["BrainService"]
