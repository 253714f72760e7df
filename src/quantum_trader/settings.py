"""One typed settings object for every service, read from ``QT_*`` environment variables and an optional TOML file.

Nested sections use ``__``: ``QT_APPLY__PERMIT_WAIT_MS=1500``, ``QT_GOVERNOR__MODE=manual``. A TOML file named by
``QT_CONFIG_FILE`` supplies the same fields (``[apply] permit_wait_ms = 1500``); the environment wins over it.
Every default is visible here, next to what it means.
"""

from __future__ import annotations

import os
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

ExchangeMode = Literal["sim", "testnet", "demo", "live"]
GovernorMode = Literal["auto", "manual"]


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "quantum-trader"


def _split_symbols(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip().upper() for part in value.split(",") if part.strip()]
    return value


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ApplySettings(_Section):
    """Apply (P3).

    permit_wait_ms: how long an EXECUTE plan waits for both permits before ``permit_timeout`` (seed: 1200).
    max_in_flight: plans waiting or executing at once; further proposals stay in the stream until a slot frees.
    min_kill_score: proposals carrying a kill_score below this are SKIPped ``below_threshold``; None disables.
    order_resolve_timeout_s: how long lookups of an order with an unclear outcome may keep failing before the
        plan is left "unknown" (no result, symbol held) for the background resolver.
    max_clock_error_ms: how uncertain this host's offset to the exchange clock may be (half a /time round trip
        plus drift since) before Apply fails closed: plans nothing, calls no order absent (domain/clocks.py).
    max_host_clock_gap_ms: how far two Apply hosts' clocks may differ (errors included) before both fail closed:
        one host's "absent for good" rests on the times another wrote.
    failover_fence_s: how long a primary cut off from its replicas may still take writes: the store's
        ``min-replicas-max-lag`` plus the second its replicas acknowledge in (Redis's default lag is 10 s). After
        a failover, orders of plans the promoted replica does not know may still be sent on the old primary
        that long after the promotion was seen, so they are waited for that much longer (docs/reliability.md).
        Only a promoted replica pays it; a restart does not (its predecessor is gone).
    consume_replicas: how many replicas must have acknowledged a plan's consumed permits (``WAIT``) before its
        order is sent; 0 on a single store. With replicas, 1: a failover then keeps the consume, its intent and
        its audit lines, so the new primary still answers the plan from its own records. Fewer acknowledgements
        within ``consume_replicas_wait_ms``: the order is not sent, the result is ``store_unreplicated``.
    consume_replicas_wait_ms: how long that wait may take (a replica acknowledges within a millisecond on a
        healthy network; below the client's 5 s socket timeout).
    snapshot_max_age_s: a plan's position is P3.3's snapshot (``quantum:position:snapshot:<SYMBOL>``) when it
        was known true at most this long ago, else a read of the exchange (services/apply/position_reads.py).
        0: always the exchange (a request of weight 5 per plan, as before the user-data stream).
    metrics_port: Prometheus endpoint (DESIGN.md: 8043). 0 disables it.
    """

    permit_wait_ms: int = Field(1200, ge=50, le=60_000)
    max_in_flight: int = Field(256, ge=1, le=10_000)
    min_kill_score: float | None = None
    order_resolve_timeout_s: float = Field(30.0, gt=0, le=3600)
    # 250 ms: far above a /time round trip to Binance's API from any host that should trade on it (tens of ms)
    max_clock_error_ms: float = Field(250.0, gt=0, le=5000)
    # 500 ms: NTP keeps hosts within milliseconds; half a second apart, something is broken
    max_host_clock_gap_ms: float = Field(500.0, gt=0, le=10_000)
    failover_fence_s: float = Field(11.0, ge=0, le=600)
    consume_replicas: int = Field(0, ge=0, le=16)
    consume_replicas_wait_ms: int = Field(500, ge=10, le=4000)
    # P3.3's staleness bound (brain.snapshot_max_age_s): a snapshot P3.3 itself would still decide on
    snapshot_max_age_s: float = Field(10.0, ge=0, le=300)
    metrics_port: int = Field(8043, ge=0, le=65535)


