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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import DefaultParser
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.backoff import NoBackoff as SyncNoBackoff
from redis.exceptions import NoPermissionError, RedisError
from redis.retry import Retry as SyncRetry
from redis.sentinel import Sentinel as SyncSentinel

from quantum_trader.bus.entries import STREAM_CALLBACKS
from quantum_trader.bus.errors import UNAVAILABLE_REPLIES, StoreUnavailableReply
from quantum_trader.bus.identity import StoreWatch
from quantum_trader.runtime import read_runtime
from quantum_trader.settings import ConfigError, Settings

SCHEMES = ("redis", "rediss", "unix")  # what redis-py's from_url understands
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")  # a Sentinel set: sentinel_url()


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


def split_netloc(netloc: str) -> tuple[str, str | None, str]:
    """(user, password or None, hosts) of a URL's netloc, without parsing the hosts (a Sentinel set lists
    several: ``h1:p1,h2:p2``, which urllib's ``hostname``/``port`` cannot read)."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return "", None, netloc
    user, colon, password = userinfo.partition(":")
    return unquote(user), (unquote(password) if colon else None), hosts


def _with_userinfo(url: str, user: str, password: str | None) -> str:
    parts = urlsplit(url)
    _, _, hosts = split_netloc(parts.netloc)
    userinfo = quote(user, safe="") + (f":{password}" if password is not None else "")
    netloc = f"{userinfo}@{hosts}" if userinfo else hosts
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact(url: str) -> str:
    """The URL without its passwords (in the userinfo and in a ``sentinel_password`` query), for logs and
    errors."""
    parts = urlsplit(url)
    user, password, _ = split_netloc(parts.netloc)
    if password is not None:
        url = _with_userinfo(url, user, "***")
        parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(name == "sentinel_password" for name, _ in query):
        shown = [(name, "***" if name == "sentinel_password" else value) for name, value in query]
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(shown, safe="*"), parts.fragment))
    return url


TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")  # redis-py's names, as in a rediss:// URL's query


@dataclass(frozen=True)
class SentinelUrl:
    """``redis+sentinel://[user:pass@]h1:p1,h2:p2,h3:p3/<master>[/<db>][?sentinel_username=…&sentinel_password=…]``
    (``rediss+sentinel://``: TLS to the Sentinels and the data nodes, with ``ssl_ca_certs``, ``ssl_certfile``,
    ``ssl_keyfile`` in the query): the Sentinels to ask, the master's name, and the account on the data nodes
    (the Sentinels have their own, in the query, when they require one)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    username: str | None
    password: str | None
    db: int
    tls: bool
    sentinel_username: str | None
    sentinel_password: str | None
    # with TLS: the CA to trust and this client's certificate and key (ssl_ca_certs, ssl_certfile, ssl_keyfile)
    tls_files: tuple[tuple[str, str], ...] = ()


def _shown(url: str) -> str:
    """A URL for an error about its own form: ``redact``, and everything up to the last ``@`` hidden too (a
    password with a raw ``/``, ``?`` or ``#`` cuts the netloc before it, and redact would miss it)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if sep else "***"
    return redact(url)


def sentinel_url(url: str) -> SentinelUrl:
    """Parse a Sentinel URL; a ConfigError that says what is wrong (never the password)."""
    if "@" in url.partition("://")[2] and "@" not in urlsplit(url).netloc:
        raise ConfigError(f"QT_REDIS_URL: the password must be URL-encoded ({_shown(url)})")
    parts = urlsplit(url)
    user, password, hosts = split_netloc(parts.netloc)
    sentinels = []
    for host in hosts.split(","):
        name, colon, port = host.strip().rpartition(":")
        if not colon or not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"QT_REDIS_URL: {host.strip()!r} is not a Sentinel host:port ({redact(url)})")
        sentinels.append((name.strip("[]"), int(port)))
    path = [piece for piece in parts.path.split("/") if piece]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(f"QT_REDIS_URL: a Sentinel URL ends with /<master name>[/<db>] ({redact(url)})")
    query = dict(parse_qsl(parts.query))
    unknown = set(query) - {"sentinel_username", "sentinel_password", *TLS_FILES}
    if unknown:
        raise ConfigError(f"QT_REDIS_URL: unknown option {sorted(unknown)[0]!r} in a Sentinel URL")
    tls = parts.scheme == "rediss+sentinel"
    if not tls and set(query) & set(TLS_FILES):
        raise ConfigError("QT_REDIS_URL: ssl_* options need rediss+sentinel:// (TLS)")
    return SentinelUrl(
        tuple(sentinels),
        unquote(path[0]),
        user or None,
        password,
        int(path[1]) if len(path) == 2 else 0,
        tls,
        query.get("sentinel_username") or None,
        query.get("sentinel_password") or None,
        tuple((name, query[name]) for name in TLS_FILES if query.get(name)),
    )


def _tls(url: SentinelUrl) -> dict[str, Any]:
    """TLS options for the Sentinels and the data nodes alike (rediss+sentinel: both are reached over TLS)."""
    return {"ssl": True, **dict(url.tls_files)} if url.tls else {}


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

    url = _with_userinfo(url, user, quote(read_secret_file(password_file), safe=""))
    sentinel_password = password_file.with_name("acl-sentinel.pass")  # `qt up --ha`: its Sentinels' password
    parts = urlsplit(url)
    if parts.scheme in SENTINEL_SCHEMES and sentinel_password.exists() and "sentinel_password" not in parts.query:
        query = urlencode([*parse_qsl(parts.query), ("sentinel_password", read_secret_file(sentinel_password))])
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
    return url


def check_url(url: str) -> None:
    """A one-line ConfigError for a URL redis-py cannot use (it would raise a bare ValueError)."""
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        sentinel_url(url)
        return
    if scheme not in SCHEMES:
        shown = f"{scheme}://" if scheme else "no scheme"
        raise ConfigError(
            f"QT_REDIS_URL: {shown} is not a store URL; use redis://, rediss://, unix:// or redis+sentinel://"
        )


def make_client(url: str, watch: StoreWatch | None = None, retry: Retry | None = None) -> aioredis.Redis:
    """The one way the system makes a store client (see the module docstring). ``retry`` is for observers
    that must ride out a restart (``qt chaos``); the services retry at their own level."""
    check_url(url)
    options: dict[str, Any] = {
        "decode_responses": True,
        "encoding_errors": "surrogateescape",
        "protocol": 2,
        "retry": retry or Retry(NoBackoff(), 0),
        "parser_class": _Parser,
        "health_check_interval": 10,
        # a store that stops answering (a hung host, a network partition) is an outage after 5 s, not a wait
        # forever; every blocking read here blocks for 2 s at most, so no healthy read comes near it
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "socket_keepalive": True,
        "max_connections": 512,
    }
    if watch is not None:
        options["redis_connect_func"] = watch.on_connect
    if urlsplit(url).scheme in SENTINEL_SCHEMES:
        client: aioredis.Redis = _sentinel_client(sentinel_url(url), options)
    else:
        client = aioredis.Redis.from_url(url, **options)
    for command, callback in STREAM_CALLBACKS.items():
        client.set_response_callback(command, callback)
    return client


def sync_client(url: str, **options: Any) -> redis.Redis:
    """A blocking client (``qt up``'s own waits, test and chaos tooling) of the store at ``url``, a Sentinel
    URL included: no retries below the caller's."""
    options.setdefault("retry", SyncRetry(SyncNoBackoff(), 0))
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        return redis.Redis.from_url(url, **options)
    parsed = sentinel_url(url)
    sentinel_options: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 1.0, **_sentinel_auth(parsed)}
    sentinel_options |= {"retry": SyncRetry(SyncNoBackoff(), 0), **_tls(parsed)}
    manager = SyncSentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_options)
    node_options = {**options, "db": parsed.db, "username": parsed.username, "password": parsed.password}
    node_options |= _tls(parsed)
    return cast(redis.Redis, manager.master_for(parsed.master, redis_class=SyncSentinelClient, **node_options))


