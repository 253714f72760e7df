"""Shared fixtures: real stores (embedded Valkey always, the machine's Redis when it answers), the simulator
over HTTP, and the three services running in the test's event loop against them.

Integration tests take the ``store_url`` fixture, parametrized over both stores; the Redis run is skipped
with a visible reason when no Redis answers at QT_TEST_REDIS_URL (default redis://127.0.0.1:6379/15).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from quantum_trader.bus import keys
from quantum_trader.bus.connection import make_client
from quantum_trader.bus.embedded import EmbeddedStore
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.bus.streams import TOPOLOGY
from quantum_trader.exchange.binance import BinanceFutures, make_exchange
from quantum_trader.exchange.sim.server import SimConfig, SimServer
from quantum_trader.services.apply import ApplyService
from quantum_trader.services.brain import BrainService
from quantum_trader.services.governor import GovernorService
from quantum_trader.settings import Settings
from quantum_trader.tasks import cancel_and_wait

# No time limits on examples: speed is measured by the benchmarks, and two test workers on two cores (each
# starting stores, simulators and services) make any per-example deadline or "generation is slow" check a coin
# toss. The properties themselves are untouched.
hypothesis_settings.register_profile("qt", deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.load_profile("qt")


def _worker_db(url: str) -> str:
    """Each pytest-xdist worker flushes its own database: gw0 the configured one, gw1 the one below, ..."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    base, _, db = url.rpartition("/")
    if not worker.startswith("gw") or not db.isdigit():
        return url
    return f"{base}/{int(db) - int(worker[2:])}"


