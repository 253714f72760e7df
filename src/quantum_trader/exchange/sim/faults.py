"""Fault injection for the simulated exchange: rules that make matching requests misbehave, and the answers
(``apply_fault``) they produce, Binance's rate-limit and ban messages among them.

A rule is posted as JSON to ``POST /_sim/faults``::

    {"kind": "timeout_after_fill", "path": "/fapi/v1/order", "method": "POST", "count": 1, "ms": 30000}

``path`` (exact) and ``method`` narrow the requests it hits (default: every ``/fapi`` request); ``count`` is how
many matching requests it hits (``null``: until ``DELETE /_sim/faults``). The first matching rule with hits
left wins. Kinds and their fields:

=====================  =====================================================================================
latency                ``ms``; then normal processing. The gateway checked the request at receipt, so past
                       ``timestamp + recvWindow`` an order request is refused by the matching engine (-5028).
timeout_after_fill     the request IS processed (the order executes), then the answer is held ``ms``
                       (default 30000) so the client times out not knowing the outcome.
timeout_before_fill    hold ``ms`` (default 30000), then HTTP 503 -1001; nothing executed.
http_5xx               ``status`` 500/502/503 (default 503); nothing executed. 502 has a non-JSON body, as a
                       gateway's would.
http_429 / http_418    Binance's rate-limit / IP-ban answer with ``Retry-After`` (``retry_after`` seconds).
error_code             ``code`` with Binance's message (``msg`` overrides) and HTTP status: -1007 -> 408,
                       -1000/-1006 -> 500, -1001/-1008 -> 503, -1003 -> 429, -2015 -> 401, others 400.
                       ``executed: true`` processes the request first, allowed only for the codes whose
                       execution status Binance calls unknown (-1000, -1006, -1007).
partial_fill           ``fraction`` (0..1): a MARKET order executes that share rounded down to the step and
                       ends EXPIRED with the partial executedQty.
bad_json               HTTP 200 with a truncated JSON body; ``executed`` (default true) chooses whether the
                       request was processed.
missing_fields         HTTP 200 JSON without ``fields`` (default: status, executedQty, cumQty, cumQuote,
                       avgPrice, updateTime; in a list reply, from every row); ``executed`` (default true) as
                       above, otherwise only the echoed request fields are returned.
late_execution         the request passes the gateway (checked at receipt) and is answered at once with an
                       "execution status unknown" ``answer``; the matching engine executes it ``ms`` (default
                       2000) later in the background, unless ``timestamp + recvWindow`` has passed by then
                       (-5028: nothing executes). ``answer``: "-1007" (HTTP 408, default), "-1000" / "-1006"
                       (HTTP 500), "timeout" (held ``hold_ms``, default 30000, then 503 -1001), "503_html" (a
                       gateway's HTML 503), "empty" (HTTP 200, empty body). Each outcome is listed by
                       ``GET /_sim/late``; reset cancels the pending ones.
=====================  =====================================================================================
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import msgspec

Json = dict[str, Any]

KINDS: Final = (
    "latency",
    "timeout_after_fill",
    "timeout_before_fill",
    "http_5xx",
    "http_429",
    "http_418",
    "error_code",
    "partial_fill",
    "bad_json",
    "missing_fields",
    "late_execution",
)
DEFAULT_TIMEOUT_MS: Final = 30_000
DEFAULT_LATE_MS: Final = 2000
LATE_ANSWERS: Final = ("-1007", "-1000", "-1006", "timeout", "503_html", "empty")
DEFAULT_DROPPED_FIELDS: Final = ("status", "executedQty", "cumQty", "cumQuote", "avgPrice", "updateTime")
# Codes whose execution status Binance documents as unknown: only these may carry ``executed: true``.
UNKNOWN_OUTCOME_CODES: Final = frozenset({-1000, -1006, -1007})

# Binance's messages and HTTP statuses for the codes a rule may name.
ERROR_CODES: Final[dict[int, tuple[int, str]]] = {
    -1000: (500, "An unknown error occured while processing the request."),
    -1001: (503, "Internal error; unable to process your request. Please try again."),
    -1003: (429, "Too many requests queued."),
    -1006: (500, "An unexpected response was received from the message bus. Execution status unknown."),
    -1007: (408, "Timeout waiting for response from backend server. Send status unknown; execution status unknown."),
    -1008: (503, "Server is currently overloaded with other requests. Please try again in a few minutes."),
    -1015: (429, "Too many new orders."),
    -1021: (400, "Timestamp for this request is outside of the recvWindow."),
    -1022: (400, "Signature for this request is not valid."),
    -2010: (400, "NEW_ORDER_REJECTED"),
    -2011: (400, "Unknown order sent."),
    -2013: (400, "Order does not exist."),
    -2015: (401, "Invalid API-key, IP, or permissions for action."),
    -2019: (400, "Margin is insufficient."),
    -2022: (400, "ReduceOnly Order is rejected."),
    -1111: (400, "Precision is over the maximum defined for this asset."),
    -4003: (400, "Quantity less than or equal to zero."),
    -4164: (400, "Order's notional must be no smaller than 5 (unless you choose reduce only)."),
    -4116: (400, "ClientOrderId is duplicated."),
    -4118: (400, "ReduceOnly Order Failed. Please check your existing position and open orders."),
    -5028: (400, "Timestamp for this request is outside of the ME recvWindow."),
}
GATEWAY_503_HTML: Final = b"<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>"
HTTP_5XX_BODIES: Final[dict[int, tuple[int, str]]] = {
    500: (-1000, "An unknown error occured while processing the request."),
    503: (-1001, "Internal error; unable to process your request. Please try again."),
}


class FaultError(ValueError):
    """A rule that cannot be accepted (answered 400 by the admin API)."""


def _int(data: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FaultError(f"{name} must be an integer")
    return value


@dataclass(slots=True)
class FaultRule:
    kind: str
    path: str | None = None
    method: str | None = None
    count: int | None = 1
    ms: int | None = None
    status: int | None = None
    code: int | None = None
    msg: str | None = None
    executed: bool | None = None
    fraction: str | None = None
    retry_after: int | None = None
    fields: list[str] | None = None
    answer: str | None = None
    hold_ms: int | None = None
    hits: int = 0

    @classmethod
    def from_json(cls, data: Any) -> FaultRule:
        if not isinstance(data, dict):
            raise FaultError("a fault rule is a JSON object")
        unknown = set(data) - {f for f in cls.__slots__ if f != "hits"}
        if unknown:
            raise FaultError(f"unknown fields: {sorted(unknown)}")
        kind = data.get("kind")
        if kind not in KINDS:
            raise FaultError(f"kind must be one of {', '.join(KINDS)}")
        rule = cls(kind=kind, count=_int(data, "count", 1), ms=_int(data, "ms"), retry_after=_int(data, "retry_after"))
        rule.hold_ms = _int(data, "hold_ms")
        rule.answer = _optional_str(data, "answer")
        rule.path = _optional_str(data, "path")
        method = _optional_str(data, "method")
        rule.method = method.upper() if method else None
        rule.msg = _optional_str(data, "msg")
        if rule.count is not None and rule.count < 1:
            raise FaultError("count must be >= 1 or null")
        if rule.ms is not None and rule.ms < 0:
            raise FaultError("ms must be >= 0")
        if rule.hold_ms is not None and rule.hold_ms < 0:
            raise FaultError("hold_ms must be >= 0")
        executed = data.get("executed")
        if executed is not None and not isinstance(executed, bool):
            raise FaultError("executed must be true or false")
        rule.executed = executed
        rule.status = _int(data, "status")
        rule.code = _int(data, "code")
        fields = data.get("fields")
        if fields is not None and not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
            raise FaultError("fields must be a list of field names")
        rule.fields = fields
        rule._check_kind(data)
        return rule

    def _check_kind(self, data: dict[str, Any]) -> None:
        if self.kind == "http_5xx" and self.status not in (None, 500, 502, 503):
            raise FaultError("status must be 500, 502 or 503")
        if self.kind == "error_code":
            if self.code is None:
                raise FaultError("error_code needs a code")
            if self.code not in ERROR_CODES and self.msg is None:
                raise FaultError(f"no Binance message known for {self.code}; give msg")
            if self.executed and self.code not in UNKNOWN_OUTCOME_CODES:
                raise FaultError(f"{self.code} means the request was not executed; executed must be false")
        if self.kind == "partial_fill":
            raw = data.get("fraction")
            try:
                fraction = Decimal(str(raw))
            except InvalidOperation:
                raise FaultError("fraction must be a number in [0, 1]") from None
            if raw is None or isinstance(raw, bool) or not 0 <= fraction <= 1:
                raise FaultError("fraction must be a number in [0, 1]")
            self.fraction = str(raw)
        if self.kind == "late_execution":
            if self.answer is not None and self.answer not in LATE_ANSWERS:
                raise FaultError(f"answer must be one of {', '.join(LATE_ANSWERS)}")
            if self.hold_ms is not None and self.answer != "timeout":
                raise FaultError('hold_ms is only for answer "timeout"')
        elif self.answer is not None or self.hold_ms is not None:
            raise FaultError("answer and hold_ms are only for late_execution")

    def matches(self, method: str, path: str) -> bool:
        return (self.path is None or self.path == path) and (self.method is None or self.method == method)

    @property
    def fill_fraction(self) -> Decimal | None:
        return Decimal(self.fraction) if self.fraction is not None else None

    @property
    def runs_request(self) -> bool:
        """Whether the request is processed (an order executed) before the fault shapes the answer."""
        if self.kind in ("latency", "timeout_after_fill", "partial_fill"):
            return True
        if self.kind in ("bad_json", "missing_fields"):
            return self.executed is not False
        if self.kind == "error_code":
            return bool(self.executed)
        return False

    @property
    def late_ms(self) -> int:
        """How long after receipt a late_execution rule has the matching engine execute the request."""
        return DEFAULT_LATE_MS if self.ms is None else self.ms

    def error(self) -> tuple[int, int, str]:
        """(HTTP status, code, msg) of an error_code rule."""
        assert self.code is not None
        status, msg = ERROR_CODES.get(self.code, (400, ""))
        return status, self.code, self.msg or msg

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def _optional_str(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise FaultError(f"{name} must be a string")
    return value


class FaultBook:
    """The active rules, shared by the admin API and the request path (thread-safe)."""

    def __init__(self) -> None:
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()

    def add(self, rule: FaultRule) -> None:
        with self._lock:
            self._rules.append(rule)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [rule.to_json() for rule in self._rules]

    def take(self, method: str, path: str) -> FaultRule | None:
        """The rule hitting this request, counting the hit; exhausted rules disappear."""
        if not self._rules:  # the common case, without the lock
            return None
        with self._lock:
            for index, rule in enumerate(self._rules):
                if rule.matches(method, path):
                    rule.hits += 1
                    if rule.count is not None and rule.hits >= rule.count:
                        del self._rules[index]
                    return rule
            return None


# ------------------------------------------------------------------------------------------------ answers


@dataclass(slots=True)
class Reply:
    """An answer before encoding: ``body`` is JSON-able, or raw bytes sent as they are."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = "application/json"