class SyncSentinelClient(redis.Redis):  # type: ignore[misc]
    """sync_client's client of a Sentinel set's primary: closing it closes its Sentinel connections too."""

    def close(self) -> None:
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        super().close()
        for sentinel in getattr(manager, "sentinels", ()):
            sentinel.close()


class SentinelClient(aioredis.Redis):  # type: ignore[misc]
    """A client of the primary a Sentinel set names (redis-py's ``Sentinel.master_for``): each new connection
    asks the Sentinels where the primary is, then checks it as every connection does (a StoreWatch refuses a
    replica). Closing it also closes its connections to the Sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        owner = self.auto_close_connection_pool  # False for a client() sharing the pool: the Sentinels stay open
        await super().aclose(close_connection_pool)
        if isinstance(manager, Sentinel) and (close_connection_pool or (close_connection_pool is None and owner)):
            await manager.aclose()


def _sentinel_client(url: SentinelUrl, options: dict[str, Any]) -> SentinelClient:
    """The project's one retry policy holds for the Sentinels too (redis-py's default retries ten times, and
    its reconnects may stay on an old primary: its issue #3874): no retries below ours, short timeouts (a
    Sentinel that does not answer is skipped for the next one)."""
    sentinel_options: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": 2.0,
        "socket_connect_timeout": 1.0,
        "protocol": 2,
        **_sentinel_auth(url),
        **_tls(url),
    }
    node_options = {**options, "db": url.db, "username": url.username, "password": url.password, **_tls(url)}
    manager = Sentinel(list(url.sentinels), sentinel_kwargs=sentinel_options)
    return cast(SentinelClient, manager.master_for(url.master, redis_class=SentinelClient, **node_options))


def _sentinel_auth(url: SentinelUrl) -> dict[str, str]:
    """The Sentinels' own account, when they require one."""
    auth = {}
    if url.sentinel_username:
        auth["username"] = url.sentinel_username
    if url.sentinel_password:
        auth["password"] = url.sentinel_password
    return auth


async def node_urls(url: str) -> list[str]:
    """Every data node of the store at ``url``, each as a direct URL with the same account: ``url`` itself for
    one server; for a Sentinel URL, the primary and the replicas the Sentinels know (for what is not replicated,
    such as ACL users: ``qt acl --apply``). Raises StoreUnavailable when no Sentinel answers."""
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        return [url]
    parsed = sentinel_url(url)
    options = {"retry": Retry(NoBackoff(), 0), "socket_timeout": 2.0, "socket_connect_timeout": 1.0}
    manager = Sentinel(list(parsed.sentinels), sentinel_kwargs={**options, **_sentinel_auth(parsed), **_tls(parsed)})
    try:
        primary = await manager.discover_master(parsed.master)
        replicas = await manager.discover_slaves(parsed.master)
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"no Sentinel of {redact(url)} named the primary of {parsed.master}: {exc}") from None
    finally:
        await manager.aclose()
    scheme = "rediss" if parsed.tls else "redis"
    account = ""
    if parsed.username or parsed.password:
        account = quote(parsed.username or "", safe="") + ":" + quote(parsed.password or "", safe="") + "@"
    query = f"?{urlencode(parsed.tls_files)}" if parsed.tls_files else ""

    def node(host: str, port: int) -> str:
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        return f"{scheme}://{account}{host}:{port}/{parsed.db}{query}"

    return [node(host, port) for host, port in [primary, *replicas]]


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
