"""Connecting to the store: an external Redis/Valkey at QT_REDIS_URL, or the embedded one of ``qt up``."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError

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
        return with_credentials(runtime.redis_url, "qt-operator", acl_password_file(settings, "operator"))
    raise StoreUnavailable(
        "no store: set QT_REDIS_URL to a Redis >= 7 / Valkey, or start the system with `qt up` "
        f"(looked for a running one under {settings.state_dir})"
    )


def acl_password_file(settings: Settings, role: str) -> Path:
    return settings.state_dir / "secrets" / f"acl-{role}.pass"


def with_credentials(url: str, user: str, password_file: Path) -> str:
    """``url`` with ``user`` and the password in ``password_file`` (when it exists: `qt up` turned ACL on)."""
    if not password_file.exists():
        return url
    from quantum_trader.secrets import read_secret_file

    password = read_secret_file(password_file)
    parts = urlsplit(url)
    netloc = f"{quote(user)}:{quote(password)}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


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
        try:
            info = await client.info("server")
        except NoPermissionError:  # a least-privilege account may not run INFO; ACL users imply Redis >= 6
            info = {"redis_version": "7"}
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise StoreUnavailable(f"cannot reach the store at {redact(url)}: {exc}") from None
    version = str(info.get("valkey_version") or info.get("redis_version") or "0")
    if int(version.split(".", maxsplit=1)[0]) < 7:
        await client.aclose()
        raise StoreUnavailable(f"the store at {redact(url)} is version {version}; Redis >= 7 or Valkey needed")
    return client
