"""The plain data a Governor decision is made from."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True, slots=True)
class GovernorPolicy:
    allowlist: frozenset[str]
    cooldown_s: float
    rate_window_s: float
    max_per_symbol: int
    max_total: int
    max_notional_usdt: Decimal
    price_max_age_s: float


@dataclass(frozen=True, slots=True)
class GovernorState:
    """What the store says right now. Grant counts are within the policy's rate window."""

    kill_switch: bool
    grants_symbol: int = 0
    grants_total: int = 0
    last_grant_symbol_at: float | None = None
    mark_price: Decimal | None = None
    price_ts: float | None = None
