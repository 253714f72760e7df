"""Settings from QT_* variables and a TOML file; secrets from the environment or 0600 files, never echoed."""

from __future__ import annotations

import os
import stat
from decimal import Decimal
from pathlib import Path

import pytest

from quantum_trader.secrets import (
    exchange_credentials,
    key_dir,
    permit_key,
    read_secret_file,
    write_secret_file,
)
from quantum_trader.settings import ConfigError, Settings, load_settings

SECRET = "hunter2-do-not-print-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No QT_* variable from the machine leaks into a test; the default state dir is under tmp_path."""
    for name in list(os.environ):
        if name.startswith("QT_"):
            monkeypatch.delenv(name)
    state = tmp_path / "xdg-state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


def toml(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "qt.toml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("QT_CONFIG_FILE", str(path))
    return path


def config_error(**overrides: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    return str(info.value)


# --- settings ---------------------------------------------------------------------------------------------


def test_defaults(clean_env: Path) -> None:
    s = load_settings()
    assert s.apply.permit_wait_ms == 1200
    assert s.symbols == ["BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT", "XRPUSDT"]
    assert s.state_dir == clean_env / "quantum-trader"
    assert s.brain.qty_tolerance_pct == Decimal("1")
    assert s.exchange.mode == "sim"
    assert s.keys.governor is None


def test_nested_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_APPLY__PERMIT_WAIT_MS", "1500")
    monkeypatch.setenv("QT_GOVERNOR__MODE", "manual")
    monkeypatch.setenv("QT_GOVERNOR__MAX_NOTIONAL_USDT", "1000.5")
    monkeypatch.setenv("QT_BRAIN__COOLDOWN_S", "0")
    s = load_settings()
    assert s.apply.permit_wait_ms == 1500
    assert s.apply.max_in_flight == 256  # the rest of the section keeps its defaults
    assert s.governor.mode == "manual"
    assert s.governor.max_notional_usdt == Decimal("1000.5")
    assert s.brain.cooldown_s == 0


def test_comma_separated_symbols(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_SYMBOLS", " btcusdt, ETHUSDT ,,solusdt ")
    monkeypatch.setenv("QT_GOVERNOR__ALLOWLIST", "btcusdt")
    s = load_settings()
    assert s.symbols == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    assert s.governor.allowlist == ["BTCUSDT"]
    assert s.governor_allowlist == frozenset({"BTCUSDT"})


def test_governor_allowlist_defaults_to_symbols(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_SYMBOLS", "BTCUSDT,ETHUSDT")
    assert load_settings().governor_allowlist == frozenset({"BTCUSDT", "ETHUSDT"})


@pytest.mark.parametrize("value", ["BTC", "BTC-USDT", "A" * 21])
def test_bad_symbol_names_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("QT_SYMBOLS", f"BTCUSDT,{value}")
    message = config_error()
    assert "QT_SYMBOLS" in message
    assert value.upper() in message


def test_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml(
        tmp_path,
        'symbols = ["BTCUSDT", "ETHUSDT"]\npermit_ttl_s = 30\n\n[apply]\npermit_wait_ms = 1500\nmax_in_flight = 10\n'
        '\n[governor]\nmode = "manual"\n',
        monkeypatch,
    )
    s = load_settings()
    assert s.symbols == ["BTCUSDT", "ETHUSDT"]
    assert s.permit_ttl_s == 30
    assert s.apply.permit_wait_ms == 1500
    assert s.apply.max_in_flight == 10
    assert s.governor.mode == "manual"


def test_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml(tmp_path, "permit_ttl_s = 30\n[apply]\npermit_wait_ms = 1500\nmax_in_flight = 10\n", monkeypatch)
    monkeypatch.setenv("QT_APPLY__PERMIT_WAIT_MS", "2000")
    monkeypatch.setenv("QT_PERMIT_TTL_S", "90")
    s = load_settings()
    assert s.apply.permit_wait_ms == 2000
    assert s.permit_ttl_s == 90
    assert s.apply.max_in_flight == 10  # the file's other values in the same section survive


def test_init_overrides_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QT_STATE_DIR", str(tmp_path / "from-env"))
    assert load_settings().state_dir == tmp_path / "from-env"
    assert load_settings(state_dir=tmp_path / "explicit").state_dir == tmp_path / "explicit"


def test_missing_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QT_CONFIG_FILE", str(tmp_path / "nope.toml"))
    message = config_error()
    assert "QT_CONFIG_FILE" in message
    assert "nope.toml" in message


def test_unparsable_config_file_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = toml(tmp_path, "[apply\npermit_wait_ms = ", monkeypatch)
    assert str(path) in config_error()


def test_unparsable_section_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_APPLY", "permit_wait_ms=5")
    assert "QT_APPLY" in config_error()


@pytest.mark.parametrize(
    ("name", "value", "shown"),
    [
        ("QT_APPLY__PERMIT_WAIT_MS", "abc", "'abc'"),
        ("QT_APPLY__PERMIT_WAIT_MS", "10", "'10'"),  # below the minimum of 50
        ("QT_PERMIT_TTL_S", "4", "'4'"),
        ("QT_EXCHANGE__MODE", "paper", "'paper'"),
        ("QT_GOVERNOR__MAX_NOTIONAL_USDT", "-1", "'-1'"),
        ("QT_LOG_LEVEL", "loud", "'loud'"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str, shown: str) -> None:
    monkeypatch.setenv(name, value)
    message = config_error()
    assert message.startswith("invalid configuration: ")
    assert f"{name}: " in message
    assert shown in message  # non-secret values are shown to help the operator


def test_bad_value_in_toml_names_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml(tmp_path, "[apply]\npermit_wait_ms = 'soon'\n", monkeypatch)
    assert "QT_APPLY__PERMIT_WAIT_MS" in config_error()


def test_every_bad_variable_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_APPLY__PERMIT_WAIT_MS", "x")
    monkeypatch.setenv("QT_BRAIN__COOLDOWN_S", "-1")
    message = config_error()
    assert "QT_APPLY__PERMIT_WAIT_MS" in message
    assert "QT_BRAIN__COOLDOWN_S" in message


# --- secrets never echoed ---------------------------------------------------------------------------------


def test_misspelt_key_variable_does_not_echo_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_KEYS__GOVERNR", SECRET)
    message = config_error()
    assert "QT_KEYS__GOVERNR" in message
    assert SECRET not in message


def test_bad_key_values_in_toml_are_not_echoed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    toml(
        tmp_path,
        f'[keys]\ngovernor = ["{SECRET}"]\n[exchange]\napi_secret = ["{SECRET}"]\napi_key = 1234567\n',
        monkeypatch,
    )
    message = config_error()
    assert "QT_KEYS__GOVERNOR" in message
    assert "QT_EXCHANGE__API_SECRET" in message
    assert "QT_EXCHANGE__API_KEY" in message
    assert SECRET not in message
    assert "1234567" not in message


def test_keys_section_as_json_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_KEYS", f'{{"governor": "{SECRET}", "extra": "{SECRET}"}}')
    message = config_error()
    assert "QT_KEYS__EXTRA" in message
    assert SECRET not in message


def test_secret_values_are_masked_in_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QT_KEYS__GOVERNOR", SECRET)
    monkeypatch.setenv("QT_EXCHANGE__API_SECRET", SECRET)
    s = load_settings()
    assert SECRET not in repr(s)
    assert SECRET not in str(s.model_dump())
    assert s.keys.governor is not None
    assert s.keys.governor.get_secret_value() == SECRET


# --- secret files -----------------------------------------------------------------------------------------


def test_write_secret_file_creates_0600(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "governor.key"
    write_secret_file(path, SECRET)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert read_secret_file(path) == SECRET


def test_write_secret_file_tightens_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "p33.key"
    path.write_text("old")
    path.chmod(0o644)
    write_secret_file(path, "new-value")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_secret_file(path) == "new-value"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666])
def test_read_secret_file_refuses_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "governor.key"
    path.write_text(SECRET)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        read_secret_file(path)
    message = str(info.value)
    assert "0600" in message
    assert f"{mode:04o}" in message
    assert str(path) in message
    assert SECRET not in message


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_read_secret_file_accepts_owner_only(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "governor.key"
    path.write_text(f"  {SECRET}\n\n")
    path.chmod(mode)
    assert read_secret_file(path) == SECRET


def test_read_secret_file_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_secret_file(tmp_path / "absent.key")
    empty = tmp_path / "empty.key"
    write_secret_file(empty, "  ")
    with pytest.raises(ConfigError, match="empty"):
        read_secret_file(empty)


# --- permit key resolution --------------------------------------------------------------------------------


def _settings(tmp_path: Path) -> Settings:
    return load_settings(state_dir=tmp_path / "state")


def test_permit_key_from_env_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    file = tmp_path / "gov.key"
    write_secret_file(file, "from-file")
    monkeypatch.setenv("QT_KEYS__GOVERNOR", "from-env")
    monkeypatch.setenv("QT_KEYS__GOVERNOR_FILE", str(file))
    s = _settings(tmp_path)
    write_secret_file(key_dir(s) / "governor.key", "from-default")
    assert permit_key(s, "governor") == b"from-env"


def test_permit_key_from_file_before_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    file = tmp_path / "p33.key"
    write_secret_file(file, "from-file")
    monkeypatch.setenv("QT_KEYS__P33_FILE", str(file))
    s = _settings(tmp_path)
    write_secret_file(key_dir(s) / "p33.key", "from-default")
    assert permit_key(s, "p33") == b"from-file"


def test_empty_env_value_falls_through_to_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    file = tmp_path / "gov.key"
    write_secret_file(file, "from-file")
    monkeypatch.setenv("QT_KEYS__GOVERNOR", "")
    monkeypatch.setenv("QT_KEYS__GOVERNOR_FILE", str(file))
    assert permit_key(_settings(tmp_path), "governor") == b"from-file"


def test_permit_key_from_default_file_in_state_dir(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    assert key_dir(s) == tmp_path / "state" / "secrets"
    write_secret_file(key_dir(s) / "governor.key", "from-default")
    write_secret_file(key_dir(s) / "p33.key", "p33-default")
    assert permit_key(s, "governor") == b"from-default"
    assert permit_key(s, "p33") == b"p33-default"


def test_named_key_file_with_bad_mode_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    file = tmp_path / "gov.key"
    file.write_text(SECRET)
    file.chmod(0o644)
    monkeypatch.setenv("QT_KEYS__GOVERNOR_FILE", str(file))
    s = _settings(tmp_path)
    write_secret_file(key_dir(s) / "governor.key", "from-default")  # not used as a fallback
    with pytest.raises(ConfigError, match="0600") as info:
        permit_key(s, "governor")
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(("issuer", "env"), [("governor", "QT_KEYS__GOVERNOR"), ("p33", "QT_KEYS__P33")])
def test_no_permit_key_is_a_config_error(tmp_path: Path, issuer: str, env: str) -> None:
    with pytest.raises(ConfigError) as info:
        permit_key(_settings(tmp_path), issuer)
    message = str(info.value)
    assert env in message
    assert f"{env}_FILE" in message


def test_exchange_credentials_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QT_EXCHANGE__API_KEY", "key-from-env")
    s = _settings(tmp_path)
    with pytest.raises(ConfigError, match="QT_EXCHANGE__API_SECRET"):
        exchange_credentials(s)
    write_secret_file(key_dir(s) / "sim-api.secret", "secret-from-default")
    assert exchange_credentials(s) == ("key-from-env", "secret-from-default")
