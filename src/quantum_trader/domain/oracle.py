"""An independent oracle for the promises, over plain data (no store, no exchange, no system code paths).

The tests and ``qt chaos`` judge a run with it from what they saw themselves: the simulator's own list of
orders, the audit lines and results as they appeared, the plan entries, and the two issuers' HMAC keys. It
does not trust the system's decisions (``allow`` / ``consumed`` lines saying so); it checks the evidence:

* every order's plan (clientOrderId ``qt-<plan_id>``) has both permits Apply consumed, copied byte for byte
  into its two ``consumed`` audit lines (field ``permit``), and the oracle verifies them itself: JSON, issuer
  for the slot, an allow, the HMAC recomputed here with the issuer's key, plan id, plan hash equal to a
  published EXECUTE plan of that id whose hash matches its fields, the symbol, and (optionally) freshness;
* the order's executed quantity is at most the P3.3 permit's ``safe_close_qty``; symbol and side are the plan's;
* one order per client order id;
* exactly one result per plan that must have one, and each plan's last result agrees with the exchange
  (executed ⇔ its order filled, with the same quantity).

The canonical form is the one documented in domain/permits.py (HMAC-SHA256 over the JSON without ``sig``,
keys sorted, compact) and domain/planning.py (SHA-256 over the plan's fields without ``plan_hash``); both are
recomputed here with hmac/hashlib, so a bug in the system's own verification is caught, not repeated.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from quantum_trader.domain.models import Plan

ORDERS_WITHOUT_VERIFIED_PERMITS = "orders_without_verified_permits"
QTY_ABOVE_SAFE_CLOSE = "qty_above_safe_close"
ORDERS_UNLIKE_PLAN = "orders_unlike_plan"
DUPLICATE_ORDERS = "duplicate_orders"
PLANS_WITHOUT_ONE_RESULT = "plans_without_one_result"
RESULTS_DISAGREEING = "results_disagreeing"
KINDS = (
    ORDERS_WITHOUT_VERIFIED_PERMITS,
    QTY_ABOVE_SAFE_CLOSE,
    ORDERS_UNLIKE_PLAN,
    DUPLICATE_ORDERS,
    PLANS_WITHOUT_ONE_RESULT,
    RESULTS_DISAGREEING,
)
MAX_EXAMPLES = 10

_SLOT_ISSUERS = {"governor": frozenset({"governor", "operator"}), "p33": frozenset({"p33"})}
_SLOT_GRANT = {"governor": "granted", "p33": "allow"}
# Our client order ids: "qt-" + the proposal id (Binance's alphabet, at most 32 characters); the plan of a
# proposal id is the first 16 hex digits of SHA-256 over "plan|" + the id (derived here again on purpose).
_COID = re.compile(r"qt-([A-Za-z0-9._:/\-]{1,32})\Z")
_PLAN_FIELDS = tuple(Plan.__struct_fields__)  # the wire schema; the hash covers all of them but plan_hash
_CLOSING_SIDE = {"LONG": "SELL", "SHORT": "BUY"}


@dataclass(frozen=True, slots=True)
class IssuerKeys:
    """The HMAC keys: the Governor slot is signed with ``governor`` (Governor or operator), P3.3's with ``p33``."""

    governor: bytes
    p33: bytes

    def of(self, slot: str) -> bytes:
        return self.governor if slot == "governor" else self.p33


