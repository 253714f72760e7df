"""The plain data a P3.3 decision is made from."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from quantum_trader.domain.filters import SymbolFilters
from quantum_trader.domain.models import Ledger, Snapshot


@dataclass(frozen=True, slots=True)
class BrainPolicy:
    managed: frozenset[str]
    snapshot_max_age_s: float
    qty_tolerance_pct: Decimal
    cooldown_s: float


@dataclass(frozen=True, slots=True)
class BrainInputs:
    snapshot: Snapshot | None
    ledger: Ledger | None
    in_flight_plan: str | None  # the plan P3.3 last allowed for the symbol whose result is not in yet
    filters: SymbolFilters | None
