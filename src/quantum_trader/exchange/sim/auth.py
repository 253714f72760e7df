"""The checks of a SIGNED request: the gateway's on receipt (``authenticate``), the matching engine's when it
executes (``check_me_window``).

* ``X-MBX-APIKEY`` must be the configured key (-2015, HTTP 401). The HMAC-SHA256 hex signature (case-insensitive)
  covers totalParams = query string concatenated with the request body, without the ``signature`` parameter
  (-1102 when absent, -1022 when wrong). ``timestamp`` is mandatory; a request is accepted when
  ``timestamp < serverTime + 1000`` and ``serverTime - timestamp <= recvWindow`` (default 5000, more than 60000
  is -1131), otherwise -1021. This is the gateway's check, made against the time of receipt.
* The matching engine's own recvWindow: an order request (new order, cancel, cancel all) it processes after
  ``timestamp + recvWindow`` on the exchange's clock is refused with -5028 and executes nothing, however long
  a fault held it after receipt (``latency``, ``late_execution``). So no request executes later than that.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Final

from starlette.requests import Request

from quantum_trader.exchange.sim.config import SimConfig
from quantum_trader.exchange.sim.params import EngineError, Json, mandatory, parse_int

DEFAULT_RECV_WINDOW: Final = 5000
MAX_RECV_WINDOW: Final = 60000


def _strip_signature(raw: bytes) -> bytes:
    if b"signature=" not in raw:
        return raw
    return b"&".join(part for part in raw.split(b"&") if not part.startswith(b"signature="))


def authenticate(config: SimConfig, now: int, request: Request, raw_query: bytes, body: bytes, params: Json) -> None:
    """Binance's SIGNED endpoint checks, in the order: API key, signature, timestamp/recvWindow."""
    api_key = request.headers.get("x-mbx-apikey")
    if api_key is None or not hmac.compare_digest(api_key.encode(), config.api_key.encode()):
        raise EngineError(-2015, "Invalid API-key, IP, or permissions for action.", 401)
    signature = params.get("signature")
    if not signature:
        raise mandatory("signature")
    total_params = _strip_signature(raw_query) + _strip_signature(body)
    expected = hmac.new(config.api_secret.encode(), total_params, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, str(signature).lower()):
        raise EngineError(-1022, "Signature for this request is not valid.")
    timestamp = parse_int(params, "timestamp")
    if timestamp is None:
        raise mandatory("timestamp")
    recv_window = parse_int(params, "recvWindow")
    if recv_window is None:
        recv_window = DEFAULT_RECV_WINDOW
    if recv_window > MAX_RECV_WINDOW:
        raise EngineError(-1131, "recvWindow must be less than 60000")
    if timestamp >= now + 1000:
        raise EngineError(-1021, "Timestamp for this request was 1000ms ahead of the server's time.")
    if now - timestamp > recv_window:
        raise EngineError(-1021, "Timestamp for this request is outside of the recvWindow.")


def window_end(params: Mapping[str, str]) -> int:
    """``timestamp + recvWindow`` of a request that passed ``authenticate``: the last moment it may execute."""
    timestamp = parse_int(params, "timestamp") or 0
    recv_window = parse_int(params, "recvWindow")
    return timestamp + (DEFAULT_RECV_WINDOW if recv_window is None else recv_window)


def check_me_window(now: int, params: Mapping[str, str]) -> None:
    """The matching engine's recvWindow, checked when it processes the request (the gateway checked receipt)."""
    if now > window_end(params):
        raise EngineError(-5028, "Timestamp for this request is outside of the ME recvWindow.")
