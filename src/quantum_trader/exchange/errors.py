"""Classify what came back from Binance (through ccxt) as rejected, unknown or unavailable.

ccxt's own exception mapping depends on the host name and may be generic against a local simulator, so the
decision is made from Binance's ``{"code": -NNNN, "msg": ...}`` found in the exception text, and from the
exception type only when there is no code.
"""

from __future__ import annotations

import re

from quantum_trader.exchange.base import ExchangeError, ExchangeRejected, ExchangeUnavailable, OutcomeUnknown

_CODE_RE = re.compile(r'"code"\s*:\s*(-?\d+)\s*,\s*"msg"\s*:\s*"((?:[^"\\]|\\.)*)"')

# Codes after which the order's fate is not known: the request may have reached the matching engine.
UNKNOWN_OUTCOME_CODES = frozenset({-1000, -1001, -1006, -1007, -1008})

# Definitive refusals (Binance documents these as "the order was not placed").
REJECTION_CODES = frozenset(
    {-1013, -1100, -1102, -1106, -1111, -1116, -1117, -2010, -2019, -2022, -4003, -4004, -4005, -4061, -4164}
)
# Refusals at the gateway that say nothing about the order itself: the request was not processed, so the same
# order may be sent again once the cause is gone (clock resynced, rate window passed) - inside the permit window.
# -5028: the matching engine's own recvWindow check refused it (it arrived there too late): nothing executed.
RETRYABLE_REJECTION_CODES = frozenset({-1021, -1003, -1015, -5028})

# Not listed on purpose, so it counts as unknown and is resolved by a query: -4116 (duplicate client order id)
# says an order with our id EXISTS.

MAX_RAW_IN_LOG = 300


def binance_code(text: str) -> tuple[int, str] | None:
    match = _CODE_RE.search(text)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


def truncate(text: str, limit: int = MAX_RAW_IN_LOG) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def classify_order_error(exc: BaseException) -> ExchangeError:
    """An exception raised while placing an order, as Rejected or OutcomeUnknown.

    Anything not provably a rejection is unknown: treating an unknown as failed is how duplicate orders are
    made after a timeout.
    """
    text = str(exc)
    found = binance_code(text)
    if found is not None:
        code, msg = found
        if code in REJECTION_CODES or code in RETRYABLE_REJECTION_CODES:
            return ExchangeRejected(msg, code)
        return OutcomeUnknown(f"{msg} (code {code})", code)
    return OutcomeUnknown(f"{type(exc).__name__}: {truncate(text)}")


def classify_read_error(exc: BaseException) -> ExchangeError:
    text = str(exc)
    found = binance_code(text)
    if found is not None:
        code, msg = found
        return ExchangeUnavailable(f"{msg} (code {code})", code)
    return ExchangeUnavailable(f"{type(exc).__name__}: {truncate(text)}")
