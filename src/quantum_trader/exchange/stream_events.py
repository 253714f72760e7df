"""The user-data and mark price events the chain reads from Binance's WebSocket, as one schema each (msgspec),
validated where they arrive.

Only the fields the chain uses are declared; Binance adds fields over time and msgspec ignores the rest. A
frame that is not an event of these kinds (a subscription reply, an event type we do not follow) decodes to
``None``; one that claims a known type but breaks its schema, or is not UTF-8 JSON at all, raises
``BadStreamEvent`` with what and where, so the component can audit it and go on (it never stops the stream).
Frames of the combined form (``{"stream": …, "data": {…}}``) are unwrapped.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

import msgspec

MAX_FRAME: Final = 1 << 20  # one event is a few hundred bytes; a megabyte is not an event of ours


class BadStreamEvent(ValueError):
    """A frame that cannot be one of the events the chain follows; the message says what and where."""


class OrderUpdate(msgspec.Struct, frozen=True):
    """``ORDER_TRADE_UPDATE.o``: one change of one order (Binance's one-letter names)."""

    s: str  # symbol
    c: str  # client order id: qt-<plan_id> for ours; autoclose-… / adl_autoclose for the exchange's own
    S: str  # side
    i: int  # order id
    x: str  # execution type: NEW, TRADE, CANCELED, EXPIRED, CALCULATED (liquidation), AMENDMENT
    X: str  # order status after this change
    z: Decimal  # cumulative filled quantity
    ap: Decimal  # average price
    T: int  # the order's transaction time
    l: Decimal = Decimal(0)  # noqa: E741 (Binance's name) last filled quantity
    L: Decimal = Decimal(0)  # last filled price
    t: int = 0  # trade id (0: not a trade)
    R: bool = False  # reduce-only
    ps: str = "BOTH"


class OrderTradeUpdate(msgspec.Struct, frozen=True, tag_field="e", tag="ORDER_TRADE_UPDATE"):
    E: int  # event time
    T: int  # transaction time
    o: OrderUpdate


class PositionUpdate(msgspec.Struct, frozen=True):
    """One position in ``ACCOUNT_UPDATE.a.P``: only the symbols that changed are listed."""

    s: str
    pa: Decimal  # signed amount (negative: short)
    ep: Decimal  # entry price
    ps: str = "BOTH"


class AccountChange(msgspec.Struct, frozen=True):
    m: str  # why: ORDER, FUNDING_FEE, ADJUSTMENT, INSURANCE_CLEAR, ...
    P: list[PositionUpdate] = msgspec.field(default_factory=list)


class AccountUpdate(msgspec.Struct, frozen=True, tag_field="e", tag="ACCOUNT_UPDATE"):
    E: int
    T: int
    a: AccountChange


class ListenKeyExpired(msgspec.Struct, frozen=True, tag_field="e", tag="listenKeyExpired"):
    E: int
    listenKey: str = ""  # noqa: N815 (Binance's name)


class MarkPriceUpdate(msgspec.Struct, frozen=True, tag_field="e", tag="markPriceUpdate"):
    E: int
    s: str
    p: Decimal  # the mark price


StreamEvent = OrderTradeUpdate | AccountUpdate | ListenKeyExpired | MarkPriceUpdate
KNOWN: Final = frozenset({"ORDER_TRADE_UPDATE", "ACCOUNT_UPDATE", "listenKeyExpired", "markPriceUpdate"})

_any = msgspec.json.Decoder()


def decode_event(frame: str | bytes) -> StreamEvent | None:
    """The event in one WebSocket frame; None for a frame that is not one the chain follows. BadStreamEvent for
    bytes that are not UTF-8 JSON, or a known event that breaks its schema (the message quotes the error's
    place, never the whole frame)."""
    raw = frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame
    if len(raw) > MAX_FRAME:
        raise BadStreamEvent(f"a frame of {len(raw)} bytes (the largest taken is {MAX_FRAME})")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadStreamEvent(f"not UTF-8 at byte {exc.start}") from None
    try:
        body = _any.decode(raw)
    except msgspec.DecodeError as exc:
        raise BadStreamEvent(f"not JSON: {exc}") from None
    if isinstance(body, dict) and isinstance(body.get("data"), dict) and "stream" in body:
        body = body["data"]  # the combined form
    if not isinstance(body, dict) or body.get("e") not in KNOWN:
        return None  # a subscription reply, an event type we do not follow
    try:
        event: StreamEvent = msgspec.convert(body, StreamEvent, strict=False)
    except msgspec.ValidationError as exc:
        raise BadStreamEvent(f"{body['e']}: {exc}") from None
    return event
