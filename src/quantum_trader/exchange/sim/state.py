"""``SimState``: everything one simulator app serves from (config, engine, rate limiter, faults, late
executions), shared by the REST dispatch and the admin API."""

from __future__ import annotations

from quantum_trader.exchange.sim.config import SimConfig
from quantum_trader.exchange.sim.engine import Engine
from quantum_trader.exchange.sim.faults import FaultBook
from quantum_trader.exchange.sim.late import LateExecution
from quantum_trader.exchange.sim.ratelimit import RateLimiter
from quantum_trader.exchange.sim.stream import UserStreams


class SimState:
    """Everything one simulator app serves from."""

    def __init__(self, config: SimConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        engine.listen_keys.lifetime_ms = round(config.listen_key_lifetime_s * 1000)
        engine.account_update_first = config.account_update_first
        self.limiter = RateLimiter(config)
        self.faults = FaultBook()
        self.late: list[LateExecution] = []  # every late_execution since the last reset, oldest first
        self.streams = UserStreams(engine, config.stream_max_connection_s)  # the WebSockets (and their faults)

    def reset(self) -> None:
        with self.engine.lock:
            for late in self.late:
                late.cancel()
            self.late = []
            self.engine.reset()
        self.limiter.reset()
        self.faults.clear()
        self.streams.clear()