class GovernorSettings(_Section):
    """Governor (P3.2).

    mode: ``auto`` decides from policy; ``manual`` issues nothing and waits for ``qt permit grant|deny``.
        ``qt governor mode`` overrides it at run time for all instances.
    allowlist: symbols the Governor will permit; empty means the system-wide ``symbols``.
    cooldown_s: minimum time between two grants for the same symbol.
    max_per_symbol / max_total: grants allowed per ``rate_window_s`` for one symbol / for all symbols.
        Over the limit the plan is denied, never queued.
    max_notional_usdt: largest |qty| x mark price one close may have.
    price_max_age_s: a mark price older than this is not trusted for the notional check (deny).
    metrics_port: Prometheus endpoint (DESIGN.md: 8044). 0 disables it.
    """

    mode: GovernorMode = "auto"
    allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cooldown_s: float = Field(30.0, ge=0)
    rate_window_s: float = Field(60.0, gt=0)
    max_per_symbol: int = Field(6, ge=1)
    max_total: int = Field(60, ge=1)
    max_notional_usdt: Decimal = Field(Decimal("250000"), gt=0)
    price_max_age_s: float = Field(30.0, gt=0)
    metrics_port: int = Field(8044, ge=0, le=65535)

    _split = field_validator("allowlist", mode="before")(_split_symbols)


class BrainSettings(_Section):
    """P3.3 Position State Brain.

    snapshot_interval_s: how often the poller refreshes ``quantum:position:snapshot:<SYMBOL>`` (seed: 5).
    snapshot_max_age_s: an older snapshot is stale and every plan on the symbol is denied (DESIGN: 10).
    qty_tolerance_pct: ledger vs exchange size difference tolerated before ``qty_mismatch`` (DESIGN: 1 %).
    cooldown_s: after an allow, no other allow for the symbol until its result arrives or this passes, and
        none within this time after an executed close (DESIGN: 15).
    metrics_port: Prometheus endpoint (DESIGN.md: 8045). 0 disables it.
    safety_poll_s: while the user-data stream is healthy (``stream.push``) it writes the snapshots and the full
        poll is only the safety net, this often; whenever the stream is not healthy, ``snapshot_interval_s``.
    """

    snapshot_interval_s: float = Field(5.0, gt=0)
    safety_poll_s: float = Field(60.0, gt=0, le=3600)
    snapshot_max_age_s: float = Field(10.0, gt=0)
    qty_tolerance_pct: Decimal = Field(Decimal("1"), ge=0)
    cooldown_s: float = Field(15.0, ge=0)
    metrics_port: int = Field(8045, ge=0, le=65535)


class ExchangeSettings(_Section):
    """Exchange access.

    mode: ``sim`` (the bundled simulator, default), ``testnet``, ``demo`` or ``live``.
    sim_url: base URL of ``qt sim-exchange`` when mode is sim; empty means the one ``qt up`` started.
    sim_port: the port ``qt up`` starts the simulator on.
    api_key / api_secret: credentials; or ``api_key_file`` / ``api_secret_file`` (file must be mode 0600).
    live_confirm: must be exactly ``I-UNDERSTAND-THIS-TRADES-REAL-MONEY`` for mode live.
    recv_window_ms: Binance recvWindow sent with signed requests.
    order_recv_window_ms: the recvWindow of order requests. It bounds how late a lost order request could still
        be accepted; only after it has passed (plus a margin) may an order proven absent be sent once more, and
        only inside the permit window. Shorter allows that resend sooner; the clock is synced to the exchange.
    late_execution_horizon_ms: after an "execution status unknown" answer (-1000/-1006/-1007) or a restart in
        the middle of an order, how long an order may still appear before its absence counts as final.
    timeout_ms: HTTP timeout for one exchange request.
    """

    mode: ExchangeMode = "sim"
    sim_url: str = ""
    sim_port: int = Field(8041, ge=1, le=65535)
    api_key: SecretStr | None = None
    api_secret: SecretStr | None = None
    api_key_file: Path | None = None
    api_secret_file: Path | None = None
    live_confirm: str = ""
    recv_window_ms: int = Field(5000, ge=1, le=60_000)
    order_recv_window_ms: int = Field(1000, ge=100, le=60_000)
    late_execution_horizon_ms: int = Field(10_000, ge=500, le=600_000)
    timeout_ms: int = Field(5000, ge=100, le=120_000)