TEST_REDIS_URL = _worker_db(os.environ.get("QT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
SIM_KEY, SIM_SECRET, SIM_ADMIN = "test-api-key", "test-api-secret", "test-admin-token"
GOVERNOR_KEY, P33_KEY = "governor-test-key-0123456789", "p33-test-key-0123456789"


# --- stores -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def embedded_store() -> Iterator[str]:
    data = Path(tempfile.mkdtemp(prefix="qt-test-valkey-"))
    store = EmbeddedStore(data, persist=False)
    url = store.start()
    yield url
    store.stop()


def _redis_reason() -> str | None:
    try:
        client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=0.5)
        client.ping()
        version = str(client.info("server").get("redis_version", "0"))
        client.close()
    except (redis.RedisError, OSError) as exc:
        return f"no Redis answers at {TEST_REDIS_URL} ({exc}); set QT_TEST_REDIS_URL to run this store too"
    if int(version.split(".", maxsplit=1)[0]) < 7:
        return f"Redis at {TEST_REDIS_URL} is {version}; >= 7 needed"
    return None


# Which stores the integration tests run on (QT_TEST_STORES, comma-separated): both by default. The mutation tool
# runs one, as each mutant's tests are run once (tools/mutation.py picks the Redis when it answers).
TEST_STORES = [s for s in os.environ.get("QT_TEST_STORES", "valkey,redis").split(",") if s]


@pytest.fixture(params=TEST_STORES)
def store_url(request: pytest.FixtureRequest) -> str:
    """A flushed store: the embedded Valkey, then (second run) the external Redis."""
    if request.param == "valkey":
        url = str(request.getfixturevalue("embedded_store"))  # started only when a test runs on it
    elif request.param != "redis":
        raise ValueError(f"QT_TEST_STORES names {request.param!r}; the stores are valkey and redis")
    else:
        reason = _redis_reason()
        if reason:
            pytest.skip(reason)
        url = TEST_REDIS_URL
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
async def rds(store_url: str) -> AsyncIterator[aioredis.Redis]:
    client = make_client(store_url)
    yield client
    await client.aclose()


# --- simulator --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sim_server() -> Iterator[SimServer]:
    config = SimConfig(api_key=SIM_KEY, api_secret=SIM_SECRET, admin_token=SIM_ADMIN, price_sigma=0.0)
    with SimServer(config) as server:
        yield server


@pytest.fixture
def sim(sim_server: SimServer) -> SimServer:
    """The simulator, reset to a fresh account (no positions, no orders, no faults)."""
    import httpx

    httpx.post(f"{sim_server.url}/_sim/reset", headers={"X-Sim-Admin-Token": SIM_ADMIN}).raise_for_status()
    return sim_server


def set_position(sim: SimServer, symbol: str, amt: str) -> None:
    import httpx

    reply = httpx.post(
        f"{sim.url}/_sim/position", json={"symbol": symbol, "amt": amt}, headers={"X-Sim-Admin-Token": SIM_ADMIN}
    )
    reply.raise_for_status()


def sim_orders(sim: SimServer, symbol: str | None = None) -> list[dict[str, Any]]:
    import httpx

    reply = httpx.get(
        f"{sim.url}/_sim/orders",
        params={"symbol": symbol} if symbol else None,
        headers={"X-Sim-Admin-Token": SIM_ADMIN},
    )
    reply.raise_for_status()
    return list(reply.json())


def sim_position(sim: SimServer, symbol: str) -> Decimal:
    import httpx

    reply = httpx.get(f"{sim.url}/_sim/state", headers={"X-Sim-Admin-Token": SIM_ADMIN})
    for row in reply.json()["positions"]:
        if row["symbol"] == symbol:
            return Decimal(str(row["positionAmt"]))
    return Decimal(0)


async def until(condition: Any, timeout: float = 15.0, interval: float = 0.01) -> None:
    """Poll ``condition`` (an async callable) until it is true; fail the test after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


async def wait_key(rds: aioredis.Redis, key: str) -> None:
    """Wait until ``key`` exists (a plan record, an executed marker, ...)."""

    async def exists() -> bool:
        return bool(await rds.exists(key))

    await until(exists)


async def plan_waiting_for_governor(rds: aioredis.Redis, symbol: str) -> Any:
    """A published plan that waits for its Governor permit (manual mode): a target for what goes into slots."""
    from quantum_trader import ops

    await ops.set_governor_mode(rds, "manual", "test")
    sub = await ops.propose(rds, symbol, "FULL_CLOSE")
    await wait_key(rds, keys.plan_record(sub.plan_id))
    return sub


async def assert_nothing_pending(rds: aioredis.Redis, timeout: float = 10.0) -> None:
    """Every consumer group has acknowledged everything it read (served, skipped or dead-lettered)."""
    import time

    for stream, group in TOPOLOGY:
        deadline = time.monotonic() + timeout
        while (await rds.xpending(stream, group))["pending"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (await rds.xpending(stream, group))["pending"] == 0, f"{group} left entries pending"


# --- settings and the chain -------------------------------------------------------------------------------


def make_settings(tmp: Path, store_url: str, sim_url: str, **overrides: Any) -> Settings:
    sections: dict[str, dict[str, Any]] = {
        "apply": {"permit_wait_ms": 800, "metrics_port": 0},
        "governor": {"metrics_port": 0, "cooldown_s": 0},
        "brain": {"metrics_port": 0, "snapshot_interval_s": 0.5, "cooldown_s": 0},
        # The late-execution horizon is 10 s in production; 2 s keeps the recovery cases quick here.
        "exchange": {
            "mode": "sim",
            "sim_url": sim_url,
            "api_key": SIM_KEY,
            "api_secret": SIM_SECRET,
            "late_execution_horizon_ms": 2000,
        },
        "keys": {"governor": GOVERNOR_KEY, "p33": P33_KEY},
    }
    for name, values in list(overrides.items()):
        if name in sections:
            sections[name].update(values)
            overrides.pop(name)
    return Settings(redis_url=store_url, state_dir=tmp, **sections, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path, store_url: str, sim: SimServer) -> Settings:
    return make_settings(tmp_path, store_url, sim.url)


@dataclass
class Chain:
    """Apply, Governor and P3.3 running as tasks in the test loop, each with its own connections."""

    settings: Settings
    urls: dict[str, str] = field(default_factory=dict)  # per service, e.g. its ACL user's; default: settings
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    services: dict[str, Any] = field(default_factory=dict)
    _clients: dict[str, list[Any]] = field(default_factory=dict)  # per instance: closed when it stops
    _closing: list[asyncio.Future[None]] = field(default_factory=list)

    async def start(self, *names: str) -> None:
        for name in names or ("brain", "governor", "apply"):
            await self.start_one(name)

    async def start_named(self, name: str, consumer: str) -> Any:
        """Another instance of service ``name`` (its own consumer name), tracked as ``consumer``."""
        return await self.start_one(name, consumer)

    async def start_one(self, name: str, consumer: str = "", *, wait_ready: bool = True) -> Any:
        # as the runner does: Apply and P3.3 check which store instance each connection reaches
        watch = StoreWatch(record_epoch=name == "apply") if name in ("apply", "brain") else None
        client = make_client(self.urls.get(name, self.settings.redis_url), watch)
        key = consumer or name
        self._clients[key] = [client]
        consumer = consumer or f"{name}-test"
        if name == "governor":
            service: Any = GovernorService(self.settings, client, consumer=consumer)
        else:
            exchange = make_exchange(self.settings.exchange, SIM_KEY, SIM_SECRET, self.settings.exchange.sim_url)
            self._clients[key].append(exchange)
            cls = ApplyService if name == "apply" else BrainService
            service = cls(self.settings, client, exchange, consumer=consumer, watch=watch)
        self.services[key] = service
        self.tasks[key] = asyncio.create_task(service.run(), name=f"test-{key}")
        if not wait_ready:
            return service
        if name == "brain":
            await asyncio.wait_for(service.ready.wait(), 10)
        elif name == "apply":
            await asyncio.wait_for(service.waiter.ready.wait(), 10)
        await asyncio.sleep(0.05)  # let it reach its blocking read
        return service

    async def crash(self, name: str, *, keep_connections: bool = False) -> None:
        """Stop a service abruptly (its task is cancelled wherever it is; pending entries stay pending).
        ``keep_connections`` leaves its store and exchange clients open, for a test that drives its handlers."""
        task = self.tasks.pop(name)
        await cancel_and_wait([task])
        if not task.done():  # a service that ignores cancellation is a bug: show where it is stuck
            for other in asyncio.all_tasks():
                other.print_stack()
            raise AssertionError(f"{name} did not stop within 10 s of cancellation")
        # a crashed process's connections go with it (and a long run must not pile up ccxt instances); ccxt's
        # close waits 250 ms for its sessions, so it finishes in the background (awaited in stop())
        for client in [] if keep_connections else self._clients.pop(name, []):
            self._closing.append(asyncio.ensure_future(_close(client)))

    async def restart(self, name: str) -> Any:
        await self.crash(name)
        return await self.start_one(name)

    async def stop(self) -> None:
        for name in list(self.tasks):
            await self.crash(name)
        for name in list(self._clients):
            self._closing += [asyncio.ensure_future(_close(c)) for c in self._clients.pop(name)]
        await asyncio.gather(*self._closing)
        self._closing.clear()


async def _close(client: Any) -> None:
    with suppress(Exception):
        await (client.close() if isinstance(client, BinanceFutures) else client.aclose())


@pytest.fixture
async def chain(settings: Settings) -> AsyncIterator[Chain]:
    running = Chain(settings)
    yield running
    await running.stop()
