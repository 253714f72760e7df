"""Store URLs (bus/connection.py): a Sentinel set's URL parsed, shown without its passwords, and given a
service's account, as `qt up --ha` and the deployment write them."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantum_trader.bus.connection import check_url, redact, sentinel_url, with_credentials
from quantum_trader.settings import ConfigError


def test_a_sentinel_url_names_every_sentinel_the_master_and_the_data_nodes_account() -> None:
    url = sentinel_url("redis+sentinel://qt-apply:s%40cret@10.0.0.1:26379,10.0.0.2:26380,[::1]:26381/qtm/2")
    assert url.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381))
    assert (url.master, url.db, url.username, url.password, url.tls) == ("qtm", 2, "qt-apply", "s@cret", False)
    assert url.sentinel_username is None and url.sentinel_password is None


def test_the_sentinels_own_account_and_tls_come_from_the_url() -> None:
    url = sentinel_url("rediss+sentinel://h1:26379/qtm?sentinel_username=sen&sentinel_password=pw")
    assert (url.tls, url.db, url.username, url.password) == (True, 0, None, None)
    assert (url.sentinel_username, url.sentinel_password) == ("sen", "pw")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1:26379", "/<master name>"),
        ("redis+sentinel://h1:26379/qtm/zero", "/<master name>"),
        ("redis+sentinel://h1/qtm", "'h1' is not a Sentinel host:port"),
        ("redis+sentinel://:pw@h1:99999/qtm", "'h1:99999' is not a Sentinel host:port"),
        ("redis+sentinel://h1:1/qtm?password=x", "unknown option 'password'"),
        ("redis+sentinel://:pw@h1:1/qtm?ssl_ca_certs=/ca.crt", "ssl_* options need rediss+sentinel://"),
        ("rediss+sentinel://:pw@h1:1/qtm?ssl_cert_reqs=none", "unknown option 'ssl_cert_reqs'"),
    ],
)
def test_a_malformed_sentinel_url_says_what_is_wrong_and_never_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        check_url(url)
    assert says in str(raised.value) and ":pw@" not in str(raised.value)


def test_redact_hides_every_password_of_a_sentinel_url() -> None:
    shown = redact("redis+sentinel://qt-apply:hunter2@h1:26379,h2:26380/qtm?sentinel_password=s3cret")
    assert "hunter2" not in shown and "s3cret" not in shown
    assert shown.startswith("redis+sentinel://qt-apply:***@h1:26379,h2:26380/qtm")
    assert redact("redis://:hunter2@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_services_account_is_written_into_a_sentinel_url(tmp_path: Path) -> None:
    secret = tmp_path / "acl-apply.pass"
    secret.write_text("p@ss/word\n")
    secret.chmod(0o600)
    url = with_credentials("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/qtm", "qt-apply", secret)
    parsed = sentinel_url(url)
    assert (parsed.username, parsed.password) == ("qt-apply", "p@ss/word")
    assert parsed.sentinels == (("127.0.0.1", 26379), ("127.0.0.1", 26380))
    plain = with_credentials("redis://127.0.0.1:6379/0", "qt-apply", secret)
    assert plain == "redis://qt-apply:p%40ss%2Fword@127.0.0.1:6379/0"


def test_the_sentinels_password_is_added_when_qt_up_ha_made_one(tmp_path: Path) -> None:
    for role, password in (("operator", "op-pass"), ("sentinel", "sen/pass")):
        secret = tmp_path / f"acl-{role}.pass"
        secret.write_text(password + "\n")
        secret.chmod(0o600)
    url = with_credentials("redis+sentinel://127.0.0.1:26379/qtm", "qt-operator", tmp_path / "acl-operator.pass")
    parsed = sentinel_url(url)
    assert (parsed.username, parsed.password, parsed.sentinel_password) == ("qt-operator", "op-pass", "sen/pass")
    assert "sen/pass" not in redact(url) and "op-pass" not in redact(url)


def test_a_password_that_is_not_url_encoded_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as raised:
        check_url("redis+sentinel://qt-apply:ab/c?d@h1:26379/qtm")
    message = str(raised.value)
    assert "URL-encoded" in message and "ab/c" not in message and "c?d" not in message