class StreamSettings(_Section):
    """Binance's user-data stream (exchange/userstream.py): positions, fills and mark prices pushed by the
    exchange instead of polled.

    push: follow the stream. False: poll only, as before the stream existed (a rollback switch for an incident:
        the services behave exactly as without it).
    url: the WebSocket base; empty means the mode's: the simulator's own for sim, wss://fstream.binancefuture.com
        for testnet and demo, wss://fstream.binance.com for live.
    keepalive_s: the listen key is extended (PUT) this often; Binance closes a key 60 minutes after its last
        extension, so 30 minutes leaves one failed PUT room for another.
    silence_s: a connection with mark price streams gets a frame every second; none for this long and it is
        taken as dead (a half-open connection answers nothing) and replaced.
    ping_s: WebSocket pings this often; no pong within as long again and the connection is replaced.
    backoff_min_s / backoff_max_s: the wait before reconnecting, doubled after each failure up to the max
        (with jitter, so several processes do not reconnect in step).
    """

    push: bool = True
    url: str = ""
    keepalive_s: float = Field(1800.0, gt=0, le=3300)
    silence_s: float = Field(5.0, gt=1, le=600)
    ping_s: float = Field(20.0, gt=0, le=300)
    backoff_min_s: float = Field(0.2, gt=0, le=60)
    backoff_max_s: float = Field(30.0, gt=0, le=600)


class JournalSettings(_Section):
    """The local audit log (journal.py): every audit, result, ledger and operator line a process writes to the
    store, also appended to a file on its own host, so the trail survives a failover or a store that forgets.

    dir: where the files go; empty means ``<state dir>/journal``. Give it its own disk if you can.
    max_mb: a file is rotated at this size; keep: the rotated files kept per process (64 MB x 10: weeks of
        trading at a few hundred plans an hour, about 1 KB of lines per plan).
    fsync_ms: written lines are fsynced within this long (a power loss loses at most this much of the journal;
        a killed process loses nothing: each line is in the kernel when the write returns).
    """

    dir: Path | None = None
    max_mb: int = Field(64, ge=1, le=4096)
    keep: int = Field(10, ge=1, le=1000)
    fsync_ms: int = Field(200, ge=10, le=10_000)


class WebSettings(_Section):
    """The dashboard (`qt web`, started by `qt up`).

    port / host: where it listens (loopback by default: put a TLS proxy in front to reach it from elsewhere).
    allowed_hosts: the Host headers it answers (comma-separated; others get 400: no DNS-rebinding page can
        read it or flip the switch); add your proxy's name.
    max_clients: live pages served at once (each extra one is refused with 503; they all share one reader).
    operator_token: what the page must send to flip the kill switch; or ``operator_token_file`` (0600). Without
        either, ``<state dir>/secrets/web-operator.token``, which `qt up` generates.
    """

    port: int = Field(8040, ge=0, le=65535)
    host: str = "127.0.0.1"
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.1", "localhost"])
    max_clients: int = Field(16, ge=1, le=1000)
    operator_token: SecretStr | None = None
    operator_token_file: Path | None = None

    _split = field_validator("allowed_hosts", mode="before")(_split_list)


class KeySettings(_Section):
    """Permit signing keys (HMAC-SHA256), one per issuer. From the environment, or a 0600 file.

    Without either, the key files ``qt up`` generates under the state directory are used.
    """

    governor: SecretStr | None = None
    p33: SecretStr | None = None
    governor_file: Path | None = None
    p33_file: Path | None = None


