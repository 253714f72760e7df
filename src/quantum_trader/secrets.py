"""Secrets: permit signing keys and exchange credentials, from the environment or a 0600 file.

Nothing here ever formats a secret into a message: errors name the variable or the file, never the value.
"""

from __future__ import annotations

import os
import secrets as _random
import stat
from pathlib import Path

from pydantic import SecretStr

from quantum_trader.settings import ConfigError, Settings

KEY_DIR = "secrets"


# The store's ACL users, one password file each: one per service and operator role (bus/acl.py defines their
# rights), and the admin that sets the store up. Named here, below the bus, because the secrets are made here.
# the services, the operator's commands, the dashboard, the admin; and the store's own: replication between
# its nodes and the Sentinels that watch them (a high-availability store, `qt up --ha`, docs/deployment.md)
ACL_ROLES = ("apply", "governor", "brain", "operator", "web", "admin", "replica", "sentinel")


def read_secret_file(path: Path) -> str:
    """The file's content (stripped). Refuses files readable by group or others."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise ConfigError(f"secret file {path} does not exist") from None
    if mode & 0o077:
        raise ConfigError(f"secret file {path} must be mode 0600 (it is {mode:04o}): chmod 600 {path}")
    value = path.read_text(encoding="utf-8").strip()
    if not value:
        raise ConfigError(f"secret file {path} is empty")
    return value


def write_secret_file(path: Path, value: str) -> None:
    """Create ``path`` with mode 0600 from the start (never world-readable, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    os.chmod(path, 0o600)


def _resolve(value: SecretStr | None, file: Path | None, default_file: Path, what: str, env: str) -> str:
    if value is not None and value.get_secret_value():
        return value.get_secret_value()
    if file is not None:
        return read_secret_file(file)
    if default_file.exists():
        return read_secret_file(default_file)
    raise ConfigError(f"no {what}: set {env} or {env}_FILE (a 0600 file), or start the system with `qt up`")


def key_dir(settings: Settings) -> Path:
    return settings.state_dir / KEY_DIR


def permit_key(settings: Settings, issuer: str) -> bytes:
    """The HMAC key of ``issuer`` ("governor" or "p33")."""
    keys = settings.keys
    value, file = (keys.governor, keys.governor_file) if issuer == "governor" else (keys.p33, keys.p33_file)
    env = f"QT_KEYS__{issuer.upper()}"
    secret = _resolve(value, file, key_dir(settings) / f"{issuer}.key", f"{issuer} permit key", env)
    return secret.encode()


def web_operator_token(settings: Settings) -> str:
    """The token the dashboard asks for before it flips the kill switch."""
    web = settings.web
    return _resolve(
        web.operator_token,
        web.operator_token_file,
        key_dir(settings) / "web-operator.token",
        "dashboard operator token",
        "QT_WEB__OPERATOR_TOKEN",
    )


def exchange_credentials(settings: Settings) -> tuple[str, str]:
    ex = settings.exchange
    mode_dir = key_dir(settings)
    key = _resolve(
        ex.api_key,
        ex.api_key_file,
        mode_dir / f"{ex.mode}-api.key",
        "exchange API key",
        "QT_EXCHANGE__API_KEY",
    )
    secret = _resolve(
        ex.api_secret,
        ex.api_secret_file,
        mode_dir / f"{ex.mode}-api.secret",
        "exchange API secret",
        "QT_EXCHANGE__API_SECRET",
    )
    return key, secret


def ensure_local_secrets(settings: Settings) -> None:
    """Generate the keys a local system needs (permit keys, simulator credentials) if they do not exist."""
    directory = key_dir(settings)
    names = ["governor.key", "p33.key", "sim-api.key", "sim-api.secret", "sim-admin.token", "web-operator.token"]
    names += [f"acl-{role}.pass" for role in ACL_ROLES]
    for name in names:
        path = directory / name
        if not path.exists():
            write_secret_file(path, _random.token_hex(32))


def new_token() -> str:
    return _random.token_hex(32)
