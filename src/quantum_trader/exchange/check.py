"""``qt exchange check``: is this exchange usable by the chain, and if not, exactly what is wrong."""

from __future__ import annotations

import time
from dataclasses import dataclass

from quantum_trader.exchange.base import ExchangeError
from quantum_trader.exchange.binance import BinanceFutures

MAX_SKEW_MS = 1000.0  # Binance rejects requests outside recvWindow; orders use a 1 s window
KEY_CODES = {
    -2014: "API key format invalid",
    -2015: "key rejected (invalid, no futures permission, or IP)",
    -1022: "signature rejected (wrong secret)",
}
HEDGE_HELP = (
    "Hedge Mode is on: this chain closes positions with reduceOnly orders, which need one-way mode. Switch it "
    "off in Binance (Preferences > Position Mode: One-way) or POST /fapi/v1/positionSide/dual "
    "dualSidePosition=false, with no open positions or orders"
)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


async def run_checks(exchange: BinanceFutures, symbols: list[str], where: str) -> list[Check]:
    checks: list[Check] = []
    started = time.monotonic()
    try:
        skew = await exchange.sync_time()
    except ExchangeError as exc:
        return [Check("connectivity", False, f"cannot reach the exchange at {where}: {exc.message}")]
    rtt = (time.monotonic() - started) * 1000
    checks.append(Check("connectivity", True, f"{where} answers ({rtt:.0f} ms round trip)"))
    direction = "ahead of" if skew > 0 else "behind"
    if abs(skew) <= MAX_SKEW_MS:
        checks.append(Check("clock", True, f"this host is {abs(skew):.0f} ms {direction} the exchange"))
    else:
        checks.append(
            Check(
                "clock",
                False,
                f"this host's clock is {abs(skew) / 1000:.1f} s {direction} the exchange's "
                f"(limit {MAX_SKEW_MS:.0f} ms): fix time sync (chrony/NTP); requests only work while the offset "
                "is compensated",
            )
        )
    try:
        await exchange.balance()
        checks.append(Check("keys", True, "signed request accepted"))
    except ExchangeError as exc:
        meaning = KEY_CODES.get(exc.code, "signed request failed")
        checks.append(Check("keys", False, f"{meaning}: {exc.message}"))
        return checks  # everything below needs working keys
    try:
        hedge = await exchange.dual_side_position()
        checks.append(Check("position mode", not hedge, HEDGE_HELP if hedge else "one-way mode"))
    except ExchangeError as exc:
        checks.append(Check("position mode", False, f"cannot read the position mode: {exc.message}"))
    try:
        filters = await exchange.filters(refresh=True)
        for symbol in symbols:
            f = filters.get(symbol)
            if f is None:
                checks.append(Check(f"filters {symbol}", False, "not in exchangeInfo (or no usable lot size filter)"))
            else:
                checks.append(
                    Check(
                        f"filters {symbol}",
                        True,
                        f"step {f.step_size}, min {f.min_qty}, max {f.max_qty}, min notional {f.min_notional}",
                    )
                )
    except ExchangeError as exc:
        checks.append(Check("filters", False, f"exchangeInfo unavailable: {exc.message}"))
    guard = exchange.guard
    banned = guard.banned_until_ms > exchange.now_ms()
    checks.append(
        Check(
            "rate limits",
            not banned,
            f"IP banned until {guard.banned_until_ms / 1000:.0f}"
            if banned
            else f"weight used this minute: {guard.used_weight}/{guard.weight_limit}",
        )
    )
    return checks