class Settings(BaseSettings):
    """Everything a service reads.

    redis_url: an external Redis >= 7 / Valkey; empty means the embedded Valkey of the running ``qt up``.
    state_dir: where the embedded store keeps its data, generated keys live and ``qt up`` records itself.
    symbols: the managed symbols: Apply's allowlist, P3.3's snapshot set, the Governor's default allowlist.
    permit_ttl_s: lifetime of a permit key, and the age after which Apply rejects a permit as expired.
    audit_maxlen: approximate number of entries the audit stream keeps (older ones are trimmed).
    consumer_name: this instance's consumer name in its groups; empty means "<hostname>-<service>". Give
        each instance of a service its own name when several run.
    claim_idle_s: an entry pending this long with another consumer is taken over (the peer is presumed dead).
        Apply uses at least its window plus the whole order resolution, so it never takes a live peer's plan.
    max_deliveries: an entry delivered more often than this is dead-lettered with its history.
    log_json: structured JSON logs instead of console lines.
    event_loop: the services' event loop: the standard library's ``asyncio`` or ``uvloop``. ``qt bench
        --event-loop`` compares them; on the 2-core machine they measured within noise of each other
        (docs/performance.md), so the default is the one with fewer moving parts.
    """

    model_config = SettingsConfigDict(
        env_prefix="QT_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
        toml_file=None,
    )

    redis_url: str = ""
    state_dir: Path = Field(default_factory=_default_state_dir)
    symbols: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT"]
    )
    permit_ttl_s: int = Field(60, ge=5, le=3600)
    audit_maxlen: int = Field(1_000_000, ge=1000)
    consumer_name: str = ""
    claim_idle_s: float = Field(30.0, ge=1, le=3600)
    max_deliveries: int = Field(5, ge=1, le=1000)
    log_json: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"

    apply: ApplySettings = Field(default_factory=ApplySettings)
    governor: GovernorSettings = Field(default_factory=GovernorSettings)
    brain: BrainSettings = Field(default_factory=BrainSettings)
    exchange: ExchangeSettings = Field(default_factory=ExchangeSettings)
    keys: KeySettings = Field(default_factory=KeySettings)
    web: WebSettings = Field(default_factory=WebSettings)
    journal: JournalSettings = Field(default_factory=JournalSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)

    _split = field_validator("symbols", mode="before")(_split_symbols)

    @field_validator("symbols")
    @classmethod
    def _check_symbols(cls, value: list[str]) -> list[str]:
        bad = [s for s in value if not s.isalnum() or not 5 <= len(s) <= 20]
        if bad:
            raise ValueError(f"not a USD-M symbol: {', '.join(bad)}")
        return value

    @property
    def journal_dir(self) -> Path:
        return self.journal.dir or self.state_dir / "journal"

    @property
    def governor_allowlist(self) -> frozenset[str]:
        return frozenset(self.governor.allowlist or self.symbols)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("QT_CONFIG_FILE")
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"QT_CONFIG_FILE={config_file}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names it."""


def describe_validation_error(error: ValidationError) -> str:
    """One line per bad field, named the way the operator set it (``QT_APPLY__PERMIT_WAIT_MS``)."""
    lines = []
    for item in error.errors():
        path = "__".join(str(p) for p in item["loc"]).upper()
        given = item.get("input")
        # Never echo anything that could be a credential back into a log or terminal.
        secret = any(word in path for word in ("KEY", "SECRET", "TOKEN", "PASSWORD"))
        shown = "" if isinstance(given, dict) or secret else f" (got {given!r})"
        lines.append(f"QT_{path}: {item['msg']}{shown}")
    return "; ".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning validation failures into a ConfigError that names each bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {describe_validation_error(exc)}") from None
    except SettingsError as exc:  # e.g. QT_APPLY='not json'
        found = re.search(r'field "(\w+)"', str(exc))
        name = f"QT_{found.group(1).upper()}" if found else "a QT_* variable"
        raise ConfigError(
            f"invalid configuration: {name} could not be parsed (a section takes JSON; "
            f"or set one field, e.g. {name}__FIELD=value)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"QT_CONFIG_FILE={os.environ.get('QT_CONFIG_FILE')}: not valid TOML: {exc}") from None
