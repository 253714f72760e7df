"""Wire schemas: one msgspec Struct per thing that crosses a process boundary.

Stream entries are flat string maps; ``to_fields`` / ``from_fields`` convert between them and the structs so
every producer writes and every consumer validates the same shape. Validation failures raise
``MalformedEntry`` with the field that is wrong, ready to be dead-lettered.
"""

from __future__ import annotations

import functools
import math
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from quantum_trader.domain.text import is_text, printable

# \Z, not $: "$" also matches before a trailing newline, and "BTCUSDT\n" is not a symbol.
Symbol = Annotated[str, Meta(pattern=r"^[A-Z0-9]{5,20}\Z")]
PlanId = Annotated[str, Meta(pattern=r"^[0-9a-f]{16}\Z")]
ShortText = Annotated[str, Meta(max_length=256)]
# The proposal id is the client's idempotency key and travels in the order's client id ("qt-" + the id), so an
# order whose every record the store lost leads back to its proposal: Binance's newClientOrderId alphabet, and
# 32 characters at most, so that "qt-" + the id stays within Binance's 36 (a UUID's 32 hex digits fit).
PROPOSAL_ID_PATTERN = r"^[A-Za-z0-9._:/\-]{1,32}\Z"
ProposalId = Annotated[str, Meta(pattern=PROPOSAL_ID_PATTERN)]
Action = Literal["FULL_CLOSE", "PARTIAL_CLOSE"]
Side = Literal["LONG", "SHORT", "NONE"]  # NONE only on SKIP plans for a symbol with no position
PlanDecision = Literal["EXECUTE", "SKIP"]
Issuer = Literal["governor", "operator", "p33", "apply"]

# The names the seed uses in its logs and `missing` field, per permit slot.
GOVERNOR_NAME = "Governor"
P33_NAME = "P3.3"

T = TypeVar("T", bound=Struct)


class MalformedEntry(ValueError):
    """An entry that does not match its schema. The message says which field and why."""


def _finite(name: str, value: Decimal | float | None) -> None:
    if value is None:
        return
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{name} must be a finite number, got {value}")
    elif not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


class Proposal(Struct, frozen=True, kw_only=True):
    """A close proposal from a strategy (``quantum:stream:harvest.proposal``)."""

    proposal_id: ProposalId
    symbol: Symbol
    action: Action
    qty: Decimal | None = None
    close_pct: Decimal | None = None
    kill_score: float | None = None
    source: ShortText = "unknown"
    created_at: float = 0.0

    def __post_init__(self) -> None:
        for name in ("qty", "close_pct", "kill_score", "created_at"):
            _finite(name, getattr(self, name))
        if self.qty is not None and self.qty < 0:
            raise ValueError(f"qty must be >= 0, got {self.qty}")
        if self.close_pct is not None and not 0 <= self.close_pct <= 100:
            raise ValueError(f"close_pct must be within 0..100, got {self.close_pct}")
        if self.action == "PARTIAL_CLOSE" and (self.qty is None) == (self.close_pct is None):
            raise ValueError("PARTIAL_CLOSE needs exactly one of qty or close_pct")


class Plan(Struct, frozen=True, kw_only=True):
    """A plan as Apply publishes it on ``quantum:stream:apply.plan``."""

    plan_id: PlanId
    proposal_id: Annotated[str, Meta(max_length=128)]
    symbol: Symbol
    side: Side
    action: Action
    qty: Decimal
    decision: PlanDecision
    reason: ShortText
    steps: Annotated[str, Meta(max_length=4096)]
    plan_hash: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
    created_at: float

    def __post_init__(self) -> None:
        _finite("qty", self.qty)
        _finite("created_at", self.created_at)
        if self.qty < 0:
            raise ValueError(f"qty must be >= 0, got {self.qty}")
        if self.decision == "EXECUTE" and (self.side == "NONE" or self.qty <= 0):
            raise ValueError("an EXECUTE plan needs a side and a positive qty")


class GovernorPermit(Struct, frozen=True, kw_only=True):
    """Permit one, ``quantum:permit:<plan_id>``: from the Governor's policy, or an operator."""

    granted: bool
    plan_id: PlanId
    plan_hash: str
    issuer: Issuer
    reason: ShortText
    created_at: float
    sig: str = ""


class P33Permit(Struct, frozen=True, kw_only=True):
    """Permit two, ``quantum:permit:p33:<plan_id>``: from the Position State Brain."""

    allow: bool
    symbol: Symbol
    # Decimal, sent as a JSON string ("0.010"): the one number that becomes an order is never a float.
    safe_close_qty: Decimal
    exchange_position_amt: Decimal
    ledger_amt: Decimal | None = None
    created_at: float
    reason: ShortText
    plan_id: PlanId
    plan_hash: str
    issuer: Issuer
    sig: str = ""

    def __post_init__(self) -> None:
        for name in ("safe_close_qty", "exchange_position_amt", "ledger_amt", "created_at"):
            _finite(name, getattr(self, name))
        if self.safe_close_qty < 0:
            raise ValueError("safe_close_qty must be >= 0")


Permit = GovernorPermit | P33Permit

AuditDecision = Literal["allow", "deny", "consumed", "rejected", "duplicate"]


class AuditEntry(Struct, frozen=True, kw_only=True):
    """One line of ``quantum:stream:permit.audit``: who decided what about which plan, when and why."""

    plan_id: str
    issuer: str
    decision: AuditDecision
    reason: str
    at: float
    latency_ms: float = 0.0
    symbol: str = ""
    subject: str = ""  # for Apply's entries: which permit slot ("governor" / "p33") it is about


