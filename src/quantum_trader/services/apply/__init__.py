"""Apply (P3): proposals become plans; a plan with both permits becomes exactly one reduce-only order.

Per proposal (each in its own task, at most ``max_in_flight`` at once: service.py), in handler.py:
1. validate it (bad → dead letter), derive the plan id from the stream entry (a redelivery finds its plan);
2. if the store cannot vouch for the plan (its proposal is older than the store instance: domain/trust.py),
   ask the exchange first: an order found with the plan's client id is the plan's outcome;
3. plan it against the exchange position and publish the plan;
4. wait for both permits, woken by the shared audit reader, bounded by ``permit_wait_ms``;
5. verify both, consume both and mark the plan executed in one atomic step, send one order;
6. publish the one result and acknowledge the proposal in one atomic step.
A restart at any point resumes from the markers of steps 3, 5 and 6 and never repeats an order; a store that
forgot them is caught by step 2 (and checked again before the send and before a not-executed result).

The parts, one file each: permits.py (steps 4 and 5: the wait and the consume), truth.py (step 2, and the
checks before a send or a result: what the exchange says), orders.py (step 5: the send and its outcome),
results.py (step 6), sweep.py (orders whose outcome is unknown, orders the store forgot), plan_run.py (a plan
being handled, and its markers), permit_waiter.py (the shared audit reader) and position_reads.py (shared
position reads for planning).
"""

from quantum_trader.services.apply.service import ApplyService

__all__ = ["ApplyService"]
