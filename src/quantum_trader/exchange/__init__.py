"""The exchange layer: one adapter over ccxt ``binanceusdm`` for every mode, and the simulator (``sim``)."""

from __future__ import annotations

from quantum_trader.exchange.binance import BinanceFutures, make_exchange
from quantum_trader.runtime import read_runtime
from quantum_trader.secrets import exchange_credentials
from quantum_trader.settings import Settings


def sim_url_for(settings: Settings) -> str:
    if settings.exchange.sim_url:
        return settings.exchange.sim_url
    runtime = read_runtime(settings)
    return runtime.sim_url if runtime else ""


def open_exchange(settings: Settings) -> BinanceFutures:
    """The configured exchange. Raises ConfigError (credentials) or ExchangeError (mode) with a clear message."""
    key, secret = exchange_credentials(settings)
    return make_exchange(settings.exchange, key, secret, sim_url_for(settings))
