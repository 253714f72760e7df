"""Connecting to the store: an external Redis/Valkey at QT_REDIS_URL, or the embedded one of ``qt up``."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from quantum_trader.runtime import read_runtime
from quantum_trader.settings import Settings


class StoreUnavailable(Exception):
    """The store cannot be reached; the message says where we looked."""


def redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    user = f"{parts.username}:***@" if parts.username else ":***@"
    netloc = f"{user}{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def resolve_redis_url(settings: Settings) -> str:
    if settings.redis_url:
        return settings.redis_url
    runtime = read_runtime(settings)
    if runtime is not None:
        return runtime.redis_url
    raise StoreUnavailable(
        "no store: set QT_REDIS_URL to a Redis >= 7 / Valkey, or start the system with `qt up` "
        f"(looked for a running one under {settings.state_dir})"
    )


def make_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=10,
        socket_connect_timeout=2.0,
        socket_keepalive=True,
        max_connections=512,
    )


async def connect(url: str) -> aioredis.Redis:
    """A client whose server answered PING and is Redis >= 7 / Valkey (streams with XAUTOCLAIM)."""
    client = make_client(url)
    try:
        await client.ping()
        info = await client.info("server")
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise StoreUnavailable(f"cannot reach the store at {redact(url)}: {exc}") from None
    version = str(info.get("valkey_version") or info.get("redis_version") or "0")
    if int(version.split(".", maxsplit=1)[0]) < 7:
        await client.aclose()
        raise StoreUnavailable(f"the store at {redact(url)} is version {version}; Redis >= 7 or Valkey needed")
    return client
