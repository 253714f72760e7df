"""Connecting to the store: an external Redis/Valkey at QT_REDIS_URL, or the embedded one of ``qt up``.

Every client of the system is made by ``make_client``, so every one reads the store the same way:

- replies are decoded with ``surrogateescape``: bytes that are not UTF-8 (a hostile or broken writer) arrive
  as lone surrogates instead of failing the whole reply; stream replies are parsed by ``bus.entries`` into
  fields that say whether they are usable;
- the replies that mean "the store cannot serve this now" (READONLY, LOADING, BUSY, MASTERDOWN, UNBLOCKED,
  NOREPLICAS, TRYAGAIN, CLUSTERDOWN) raise ``StoreUnavailableReply``, a ConnectionError: every loop already
  treats those as an outage (back off, decide nothing), and the connection is dropped, so the next one checks
  which server it reached;
- one retry policy: redis-py's own retries are off (``Retry(NoBackoff(), 0)``). Each caller retries with its
  own backoff at the level where a retry is safe (a script re-run is idempotent; a blind resend of a command
  whose reply was lost is not, e.g. an XADD);
- with a ``StoreWatch`` (Apply, P3.3), every new connection checks which instance it reached (bus/identity.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import DefaultParser
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError, RedisError

from quantum_trader.bus.entries import STREAM_CALLBACKS
from quantum_trader.bus.errors import UNAVAILABLE_REPLIES, StoreUnavailableReply
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.runtime import read_runtime
from quantum_trader.settings import ConfigError, Settings

SCHEMES = ("redis", "rediss", "unix")  # what redis-py's from_url understands


class StoreUnavailable(Exception):
    """The store cannot be reached; the message says where we looked."""


class StoreNotReady(StoreUnavailable):
    """The store answers but cannot serve yet (loading, a replica, refusing writes until its replicas catch up):
    a service waits for it rather than exit."""


class _Parser(DefaultParser):  # type: ignore[misc]
    EXCEPTION_CLASSES: ClassVar[dict[str, Any]] = {
        **DefaultParser.EXCEPTION_CLASSES,
        **dict.fromkeys(UNAVAILABLE_REPLIES, StoreUnavailableReply),
    }


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


def check_url(url: str) -> None:
    """A one-line ConfigError for a URL redis-py cannot use (it would raise a bare ValueError)."""
    scheme = urlsplit(url).scheme
    if scheme == "redis+sentinel":
        raise ConfigError("QT_REDIS_URL: redis+sentinel:// is not supported by this version; use redis:// or rediss://")
    if scheme not in SCHEMES:
        shown = f"{scheme}://" if scheme else "no scheme"
        raise ConfigError(f"QT_REDIS_URL: {shown} is not a store URL; use redis://, rediss:// or unix://")


def make_client(url: str, watch: StoreWatch | None = None, retry: Retry | None = None) -> aioredis.Redis:
    """The one way the system makes a store client (see the module docstring). ``retry`` is for observers
    that must ride out a restart (``qt chaos``); the services retry at their own level."""
    check_url(url)
    options: dict[str, Any] = {}
    if watch is not None:
        options["redis_connect_func"] = watch.on_connect
    client = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        encoding_errors="surrogateescape",
        protocol=2,
        retry=retry or Retry(NoBackoff(), 0),
        parser_class=_Parser,
        health_check_interval=10,
        # a store that stops answering (a hung host, a network partition) is an outage after 5 s, not a wait
        # forever; every blocking read here blocks for 2 s at most, so no healthy read comes near it
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
        socket_keepalive=True,
        max_connections=512,
        **options,
    )
    for command, callback in STREAM_CALLBACKS.items():
        client.set_response_callback(command, callback)
    return client


async def record_epoch(admin_url: str) -> str:
    """Record the store instance's epoch now (bus/identity.py), as Apply's first connection would, and stamp how
    durable the instance is (an admin's CONFIG GET). Done right after a store starts (`qt up`, the private
    systems of demo, chaos and bench, and `qt store-stamp` after the deployed store's start): the floor is
    then exact, so proposals sent right after the start are vouched for even before an Apply has connected,
    and a restart of an instance stamped ``always`` continues its epoch (it lost nothing). Returns the stamp."""
    watch = StoreWatch(record_epoch=True)
    client = make_client(admin_url, watch)
    try:
        await client.ping()
        return await watch.stamp_durability(client)
    finally:
        await client.aclose()


async def connect(url: str, watch: StoreWatch | None = None) -> aioredis.Redis:
    """A client whose server answered PING and is Redis >= 7 / Valkey (streams with XAUTOCLAIM)."""
    client = make_client(url, watch)
    try:
        await client.ping()
        try:
            info = await client.info("server")
        except NoPermissionError:  # a least-privilege account may not run INFO; ACL users imply Redis >= 6
            info = {"redis_version": "7"}
    except StoreUnavailableReply as exc:
        await client.aclose()
        raise StoreNotReady(f"the store at {redact(url)} cannot serve yet: {exc}") from None
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise StoreUnavailable(f"cannot reach the store at {redact(url)}: {exc}") from None
    version = str(info.get("valkey_version") or info.get("redis_version") or "0")
    if int(version.split(".", maxsplit=1)[0]) < 7:
        await client.aclose()
        raise StoreUnavailable(f"the store at {redact(url)} is version {version}; Redis >= 7 or Valkey needed")
    return client
