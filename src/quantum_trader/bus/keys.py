"""Every Redis key and stream name the system uses, in one place.

Public names (first block) are the outside contract in DESIGN.md: operators type them into redis-cli and
dashboards read them. Internal names (second block) are ours; they all live under ``quantum:`` so one ACL
pattern covers the system.
"""

from __future__ import annotations

# --- contract (DESIGN.md) ---------------------------------------------------------------------------------
PROPOSAL_STREAM = "quantum:stream:harvest.proposal"
PLAN_STREAM = "quantum:stream:apply.plan"
PLAN_DLQ = "quantum:stream:apply.plan.dlq"
AUDIT_STREAM = "quantum:stream:permit.audit"
RESULT_STREAM = "quantum:stream:apply.result"

P33_GROUP = "p33"  # the seed's consumer group name; operators grep for it


def governor_permit(plan_id: str) -> str:
    return f"quantum:permit:{plan_id}"


def p33_permit(plan_id: str) -> str:
    return f"quantum:permit:p33:{plan_id}"


def ledger(symbol: str) -> str:
    return f"quantum:position:ledger:{symbol}"


def snapshot(symbol: str) -> str:
    return f"quantum:position:snapshot:{symbol}"


# --- internal ---------------------------------------------------------------------------------------------
PROPOSAL_DLQ = "quantum:stream:harvest.proposal.dlq"
RESULT_DLQ = "quantum:stream:apply.result.dlq"
AUDIT_DLQ = "quantum:stream:permit.audit.dlq"  # unreadable audit lines (Apply reads that stream without a group)
DEAD_LETTER_STREAMS = (PLAN_DLQ, PROPOSAL_DLQ, RESULT_DLQ, AUDIT_DLQ)
LEDGER_AUDIT_STREAM = "quantum:stream:ledger.audit"

APPLY_GROUP = "apply"
GOVERNOR_GROUP = "governor"
LEDGER_GROUP = "p33-ledger"  # P3.3's ledger follower on the result stream

SERVICE_EVENTS_STREAM = "quantum:stream:service.events"  # each service's starts and clean stops (qt report)
SERVICE_EVENTS_MAXLEN = 100_000
OPS_AUDIT_STREAM = "quantum:stream:ops.audit"  # operator actions: kill switch, Governor mode, reconcile requests
OPS_AUDIT_MAXLEN = 100_000  # a few actions a day: years of them
RECONCILE_REQUEST = "quantum:p33:reconcile_request"  # set by `qt brain reconcile`; the brain reconciles, deletes

KILL_SWITCH = "quantum:governor:kill_switch"  # "1" = on; read by every Governor instance on every decision
GOVERNOR_MODE = "quantum:governor:mode"  # "auto" | "manual"; overrides the configured default while set
GOVERNOR_GRANTS = "quantum:governor:grants"  # zset plan_id -> grant time, for the overall rate limit


def health(service: str, consumer: str) -> str:
    """Heartbeat hash of one running service instance (pid, ready, started_at, updated_at); expires if silent."""
    return f"quantum:health:{service}:{consumer}"


HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TTL_S = 10  # five missed beats: long enough for a GC pause, short enough to notice a dead service


def governor_symbol_grants(symbol: str) -> str:
    return f"quantum:governor:grants:{symbol}"


def decision_claim(issuer: str, plan_id: str) -> str:
    """First decision wins: an issuer claims a plan with SET NX before it writes a permit."""
    return f"quantum:decided:{issuer}:{plan_id}"


def dead_letter_guard(stream: str, entry_id: str) -> str:
    """Set by the first reader that dead-letters an entry of a stream read without a group (one letter each)."""
    return f"quantum:apply:dead-lettered:{stream}:{entry_id}"


def plan_record(plan_id: str) -> str:
    """The plan as Apply published it, kept so `qt permit`, recovery and audit can find it by id."""
    return f"quantum:plan:{plan_id}"


def executed_marker(plan_id: str) -> str:
    """Set by the same atomic step that consumes both permits: a plan can be executed once, ever."""
    return f"quantum:apply:executed:{plan_id}"


# The store instance Apply talks to (domain/trust.py): run_id, replid, the proposal stream's last id when the
# instance was first used (floor) and when (since). Proposals after the floor are trusted to the store's word.
STORE_EPOCH = "quantum:apply:store_epoch"

# zset plan_id -> time its permits were consumed; removed with its result. An entry left behind is an order
# whose outcome is not yet established: Apply resolves it (at start, and every few seconds) by client order id.
APPLY_INTENTS = "quantum:apply:intents"


# Each Apply's reading of the exchange clock (domain/clocks.py encode: offset|error|measured_at|published_at),
# one key per consumer that expires when it stops publishing (the store's clock decides, not the hosts'), and
# the set of consumers that ever published one (for the others to read them; a member whose key is gone left).
APPLY_CLOCK_HOSTS = "quantum:apply:clock_hosts"
CLOCK_READING_TTL_S = 10  # five missed publications: the host stopped, its reading is not compared any more


def apply_clock(consumer: str) -> str:
    return f"quantum:apply:clock:{consumer}"


def result_marker(plan_id: str) -> str:
    """Set in the same transaction that publishes the plan's result: exactly one result per plan."""
    return f"quantum:apply:result:{plan_id}"


def symbol_in_flight(symbol: str) -> str:
    """Held by Apply while a plan for the symbol waits or executes; a second plan is SKIPped."""
    return f"quantum:apply:inflight:{symbol}"


def ledger_applied(symbol: str) -> str:
    """zset of result stream ids already in the symbol's ledger: each result counts once, in any order."""
    return f"quantum:p33:applied:{symbol}"


def p33_symbol_in_flight(symbol: str) -> str:
    """Held by P3.3 between its allow and the plan's result: no second allow for the symbol meanwhile."""
    return f"quantum:p33:inflight:{symbol}"


def p33_drift_seen(symbol: str, transaction_ms: int, event_ms: int) -> str:
    """Claimed by the P3.3 instance that records a pushed position change as drift: one line per change for
    the account, however many instances follow the stream."""
    return f"quantum:p33:drift:{symbol}:{transaction_ms}:{event_ms}"


def p33_result_seen(plan_id: str) -> str:
    """Set when P3.3's ledger follower has seen the plan's result: an allow decided after that (the Governor
    denied first and the result went by) sets no in-flight mark, as no result would ever release it."""
    return f"quantum:p33:seen:{plan_id}"


# How long the per-plan bookkeeping lives. A day is far beyond any permit window (60 s) and any restart,
# so a redelivered proposal always finds its plan's markers, yet the store does not grow without bound.
PLAN_BOOKKEEPING_TTL_S = 24 * 3600