def weight_limit_msg(limit: int) -> str:
    return (
        f"Too many requests; current limit is {limit} requests per minute. "
        "Please use the websocket for live updates to avoid polling the API."
    )


def ban_msg(until_ms: int) -> str:
    return (
        f"Way too many requests; IP banned until {until_ms}. Please use the websocket for live updates to avoid bans."
    )


def _echo(params: Mapping[str, str]) -> Json:
    """What an answer can say about a request that was not processed."""
    body: Json = {key: params[key] for key in ("symbol", "side", "type") if key in params}
    if "newClientOrderId" in params:
        body["clientOrderId"] = params["newClientOrderId"]
    return body


async def _hold(ms: int | None, default: int) -> None:
    await asyncio.sleep((default if ms is None else ms) / 1000)


def _code_reply(code: int) -> Reply:
    status, msg = ERROR_CODES[code]
    return Reply(status, {"code": code, "msg": msg})


async def late_answer(rule: FaultRule) -> Reply:
    """What the client of a late_execution request hears: nothing that tells whether it executed."""
    answer = rule.answer or "-1007"
    if answer == "timeout":
        await _hold(rule.hold_ms, DEFAULT_TIMEOUT_MS)
        return _code_reply(-1001)
    if answer == "503_html":
        return Reply(503, GATEWAY_503_HTML, media_type="text/html")
    if answer == "empty":
        return Reply(200, b"")
    return _code_reply(int(answer))