@dataclass
class Findings:
    """Named counts of what the oracle found wrong (all kinds present, zero when clean), with examples."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    examples: dict[str, list[str]] = field(default_factory=dict)
    orders_checked: int = 0
    orders_verified: int = 0  # orders whose two permits the oracle verified (the checks did bite)
    plans_checked: int = 0  # plans whose results were checked

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < MAX_EXAMPLES:
            shown.append(example)

    def merge(self, other: Findings) -> Findings:
        for kind, n in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
        for kind, shown in other.examples.items():
            mine = self.examples.setdefault(kind, [])
            mine += shown[: MAX_EXAMPLES - len(mine)]
        self.orders_checked += other.orders_checked
        self.orders_verified += other.orders_verified
        self.plans_checked += other.plans_checked
        return self

    @property
    def broken(self) -> dict[str, int]:
        return {kind: n for kind, n in self.counts.items() if n}

    @property
    def ok(self) -> bool:
        return not self.broken

    def describe(self) -> str:
        return "; ".join(f"{kind}={n}: {self.examples.get(kind, [])}" for kind, n in self.broken.items())


def _canonical(doc: Mapping[str, Any], without: str) -> bytes:
    return msgspec.json.encode({k: v for k, v in doc.items() if k != without}, order="sorted")


def plan_hash_of(entry: Mapping[str, str]) -> str:
    """The hash a plan entry (stream fields or record) must carry: SHA-256 over its fields but plan_hash."""
    body = {name: entry.get(name, "") for name in _PLAN_FIELDS if name != "plan_hash"}
    return hashlib.sha256(_canonical(body, "plan_hash")).hexdigest()


def plan_of_order(client_order_id: str) -> str | None:
    """The plan id an order of ours belongs to, from its client order id; None for anyone else's order."""
    match = _COID.match(client_order_id)
    if match is None:
        return None
    return hashlib.sha256(f"plan|{match.group(1)}".encode()).hexdigest()[:16]


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def verify_permit(
    slot: str,
    raw: str | bytes,
    plan_id: str,
    plan_hashes: frozenset[str],
    key: bytes,
    *,
    symbol: str = "",
    consumed_at: float | None = None,
    ttl_s: float | None = None,
) -> tuple[dict[str, Any] | None, str]:
    """The permit document if it is a valid allow for ``plan_id`` in ``slot``, else (None, why not)."""
    try:
        doc = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None, "not JSON"
    if not isinstance(doc, dict):
        return None, "not a JSON object"
    sig = doc.get("sig")
    if not isinstance(sig, str) or not sig:
        return None, "unsigned"
    expected = hmac.new(key, _canonical(doc, "sig"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(sig.encode(), expected.encode()):
        return None, "bad MAC"
    if doc.get("issuer") not in _SLOT_ISSUERS[slot]:
        return None, f"issuer {doc.get('issuer')!r} in the {slot} slot"
    if doc.get(_SLOT_GRANT[slot]) is not True:
        return None, "not an allow"
    if doc.get("plan_id") != plan_id:
        return None, f"for plan {doc.get('plan_id')!r}"
    if doc.get("plan_hash") not in plan_hashes:
        return None, "plan hash of no published plan"
    if slot == "p33":
        if symbol and doc.get("symbol") != symbol:
            return None, f"for symbol {doc.get('symbol')!r}"
        safe = _decimal(doc.get("safe_close_qty"))
        if safe is None or safe < 0:
            return None, "no safe_close_qty"
    if ttl_s is not None and consumed_at is not None:
        created = doc.get("created_at")
        if not isinstance(created, int | float) or isinstance(created, bool) or abs(consumed_at - created) > ttl_s:
            return None, "expired when consumed"
    return doc, ""


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def check_orders(
    orders: Iterable[Mapping[str, Any]],
    audit: Iterable[Mapping[str, str]],
    plans: Iterable[Mapping[str, str]],
    keys: IssuerKeys,
    *,
    ttl_s: float | None = None,
) -> Findings:
    """Every order: one per client order id, two verified permits consumed for its plan, a quantity within the
    P3.3 permit's safe close, the plan's symbol and side. ``plans`` are plan stream entries or records (a plan
    published again after a store loss may appear with two hashes: either may be the permits')."""
    found = Findings()
    published: dict[str, list[Mapping[str, str]]] = defaultdict(list)
    for entry in plans:
        if entry.get("decision") == "EXECUTE" and entry.get("plan_hash") == plan_hash_of(entry):
            published[entry.get("plan_id", "")].append(entry)
    consumed: dict[str, dict[str, list[tuple[str, float | None]]]] = defaultdict(lambda: defaultdict(list))
    for line in audit:
        if line.get("issuer") == "apply" and line.get("decision") == "consumed" and line.get("permit"):
            slot = line.get("subject") or line.get("reason", "")
            consumed[line.get("plan_id", "")][slot].append((_text(line["permit"]), _float(line.get("at"))))
    by_coid: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for order in orders:
        by_coid[str(order.get("clientOrderId", ""))].append(order)
    for coid, placed in by_coid.items():
        found.orders_checked += len(placed)
        if len(placed) > 1:
            found.add(DUPLICATE_ORDERS, f"{coid}: {len(placed)} orders")
        plan_id = plan_of_order(coid)
        if plan_id is None:
            found.add(ORDERS_WITHOUT_VERIFIED_PERMITS, f"{coid}: not a plan's client order id")
            continue
        proposal_id = coid.removeprefix("qt-")
        entries = [e for e in published.get(plan_id, []) if e.get("proposal_id") == proposal_id]
        hashes = frozenset(e["plan_hash"] for e in entries)
        symbols = {e.get("symbol", "") for e in entries}
        for order in placed:
            symbol = str(order.get("symbol", ""))
            why = _unverified(plan_id, symbol, entries, consumed.get(plan_id, {}), hashes, keys, ttl_s)
            if isinstance(why, str):
                found.add(ORDERS_WITHOUT_VERIFIED_PERMITS, f"{coid}: {why}")
                continue
            found.orders_verified += 1
            governor, p33s = why
            executed = _decimal(order.get("executedQty")) or Decimal(0)
            safe = max(_decimal(p.get("safe_close_qty")) or Decimal(0) for p in p33s)
            if executed > safe:
                found.add(QTY_ABOVE_SAFE_CLOSE, f"{coid}: executed {executed} > safe_close_qty {safe}")
            sides = {_CLOSING_SIDE.get(e.get("side", "")) for e in entries if e["plan_hash"] == governor["plan_hash"]}
            if symbol not in symbols or order.get("side") not in sides:
                found.add(ORDERS_UNLIKE_PLAN, f"{coid}: {order.get('side')} {symbol}, plan {sorted(symbols)}")
    return found


def _unverified(
    plan_id: str,
    symbol: str,
    entries: Sequence[Mapping[str, str]],
    consumed: Mapping[str, list[tuple[str, float | None]]],
    hashes: frozenset[str],
    keys: IssuerKeys,
    ttl_s: float | None,
) -> str | tuple[dict[str, Any], list[dict[str, Any]]]:
    """Why the plan's order lacks two verified permits; or the verified Governor permit and the P3.3 permits
    of the same plan hash (a plan consumed again after a store loss has more than one pair)."""
    if not entries:
        return "no published EXECUTE plan of its proposal id with a valid hash"
    verified: dict[str, list[dict[str, Any]]] = {"governor": [], "p33": []}
    reasons: list[str] = []
    for slot in ("governor", "p33"):
        lines = consumed.get(slot, [])
        if not lines:
            reasons.append(f"no consumed {slot} permit")
        for raw, at in lines:
            doc, why = verify_permit(
                slot, raw, plan_id, hashes, keys.of(slot), symbol=symbol, consumed_at=at, ttl_s=ttl_s
            )
            if doc is None:
                reasons.append(f"{slot} permit: {why}")
            else:
                verified[slot].append(doc)
    for governor in verified["governor"]:
        p33s = [p for p in verified["p33"] if p.get("plan_hash") == governor.get("plan_hash")]
        if p33s:
            return governor, p33s
    if verified["governor"] and verified["p33"]:
        reasons.append("the two permits name different plan hashes")
    return ", ".join(reasons) or "no verified pair"


def check_results(
    orders: Iterable[Mapping[str, Any]],
    results: Iterable[Mapping[str, str]],
    expected: Iterable[str],
) -> Findings:
    """``results`` (in stream order) are the ones the store holds: each plan in ``expected``, and each plan with
    an order, has exactly one, and its last result agrees with the exchange (executed ⇔ its order filled, the
    filled quantity equal to the exchange's)."""
    found = Findings()
    filled: dict[str, Decimal] = defaultdict(Decimal)
    for order in orders:
        plan_id = plan_of_order(str(order.get("clientOrderId", "")))
        if plan_id is not None:
            filled[plan_id] += _decimal(order.get("executedQty")) or Decimal(0)
    per_plan: dict[str, list[Mapping[str, str]]] = defaultdict(list)
    for result in results:
        per_plan[result.get("plan_id", "")].append(result)
    plans = dict.fromkeys([*expected, *filled])  # ordered, unique
    counted = Counter({p: len(per_plan.get(p, ())) for p in plans})
    for plan_id in plans:
        found.plans_checked += 1
        if counted[plan_id] != 1:
            found.add(PLANS_WITHOUT_ONE_RESULT, f"{plan_id}: {counted[plan_id]} results")
        if not per_plan.get(plan_id):
            continue
        last = per_plan[plan_id][-1]
        exchange = filled.get(plan_id, Decimal(0))
        if last.get("executed") == "true":
            said = _decimal(last.get("filled_qty"))
            agrees = exchange > 0 and said == exchange
        else:
            agrees = exchange == 0
        if not agrees:
            found.add(
                RESULTS_DISAGREEING,
                f"{plan_id}: executed={last.get('executed')} filled_qty={last.get('filled_qty')}, exchange {exchange}",
            )
    return found


def check(
    orders: Sequence[Mapping[str, Any]],
    audit: Iterable[Mapping[str, str]],
    plans: Iterable[Mapping[str, str]],
    results: Iterable[Mapping[str, str]],
    keys: IssuerKeys,
    *,
    expected: Iterable[str] = (),
    ttl_s: float | None = None,
) -> Findings:
    """Both halves: :func:`check_orders` and :func:`check_results`."""
    return check_orders(orders, audit, plans, keys, ttl_s=ttl_s).merge(check_results(orders, results, expected))
