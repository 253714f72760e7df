"""A log call never raises (logs.Log): whatever its fields, the service goes on."""

from __future__ import annotations

import json

import pytest

from quantum_trader import logs


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("cannot be shown")

    __str__ = __repr__


@pytest.mark.parametrize("as_json", [False, True])
def test_no_log_call_can_raise(as_json: bool, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(json=as_json)
    log = logs.get("test")
    log.info("a field named like structlog's own", event="started")  # the NOREPLICAS crash of issue 11
    log.warning("bytes that are not text", value=b"\xff".decode("utf-8", "surrogateescape"))
    log.error("an object that cannot be printed", obj=Unprintable())
    log.bind(plan_id="0123456789abcdef").exception("no exception in flight")
    err = capsys.readouterr().err
    assert "event_" in err and "started" in err
    assert "[log failed: RuntimeError: cannot be shown] error: 'an object that cannot be printed'" in err
    if as_json:
        first = json.loads(err.splitlines()[0])
        assert first["event"] == "a field named like structlog's own" and first["event_"] == "started"
    logs.configure()