async def apply_fault(
    rule: FaultRule,
    run: Callable[[Decimal | None], Reply],
    defer: Callable[[int], Reply | None],
    params: Mapping[str, str],
    now: int,
    weight_limit: int,
) -> Reply:
    """The answer to a request hit by ``rule``; ``run`` processes the request normally (and executes orders);
    ``defer(ms)`` passes it through the gateway now and has the engine execute it ``ms`` later (a refusal by the
    gateway is returned, None otherwise)."""
    kind = rule.kind
    if kind == "late_execution":
        refused = defer(rule.late_ms)
        return refused if refused is not None else await late_answer(rule)
    if kind == "latency":
        await _hold(rule.ms, 0)
        return run(None)
    if kind == "timeout_after_fill":
        reply = run(None)
        await _hold(rule.ms, DEFAULT_TIMEOUT_MS)  # long enough for the client to give up: outcome unknown to it
        return reply
    if kind == "timeout_before_fill":
        await _hold(rule.ms, DEFAULT_TIMEOUT_MS)
        return Reply(503, {"code": -1001, "msg": HTTP_5XX_BODIES[503][1]})
    if kind == "partial_fill":
        return run(rule.fill_fraction)
    if kind == "http_5xx":
        status = rule.status or 503
        if status == 502:
            return Reply(502, b"<html><body><h1>502 Bad Gateway</h1></body></html>", media_type="text/html")
        code, msg = HTTP_5XX_BODIES[status]
        return Reply(status, {"code": code, "msg": msg})
    if kind == "http_429":
        retry = str(rule.retry_after or 1)
        return Reply(429, {"code": -1003, "msg": weight_limit_msg(weight_limit)}, {"Retry-After": retry})
    if kind == "http_418":
        ban = rule.retry_after or 120
        return Reply(418, {"code": -1003, "msg": ban_msg(now + ban * 1000)}, {"Retry-After": str(ban)})
    if kind == "error_code":
        if rule.executed:
            run(None)
        status, code, msg = rule.error()
        headers = {"Retry-After": str(rule.retry_after or 1)} if status in (418, 429) else {}
        return Reply(status, {"code": code, "msg": msg}, headers)
    # bad_json / missing_fields: a 200 the client cannot fully use
    reply = run(None) if rule.runs_request else Reply(200, _echo(params))
    if reply.status != 200:
        return reply  # the request itself was refused: nothing to garble
    if kind == "bad_json":
        raw = msgspec.json.encode(reply.body)
        return Reply(200, raw[: max(1, len(raw) // 2)])
    dropped = set(rule.fields if rule.fields is not None else DEFAULT_DROPPED_FIELDS)
    body = reply.body
    if isinstance(body, dict):
        body = {key: value for key, value in body.items() if key not in dropped}
    elif isinstance(body, list):  # a list reply (positions, orders): every row loses the fields
        body = [{k: v for k, v in row.items() if k not in dropped} if isinstance(row, dict) else row for row in body]
    return Reply(200, body)
