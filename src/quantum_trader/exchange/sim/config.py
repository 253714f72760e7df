"""``SimConfig``: how the simulator listens, authenticates, limits and moves prices (one place for its defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from quantum_trader.exchange.sim.symbols import DEFAULT_SYMBOLS, SymbolSpec


@dataclass(frozen=True)
class SimConfig:
    """How the simulator listens, authenticates, limits and moves prices.

    api_key / api_secret: the only accepted ``X-MBX-APIKEY`` and its HMAC secret.
    admin_token: enables ``/_sim/...`` (header ``X-Sim-Admin-Token``); None answers 404 there.
    weight_limit_1m, orders_limit_10s, orders_limit_1m: Binance's REQUEST_WEIGHT and ORDERS limits.
    ban_after_429s: requests answered 429 in one minute before the client is banned (HTTP 418) for
        ``ban_seconds``.
    price_step_ms / price_sigma: the mark price walk's step and per-step log-return deviation (0 freezes prices).
    symbols, wallet_usdt, leverage, fee_rate: the markets, the starting USDT wallet, the default leverage
        and the taker fee charged on each fill's notional.
    listen_key_lifetime_s: how long a user-data listen key lives after its last POST or PUT (Binance: 60 min;
        short in tests of expiry).
    stream_max_connection_s: a user-data connection is cut this long after it opened (Binance: 24 hours).
    account_update_first: a fill's ``ACCOUNT_UPDATE`` is pushed before its ``ORDER_TRADE_UPDATE`` (Binance does
        not document their order, and clients have seen both: the chain must not depend on either).
    """

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str = "sim-api-key"
    api_secret: str = "sim-api-secret"
    admin_token: str | None = None
    seed: int = 7
    weight_limit_1m: int = 2400
    orders_limit_10s: int = 300
    orders_limit_1m: int = 1200
    ban_after_429s: int = 10
    ban_seconds: int = 120
    price_step_ms: int = 100
    price_sigma: float = 0.0002
    symbols: tuple[SymbolSpec, ...] = DEFAULT_SYMBOLS
    wallet_usdt: Decimal = Decimal("100000")
    leverage: int = 20
    fee_rate: Decimal = Decimal(0)
    listen_key_lifetime_s: float = 3600.0
    stream_max_connection_s: float = 86400.0
    account_update_first: bool = False
