"""Every reason and error code the chain can emit, with what it means and what the operator should do.

A code is defined here once and imported by the rule that emits it, so the registry cannot miss one.
``qt explain CODE`` prints an entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["allow", "skip", "deny", "error", "reject", "dead-letter"]


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    kind: Kind
    issuers: tuple[str, ...]
    meaning: str
    cause: str
    action: str


REGISTRY: dict[str, Reason] = {}


def _r(code: str, kind: Kind, issuers: str, meaning: str, cause: str, action: str) -> str:
    if code in REGISTRY:
        raise ValueError(f"reason code {code} defined twice")
    REGISTRY[code] = Reason(code, kind, tuple(issuers.split(",")), meaning, cause, action)
    return code


# --- Apply: plan decisions --------------------------------------------------------------------------------
READY = _r(
    "ready",
    "allow",
    "apply",
    "The plan is well-formed and will wait for both permits.",
    "Normal operation.",
    "Nothing.",
)
SYMBOL_NOT_ALLOWED = _r(
    "symbol_not_allowed",
    "skip",
    "apply,governor",
    "The symbol is not in the allowlist (QT_SYMBOLS, or QT_GOVERNOR__ALLOWLIST for the Governor).",
    "A strategy proposed a symbol this deployment does not manage, or the allowlist is out of date.",
    "Add the symbol to QT_SYMBOLS on every service if it should be traded, otherwise fix the strategy.",
)
BELOW_THRESHOLD = _r(
    "below_threshold",
    "skip",
    "apply",
    "The proposal's kill_score is below QT_APPLY__MIN_KILL_SCORE.",
    "The strategy's conviction was too low for this deployment's threshold.",
    "Nothing, unless the threshold is wrong.",
)
POSITION_UNAVAILABLE = _r(
    "position_unavailable",
    "skip",
    "apply",
    "Apply could not read the position from the exchange, so it cannot tell the side or size to close.",
    "The exchange (or simulator) was unreachable, rate-limited or answered with an error.",
    "Check `qt exchange check` and the Apply log; the strategy may propose again (with a new proposal_id) once "
    "the exchange answers.",
)
NO_POSITION = _r(
    "no_position",
    "skip",
    "apply,p33",
    "The exchange shows no open position for the symbol, so there is nothing to close.",
    "The position was already closed (by an earlier plan, by hand, or by liquidation).",
    "Nothing if expected. If the strategy believed a position was open, compare `qt status` with the exchange.",
)
CLOSE_QTY_ZERO = _r(
    "close_qty_zero",
    "skip",
    "apply",
    "The proposal asks to close zero (qty 0 or close_pct 0).",
    "A strategy bug, or a rounding in the strategy that reached zero.",
    "Fix the strategy; nothing is at risk.",
)
DUPLICATE_IN_FLIGHT = _r(
    "duplicate_in_flight",
    "skip",
    "apply",
    "Another plan for the same symbol is still waiting for permits or executing.",
    "A strategy re-sent a proposal, or two strategies proposed a close of the same symbol at once. Two "
    "concurrent closes of one position cannot both be right, so only the first proceeds.",
    "Nothing; the strategy may propose again (with a new proposal_id) after the first plan's result.",
)
PROPOSAL_ID_CONFLICT = _r(
    "proposal_id_conflict",
    "skip",
    "apply",
    "The proposal reuses the proposal_id of a different proposal (another symbol, action or size) seen within "
    "the idempotency window (a day). It is refused with a plan of its own; the first proposal's plan and result "
    "stand.",
    "A strategy reused an id for a new intent (an id is the idempotency key: the same id means the same "
    "proposal), or two strategies share one id space.",
    "Give every new proposal a new id (a UUID's 32 hex digits, a ULID); send the same id again only for the "
    "same proposal, as a retry.",
)
SEARCH_INCOMPLETE = _r(
    "search_incomplete",
    "skip",
    "apply",
    "The store changed instance (a restart, a failover) and Apply could not finish searching the exchange for "
    "orders it may have forgotten within a minute; a new proposal is refused rather than planned without that "
    "search (its plan's order could be among the forgotten ones: a retry after a loss must find it, not send "
    "again).",
    "The exchange's order history cannot be read for one of the symbols (errors, rate limits, a symbol it does "
    "not know), an order of ours stays open, or a plan's outcome is being resolved for a long time.",
    "Read Apply's log (`cannot search for forgotten orders`); once the search completes new proposals are planned "
    "again. Propose again with a new proposal_id.",
)
CLOCK_OUT_OF_BOUNDS = _r(
    "clock_out_of_bounds",
    "skip",
    "apply",
    "Apply's clocks are outside their bounds: its offset to the exchange clock is too uncertain "
    "(QT_APPLY__MAX_CLOCK_ERROR_MS), or another Apply host's clock differs from its own by more than "
    "QT_APPLY__MAX_HOST_CLOCK_GAP_MS. It fails closed: it plans nothing and calls no order absent until they are "
    "back, because whether an order could still execute is decided on those clocks.",
    "A host without time sync (NTP stopped, a VM resumed), a slow or failing path to the exchange's /time, or a "
    "peer Apply host with a wrong clock. `qt status` shows each host's reading.",
    "Fix the time sync of the host named in Apply's log (`clocks out of bounds`); Apply resumes by itself once "
    "the readings are within bounds again.",
)

# --- Governor (P3.2) --------------------------------------------------------------------------------------
POLICY_PASSED = _r(
    "policy_passed",
    "allow",
    "governor",
    "Every Governor policy passed.",
    "Normal operation.",
    "Nothing.",
)
OPERATOR_GRANT = _r(
    "operator_grant",
    "allow",
    "operator",
    "An operator granted the plan with `qt permit grant` (the default reason when none is given).",
    "Manual mode, or a deliberate override.",
    "Nothing.",
)
OPERATOR_DENY = _r(
    "operator_deny",
    "deny",
    "operator",
    "An operator denied the plan with `qt permit deny` (the default reason when none is given).",
    "A deliberate decision.",
    "Nothing.",
)
KILL_SWITCH_ON = _r(
    "kill_switch_on",
    "deny",
    "governor",
    "The kill switch is on: the Governor denies every plan.",
    "An operator ran `qt governor kill-switch on` (or flipped it on the dashboard).",
    "Find out why it was turned on before `qt governor kill-switch off`.",
)
GOVERNOR_COOLDOWN = _r(
    "governor_cooldown",
    "deny",
    "governor",
    "A permit for the same symbol was granted less than QT_GOVERNOR__COOLDOWN_S ago.",
    "A strategy proposing closes of one symbol faster than the cooldown allows.",
    "Nothing; propose again (with a new proposal_id) after the cooldown. Lower the cooldown only if the strategy "
    "really needs it.",
)
RATE_LIMIT_SYMBOL = _r(
    "rate_limit_symbol",
    "deny",
    "governor",
    "More than QT_GOVERNOR__MAX_PER_SYMBOL grants for this symbol within QT_GOVERNOR__RATE_WINDOW_S.",
    "A runaway strategy, or a limit set too tight.",
    "Look at the strategy first; plans over the limit are denied, not queued.",
)
RATE_LIMIT_GLOBAL = _r(
    "rate_limit_global",
    "deny",
    "governor",
    "More than QT_GOVERNOR__MAX_TOTAL grants for all symbols within QT_GOVERNOR__RATE_WINDOW_S.",
    "A burst of closes across symbols (a market event or a runaway strategy).",
    "Check the strategies; consider the kill switch if it is a runaway.",
)
MAX_NOTIONAL_EXCEEDED = _r(
    "max_notional_exceeded",
    "deny",
    "governor",
    "The close's quantity times the mark price exceeds QT_GOVERNOR__MAX_NOTIONAL_USDT.",
    "A fat-finger quantity, or a position larger than this deployment is meant to handle.",
    "Close in smaller parts (PARTIAL_CLOSE), or raise the limit deliberately.",
)
PRICE_UNAVAILABLE = _r(
    "price_unavailable",
    "deny",
    "governor",
    "No mark price newer than QT_GOVERNOR__PRICE_MAX_AGE_S, so the notional limit cannot be checked.",
    "The P3.3 snapshot poller is down or cannot reach the exchange (the Governor reads its snapshot).",
    "Check the brain (`curl :8045/metrics | grep p33_snapshot_age`) and the exchange.",
)

# --- P3.3 Position State Brain ----------------------------------------------------------------------------
SANITY_CHECKS_PASSED = _r(
    "sanity_checks_passed",
    "allow",
    "p33",
    "Snapshot fresh, ledger and exchange agree, no order in flight; safe_close_qty is in the permit.",
    "Normal operation.",
    "Nothing.",
)
SYMBOL_NOT_MANAGED = _r(
    "symbol_not_managed",
    "deny",
    "p33",
    "P3.3 keeps no snapshot or ledger for this symbol, so it cannot vouch for the close.",
    "The symbol is missing from QT_SYMBOLS on the brain while Apply allows it.",
    "Use the same QT_SYMBOLS on every service and restart the brain.",
)
STALE_SNAPSHOT = _r(
    "stale_snapshot",
    "deny",
    "p33",
    "The exchange snapshot is older than QT_BRAIN__SNAPSHOT_MAX_AGE_S (10 s).",
    "The snapshot poller cannot reach the exchange, or the brain is overloaded.",
    "Check the brain log and `p33_snapshot_age_seconds`; check the exchange with `qt exchange check`.",
)
PLAN_SIDE_MISMATCH = _r(
    "plan_side_mismatch",
    "deny",
    "p33",
    "The plan closes a LONG but the exchange shows a SHORT (or the reverse).",
    "The position flipped between the plan and the check.",
    "Nothing; a new proposal will be planned against the current position.",
)
LEDGER_MISSING = _r(
    "ledger_missing",
    "deny",
    "p33",
    "There is no readable ledger entry for the symbol.",
    "The brain has not reconciled this symbol (it was added while the brain ran), or the key was deleted or "
    "overwritten with fields that do not parse.",
    "`qt reconcile` (or restart the brain: it reconciles the ledger to the exchange on start).",
)
SIDE_MISMATCH = _r(
    "side_mismatch",
    "deny",
    "p33",
    "The ledger and the exchange disagree on the side of the position: reconcile required.",
    "An order outside this system, a liquidation, or a missed result.",
    "Find the cause in the exchange's trade history, then restart the brain to reconcile.",
)
QTY_MISMATCH = _r(
    "qty_mismatch",
    "deny",
    "p33",
    "Ledger and exchange position sizes differ by more than QT_BRAIN__QTY_TOLERANCE_PCT (1 %).",
    "A fill this system did not see (manual trade, partial liquidation, lost result).",
    "Find the cause, then restart the brain to reconcile the ledger to the exchange.",
)
ORDER_IN_FLIGHT = _r(
    "order_in_flight",
    "deny",
    "p33",
    "P3.3 already allowed another plan for this symbol and has not seen its result yet.",
    "Two plans for one symbol close together; the first may still be executing.",
    "Nothing; the block lifts when the result arrives or after QT_BRAIN__COOLDOWN_S.",
)
COOLDOWN_ACTIVE = _r(
    "cooldown_active",
    "deny",
    "p33",
    "An executed close changed this symbol less than QT_BRAIN__COOLDOWN_S (15 s) ago.",
    "The snapshot may not reflect the last fill yet.",
    "Nothing; propose again (with a new proposal_id) after the cooldown.",
)
NO_SYMBOL_FILTERS = _r(
    "no_symbol_filters",
    "deny",
    "p33",
    "The exchange's exchangeInfo has no lot-size filter for the symbol, so no safe quantity can be computed.",
    "A delisted or unknown symbol, or exchangeInfo could not be loaded.",
    "Check `qt exchange check`.",
)
QTY_ZERO_AFTER_ROUNDING = _r(
    "qty_zero_after_rounding",
    "deny",
    "p33",
    "The close quantity is zero after rounding down to the symbol's step size.",
    "A close smaller than one step (for example a tiny close_pct of a small position).",
    "Propose a larger close, or a FULL_CLOSE.",
)
BELOW_MIN_QTY = _r(
    "below_min_qty",
    "deny",
    "p33",
    "The close quantity is below the symbol's minimum order quantity.",
    "A partial close that is too small for the exchange.",
    "Propose a larger close, or a FULL_CLOSE.",
)

# --- Apply: results ---------------------------------------------------------------------------------------
SKIPPED = _r(
    "skipped",
    "error",
    "apply",
    "The plan was SKIP; no permit was awaited and no order sent. The result's reason says why.",
    "See the SKIP reason.",
    "See the SKIP reason.",
)
PERMIT_TIMEOUT = _r(
    "permit_timeout",
    "error",
    "apply",
    "Not both permits arrived within QT_APPLY__PERMIT_WAIT_MS; `missing` names the absent issuers.",
    "The missing issuer is down, lagging, or in manual mode with nobody granting.",
    "Check the missing service's health and lag; in manual mode, grant within the window.",
)
PERMIT_DENIED = _r(
    "permit_denied",
    "error",
    "apply",
    "An issuer denied the plan; `denied_by` and `reason` say who and why.",
    "See the deny reason.",
    "See the deny reason (`qt explain REASON`).",
)
EXCHANGE_REJECTED = _r(
    "exchange_rejected",
    "error",
    "apply",
    "The exchange definitively refused the order; its code and message are in the result.",
    "Quantity, reduce-only or margin rules on the exchange side.",
    "Read the exchange code in the result; no order was placed.",
)
ORDER_UNKNOWN = _r(
    "order_unknown",
    "error",
    "apply",
    "Not a result but a state: the order was sent and its outcome is not established yet (the exchange did "
    "not answer and lookups by client order id failed). The plan keeps no result until it is; Apply looks it "
    "up again every few seconds and after every restart, and holds the symbol meanwhile. Never resent.",
    "Exchange outage or network failure at the moment of sending.",
    "Watch qt_apply_unresolved_orders; check the exchange's status. It resolves by itself when the exchange "
    "answers again.",
)
EXCHANGE_BANNED = _r(
    "exchange_banned",
    "error",
    "apply",
    "The exchange banned this IP (HTTP 418) after too many requests; the order was NOT sent, and no order is "
    "sent until the ban ends.",
    "Requests beyond Binance's limits kept coming after 429s (another client on the same IP or key?).",
    "ALERT: find what hammers the API; the ban lasts minutes to days. `qt exchange check` shows it.",
)
RATE_LIMITED = _r(
    "rate_limited",
    "error",
    "apply",
    "The exchange's rate limits (request weight per minute, orders per 10 s or per minute, a 429's Retry-After) "
    "leave no room for the plan's order inside its permit window: refused when the plan is made (a SKIP plan, no "
    "permit asked for), or at the send if the room went meanwhile. The result's reason names the limit, its "
    "count, what this chain allows itself of it (80 % for orders and the lookups of their outcomes; P3.3's polls "
    "stop at 70 %, a plan's position read at 50 %), and when its window ends. No order was sent.",
    "More closes than the exchange accepts on this account or IP (Binance: 300 orders per 10 s, 1,200 per "
    "minute, 2,400 weight per minute), or another client using the same key or IP.",
    "To close anyway, propose again with a new proposal_id after the time named (the same id keeps this answer). "
    "For many, lower the Governor's rate limits (QT_GOVERNOR__MAX_TOTAL) below the exchange's, or find the other "
    "client (qt exchange check shows the used weight). The alerts QtExchangeOrderHeadroomLow and "
    "QtExchangeWeightHeadroomLow fire before refusals start.",
)
ORDER_NOT_FILLED = _r(
    "order_not_filled",
    "error",
    "apply",
    "The exchange accepted the order but filled nothing (status EXPIRED or CANCELED).",
    "No liquidity at the moment of the market order, or the position closed meanwhile.",
    "Check the position; the strategy may propose again (with a new proposal_id).",
)
ORDER_NOT_PLACED = _r(
    "order_not_placed",
    "error",
    "apply",
    "The exchange has no order with the plan's client order id, and the request can no longer land (its "
    "recvWindow has passed): nothing was traded. Typical after a crash of Apply before the exchange took the "
    "order, or a send that failed without reaching the exchange, when no resend was possible inside the window.",
    "A restart of Apply in the middle of an execution; an exchange or network failure at the moment of sending.",
    "Nothing; the strategy may propose again (with a new proposal_id: the same id is answered by this result).",
)
WINDOW_EXPIRED = _r(
    "window_expired",
    "error",
    "apply",
    "Apply was not running when the plan's permit window ended; the plan is closed without an order.",
    "An Apply restart that took longer than the permit window.",
    "Nothing; the strategy may propose again (with a new proposal_id: the same id is answered by this result).",
)
ORDER_NOT_SENT = _r(
    "order_not_sent",
    "error",
    "apply",
    "The plan's permit window closed before the order request could leave (after the waits for the clock, the "
    "filters and the rate limits); it was NOT sent. The deadline is checked right before the request is signed.",
    "A slow exchange answer before the send, rate-limit waits, or a window too short for the exchange's latency.",
    "Nothing for one; for many, lengthen QT_APPLY__PERMIT_WAIT_MS or look at the exchange latency.",
)
STORE_UNREPLICATED = _r(
    "store_unreplicated",
    "error",
    "apply",
    "Both permits were valid and consumed, but fewer store replicas than Apply's consume_replicas acknowledged "
    "the consume within consume_replicas_wait_ms (WAIT), so a failover could have forgotten it: the order was "
    "never sent.",
    "The replicas lag or are cut off from the primary (a network fault, a replica restarting, a primary about to "
    "be fenced by min-replicas-to-write).",
    "Check `qt status` (store: replicas and their lag) and the QtStoreReplicaLost alert; the strategy may propose "
    "again with a new proposal_id once the replicas are back.",
)
STORE_CHANGED = _r(
    "store_changed",
    "error",
    "apply",
    "The proposal is older than the store instance Apply now talks to (the store restarted without proof that "
    "it lost nothing, came back with older data, or failed over to a replica), so the store cannot vouch that "
    "the plan was not answered already: it is never executed now. The exchange was asked first: an order of "
    "the plan would have been its result instead; there is none, and none can still execute.",
    "A store restart or failover while the proposal waited (or while its plan waited for permits). A restart "
    "of a store stamped appendfsync always (qt store-stamp) lost nothing and refuses nothing.",
    "Nothing; the strategy may propose again with a new proposal_id (a fresh proposal is handled normally; the same "
    "id is answered by this result).",
)
DEAD_LETTERED = _r(
    "dead_lettered",
    "error",
    "apply",
    "The proposal was delivered more often than QT_MAX_DELIVERIES without being finished and went to the "
    "dead-letter stream; its plan ends here, without an order (the exchange was asked first: an order found "
    "there would be the result instead).",
    "Handling the proposal kept failing (a bug, or a service killed while handling it again and again).",
    "Read the entry with `qt audit dead-letters` and the Apply log around it.",
)
ALREADY_EXECUTED = _r(
    "already_executed",
    "error",
    "apply",
    "The atomic consume found the plan already executed or a permit changed since it was verified.",
    "Two Apply instances raced for one plan, or a permit was replaced between check and consume.",
    "Nothing; the first execution stands.",
)

# --- Apply: permit rejections (audited as `rejected`, treated as absent) ----------------------------------
MALFORMED_PERMIT = _r(
    "malformed_permit",
    "reject",
    "apply",
    "A permit key holds something that is not a valid permit document.",
    "A hand-written `redis-cli SET`, or a bug in an issuer.",
    "Use `qt permit grant|deny`; never write permit keys by hand.",
)
BAD_SIGNATURE = _r(
    "bad_signature",
    "reject",
    "apply",
    "A permit's signature does not verify with its issuer's key.",
    "A forged or tampered permit, or issuers and Apply configured with different keys.",
    "Check that every service uses the same key files; treat an unexplained one as an intrusion.",
)
PLAN_MISMATCH = _r(
    "plan_mismatch",
    "reject",
    "apply",
    "A permit names another plan_id or plan_hash than the plan it is stored for.",
    "A permit copied from another plan (replay), or a plan changed after the permit was issued.",
    "Treat as an intrusion unless explained.",
)
EXPIRED_PERMIT = _r(
    "expired_permit",
    "reject",
    "apply",
    "A permit is older than QT_PERMIT_TTL_S.",
    "A permit replayed from the past, or clocks far apart between hosts.",
    "Check clock sync (chrony/NTP) on every host.",
)
WRONG_ISSUER = _r(
    "wrong_issuer",
    "reject",
    "apply",
    "A permit in one slot claims an issuer that may not write it (e.g. `p33` in the Governor slot).",
    "A forged permit, or a misconfigured issuer.",
    "Treat as an intrusion unless explained.",
)

# --- Dead letters -----------------------------------------------------------------------------------------
MALFORMED_ENTRY = _r(
    "malformed_entry",
    "dead-letter",
    "apply,governor,p33",
    "A stream entry did not match its schema; it was moved to the dead-letter stream with the error.",
    "A producer writing the wrong shape (missing field, bad number, unknown action, bad plan_id).",
    "Read the entry in the *.dlq stream; fix its producer.",
)
PLAN_HASH_MISMATCH = _r(
    "plan_hash_mismatch",
    "dead-letter",
    "governor,p33",
    "A plan's plan_hash does not match its fields.",
    "A plan altered after Apply published it, or written by something other than Apply.",
    "Treat as an intrusion unless explained.",
)


def explain(code: str) -> Reason | None:
    return REGISTRY.get(code)


def markdown() -> str:
    """docs/deny-reasons.md, generated from the registry (``make docs``; a test keeps them equal)."""
    lines = [
        "# Reason and error codes",
        "",
        "Generated from `src/quantum_trader/domain/reasons.py` by `make docs`; do not edit by hand.",
        "`qt explain CODE` prints one entry.",
        "",
    ]
    titles = {
        "allow": "Allow reasons",
        "skip": "SKIP reasons (Apply publishes the plan as SKIP; no permit is awaited)",
        "deny": "Deny reasons (a permit with allow/granted false)",
        "error": "Result errors (`error` in quantum:stream:apply.result)",
        "reject": "Permit rejections (Apply audits `rejected` and treats the permit as absent)",
        "dead-letter": "Dead-letter reasons",
    }
    for kind, title in titles.items():
        header = "| code | issued by | meaning | likely cause | what to do |"
        lines += [f"## {title}", "", header, "|---|---|---|---|---|"]
        for entry in REGISTRY.values():
            if entry.kind == kind:
                issuers = ", ".join(entry.issuers)
                lines.append(f"| `{entry.code}` | {issuers} | {entry.meaning} | {entry.cause} | {entry.action} |")
        lines.append("")
    return "\n".join(lines)
