"""Binance's user-data stream in the simulator, the part that is not transport: the account's listen key
(``POST/PUT/DELETE /fapi/v1/listenKey``) and the events the engine emits as it works, built from its records:
``ORDER_TRADE_UPDATE`` (an order accepted, a fill, an unfilled rest expired) and ``ACCOUNT_UPDATE`` (the wallet
and the positions a fill moved, only those), in Binance's USD-M shapes (docs/exchange.md). The WebSocket that
pushes them is exchange/sim/stream.py; the admin API also serves them (``GET /_sim/user-events``) so tests can
compare what was pushed with what was recorded.

Binance's rules kept here: one active key per account; POST returns it (a new one when there is none) and
extends it; PUT extends a live key and answers ``-1125 This listenKey does not exist.`` for any other; DELETE
closes it. A key lives ``lifetime_ms`` (60 minutes) after its last POST or PUT.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from quantum_trader.exchange.sim.params import EngineError, Json, fmt
from quantum_trader.exchange.sim.records import Order, Position, Trade

LISTEN_KEY_LIFETIME_MS: Final = 60 * 60 * 1000
# the engine's memory of the stream (a few MB): a reader further behind resyncs from REST
USER_EVENTS_KEPT: Final = 2_000
_KEY_ALPHABET: Final = string.ascii_letters + string.digits
UNKNOWN_KEY: Final = (-1125, "This listenKey does not exist.")


@dataclass
class ListenKeys:
    """The account's one listen key (the simulator has one account)."""

    lifetime_ms: int = LISTEN_KEY_LIFETIME_MS
    key: str | None = None
    expires_ms: int = 0

    def live(self, now_ms: int) -> str | None:
        return self.key if self.key is not None and now_ms < self.expires_ms else None

    def create(self, now_ms: int) -> str:
        """POST: the active key, extended; a new one when there is none (or it expired)."""
        if self.live(now_ms) is None:
            self.key = "".join(secrets.choice(_KEY_ALPHABET) for _ in range(64))
        self.expires_ms = now_ms + self.lifetime_ms
        assert self.key is not None
        return self.key

    def keep_alive(self, key: str, now_ms: int) -> None:
        """PUT: extend ``key``; -1125 when it is not the account's live key."""
        if not key or key != self.live(now_ms):
            raise EngineError(*UNKNOWN_KEY)
        self.expires_ms = now_ms + self.lifetime_ms

    def expire(self) -> None:
        """The key's lifetime ends now (a fault: as if nobody had kept it alive); a POST makes a new one."""
        self.expires_ms = 0

    def close(self, key: str, now_ms: int) -> None:
        """DELETE: close ``key``; -1125 when it is not the account's live key."""
        if not key or key != self.live(now_ms):
            raise EngineError(*UNKNOWN_KEY)
        self.key, self.expires_ms = None, 0


def order_trade_update(
    order: Order, execution: str, event_ms: int, trade: Trade | None = None, *, price_places: int, qty_places: int
) -> Json:
    """``ORDER_TRADE_UPDATE`` for ``order`` after ``execution`` (NEW, TRADE, EXPIRED, CANCELED), with the fill
    ``trade`` for a TRADE. ``X`` is the order's status after the event."""
    last_qty, last_price = (trade.qty, trade.price) if trade is not None else (Decimal(0), Decimal(0))
    return {
        "e": "ORDER_TRADE_UPDATE",
        "E": event_ms,
        "T": trade.time_ms if trade is not None else order.update_ms,
        "o": {
            "s": order.symbol,
            "c": order.client_order_id,
            "S": order.side,
            "o": order.type,
            "f": order.time_in_force,
            "q": fmt(order.orig_qty, qty_places),
            "p": fmt(order.price, price_places),
            "ap": fmt(order.avg_price, price_places) if order.executed_qty else "0",
            "sp": "0",
            "x": execution,
            "X": order.status,
            "i": order.order_id,
            "l": fmt(last_qty, qty_places),
            "z": fmt(order.executed_qty, qty_places),
            "L": fmt(last_price, price_places),
            "N": "USDT",
            "n": fmt(trade.commission, 8) if trade is not None else "0",
            "T": trade.time_ms if trade is not None else order.update_ms,
            "t": trade.trade_id if trade is not None else 0,
            "b": "0",
            "a": "0",
            "m": trade.maker if trade is not None else False,
            "R": order.reduce_only,
            "wt": "CONTRACT_PRICE",
            "ot": order.type,
            "ps": order.position_side,
            "cp": False,
            "rp": fmt(trade.realized_pnl, 8) if trade is not None else "0",
            "pP": False,
            "si": 0,
            "ss": 0,
            "V": "EXPIRE_TAKER",
            "pm": "NONE",
            "gtd": 0,
        },
    }


def account_update(
    reason: str,
    event_ms: int,
    tx_ms: int,
    wallet: Decimal,
    positions: Iterable[tuple[Position, Decimal, int, int]],
) -> Json:
    """``ACCOUNT_UPDATE`` (``a.m`` the reason: ORDER, FUNDING_FEE, ADJUSTMENT, …) with the USDT wallet and the
    given positions only: (position, unrealized PnL, price decimals, quantity decimals) each."""
    return {
        "e": "ACCOUNT_UPDATE",
        "E": event_ms,
        "T": tx_ms,
        "a": {
            "m": reason,
            "B": [{"a": "USDT", "wb": fmt(wallet, 8), "cw": fmt(wallet, 8), "bc": "0"}],
            "P": [
                {
                    "s": p.symbol,
                    "pa": fmt(p.amt, qty_places),
                    "ep": fmt(p.entry_price, price_places + 2),
                    "bep": fmt(p.entry_price, price_places + 2),
                    "cr": "0",
                    "up": fmt(unrealized, 8),
                    "mt": "cross",
                    "iw": "0",
                    "ps": p.position_side,
                }
                for p, unrealized, price_places, qty_places in positions
            ],
        },
    }


def listen_key_expired(key: str, event_ms: int) -> Json:
    return {"e": "listenKeyExpired", "E": event_ms, "listenKey": key}


FUNDING_INTERVAL_MS: Final = 8 * 3600 * 1000


def mark_price_update(symbol: str, mark: str, event_ms: int) -> Json:
    """``markPriceUpdate`` of ``<symbol>@markPrice[@1s]`` (index and settle price: the mark, as the simulator
    has one price per symbol; the funding rate the simulator's constant)."""
    next_funding = (event_ms // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS
    return {"e": "markPriceUpdate", "E": event_ms, "s": symbol, "p": mark, "ap": mark, "P": mark, "i": mark,
            "r": "0.00010000", "T": next_funding}  # fmt: skip