class Result(Struct, frozen=True, kw_only=True):
    """The one result of a plan, ``quantum:stream:apply.result``."""

    plan_id: PlanId
    proposal_id: Annotated[str, Meta(max_length=128)] = ""  # the proposal it answers ("" only before 2026-12)
    symbol: Symbol
    side: Side
    executed: bool
    error: str = ""  # permit_timeout | permit_denied | exchange_rejected | skipped | ... ("" when executed)
    reason: ShortText = ""  # the SKIP reason, the deny reason, or the exchange's message
    denied_by: str = ""  # seed names of the issuers that denied ("Governor", "P3.3")
    missing: str = ""  # seed names of the issuers that did not answer in time, comma-separated
    order_id: str = ""
    client_order_id: str = ""
    filled_qty: Decimal = Decimal(0)
    avg_price: Decimal = Decimal(0)
    exchange_code: int = 0
    latency_ms: float = 0.0
    at: float = 0.0
    # the exchange's time of the order's last change (its fill), ms; 0 when no order or not known. P3.3 uses it
    # to tell whether a reconcile already counted the fill (domain/ledger.py).
    order_time_ms: int = 0
    adopted: bool = False  # the order was found on the exchange for a plan the store had forgotten


class Snapshot(Struct, frozen=True, kw_only=True):
    """``quantum:position:snapshot:<SYMBOL>``: the exchange's position as last polled."""

    position_amt: Decimal
    entry_price: Decimal
    mark_price: Decimal
    ts: float  # when it was last known true: the poll's request sent, or a frame of the healthy stream received
    # exchange time (ms) up to which it shows every fill: the position's last change, or a poll's request time
    # less the clock margin (0: not known; snapshots before 2026-12 lack it)
    synced_ms: int = 0


class Ledger(Struct, frozen=True, kw_only=True):
    """``quantum:position:ledger:<SYMBOL>``: P3.3's own idea of the position."""

    last_known_amt: Decimal
    updated_at: float
    source: Literal["result", "reconcile"]
    last_plan_id: str = ""
    last_result_id: str = ""  # stream id of the last result applied: makes the follower idempotent
    last_exec_at: float = 0.0  # when an executed close last changed it (P3.3 cooldown)
    # exchange time (ms) up to which the amount is the exchange's own (set when it is taken from the exchange):
    # a fill at or before it is already in it, and its result must not move it again
    synced_at_ms: int = 0
    # exchange time (ms) of the latest fill a result moved it by (0: none known): a snapshot that shows every
    # fill up to then is not behind it (domain/brain/snapshot_age.py)
    last_fill_ms: int = 0


# --- stream field conversion ------------------------------------------------------------------------------


def _field_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    if value is None:
        return ""
    return str(value)


def to_fields(obj: Struct) -> dict[str, str]:
    """A struct as a flat string map for XADD / HSET."""
    return {name: _field_text(getattr(obj, name)) for name in obj.__struct_fields__}


_BOOL_TEXT = {"true": True, "false": False, "1": True, "0": False}


@functools.cache
def _bool_fields(cls: type[Struct]) -> frozenset[str]:
    # msgspec.structs.fields resolves the annotations (ForwardRefs) on every call: a profile of P3.3 showed it
    # at ~10 % of the process's time, once per stream entry. The schema of a class does not change.
    return frozenset(f.name for f in msgspec.structs.fields(cls) if f.type is bool)


def from_fields(cls: type[T], fields: dict[str, str]) -> T:
    """Validate a flat string map (a stream entry or hash) against ``cls``.

    Empty strings mean "absent" so optional fields fall back to their defaults. Raises MalformedEntry.
    """
    data: dict[str, Any] = {}
    bool_fields = _bool_fields(cls)
    for key, value in fields.items():
        if not (is_text(key) and is_text(value)):
            raise MalformedEntry(f"{printable(key)[:40]}: not valid UTF-8")
        if value == "":
            continue
        if key in bool_fields:
            if value.lower() not in _BOOL_TEXT:
                raise MalformedEntry(f"{key}: expected true/false, got {value[:40]!r}")
            data[key] = _BOOL_TEXT[value.lower()]
        else:
            data[key] = value
    try:
        return msgspec.convert(data, cls, strict=False)
    except (msgspec.ValidationError, ValueError, TypeError) as exc:
        raise MalformedEntry(_describe(exc)) from None


MAX_ERROR_TEXT = 300  # an error quotes the bad value; a megabyte of it helps nobody and bloats the DLQ


def _describe(exc: Exception) -> str:
    text = str(exc)
    if len(text) > MAX_ERROR_TEXT:
        head, sep, where = text.rpartition(" - at `$.")
        text = (head[: MAX_ERROR_TEXT - 20] + "…" + sep + where) if sep else text[:MAX_ERROR_TEXT] + "…"
    # msgspec says "Expected `int`, got `str` - at `$.qty`"; lead with the field name instead.
    if " - at `$." in text:
        message, _, where = text.rpartition(" - at `$.")
        return f"{where.rstrip('`')}: {message}"
    return text


def decode_json(cls: type[T], raw: bytes | str) -> T:
    """Validate a JSON document (a permit) against ``cls``. Raises MalformedEntry."""
    try:
        return msgspec.json.decode(raw, type=cls)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError, TypeError) as exc:
        raise MalformedEntry(_describe(exc)) from None


def encode_json(obj: Any) -> bytes:
    return msgspec.json.encode(obj)
