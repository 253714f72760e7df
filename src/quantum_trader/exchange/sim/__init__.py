"""A Binance USD-M futures compatible REST simulator (see ``server.py`` for its public API)."""

from quantum_trader.exchange.sim.app import create_app
from quantum_trader.exchange.sim.engine import DEFAULT_SYMBOLS, Engine, EngineError, SymbolSpec, bench_symbols
from quantum_trader.exchange.sim.server import SimConfig, SimServer, serve

__all__ = [
    "DEFAULT_SYMBOLS",
    "Engine",
    "EngineError",
    "SimConfig",
    "SimServer",
    "SymbolSpec",
    "bench_symbols",
    "create_app",
    "serve",
]
