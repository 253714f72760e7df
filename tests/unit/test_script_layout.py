"""bus/lua.py Layout: a script's keys and arguments by name, packed into KEYS/ARGV and bound back to the
same names in Lua (the scripts' behaviour itself: tests/integration/test_scripts.py, on real stores)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from quantum_trader.bus import keys
from quantum_trader.bus.lua import Layout, one_of
from quantum_trader.bus.scripts import ISSUE_PERMIT_LAYOUT, PermitWrite

LAYOUT = Layout(keys=("stream", "hold?", "mark?", "counts*"), args=("plan_id", "ttl_s", "fields*"))


def test_optional_keys_left_out_are_absent_from_keys_and_marked_absent_in_argv() -> None:
    keys, args = LAYOUT.pack(
        {"stream": "s", "hold": None, "mark": "m", "counts": ["c1", "c2"]},
        {"plan_id": "p", "ttl_s": 60, "fields": ["a", "1", "b", "2"]},
    )
    assert keys == ["s", "m", "c1", "c2"]  # no dummy key for the missing hold
    assert args == ["01", "p", 60, "a", "1", "b", "2"]


def test_a_layout_without_optional_keys_has_no_presence_argument() -> None:
    keys, args = Layout(keys=("a", "b"), args=("x",)).pack({"a": "k1", "b": "k2"}, {"x": "1"})
    assert (keys, args) == (["k1", "k2"], ["1"])


@pytest.mark.parametrize(
    ("named_keys", "named_args", "error"),
    [
        (
            {"stream": "s", "hold": None, "mark": None},
            {"plan_id": "p", "ttl_s": 1, "fields": []},
            "script keys: missing ['counts'], not in the layout []",
        ),
        (
            {"stream": "s", "hold": None, "mark": None, "counts": [], "extra": "x"},
            {"plan_id": "p", "ttl_s": 1, "fields": []},
            "script keys: missing [], not in the layout ['extra']",
        ),
        (
            {"stream": "s", "hold": None, "mark": None, "counts": []},
            {"plan_id": "p", "fields": [], "ttl": 1},
            "script args: missing ['ttl_s'], not in the layout ['ttl']",
        ),
        (
            {"stream": "", "hold": None, "mark": None, "counts": []},
            {"plan_id": "p", "ttl_s": 1, "fields": []},
            "script key stream is required",
        ),
    ],
)
def test_a_name_missing_extra_or_an_empty_required_key_is_refused(named_keys, named_args, error: str) -> None:
    with pytest.raises(TypeError) as refused:
        LAYOUT.pack(named_keys, named_args)
    assert str(refused.value) == error


def test_the_permit_write_declares_the_plan_stream_only_when_it_acknowledges_an_entry() -> None:
    """The operator's grant acknowledges nothing: declaring the plan stream would need rights it does not have
    (EVALSHA checks every declared key read-write) and would acknowledge an empty id."""
    operator = PermitWrite("claim", "owner", "permit", "{}", 60, {"a": "1"}, 100)
    script_keys, args = operator.keys_and_args()
    assert script_keys == ["claim", "permit", keys.AUDIT_STREAM] and args[0] == "000"
    governor = replace(operator, group=keys.GOVERNOR_GROUP, entry_id="1-0")
    script_keys, args = governor.keys_and_args()
    assert script_keys == ["claim", "permit", keys.AUDIT_STREAM, keys.PLAN_STREAM] and args[0] == "100"
    brain = replace(governor, mark_key="mark", mark_value="plan", mark_unless="seen")
    script_keys, args = brain.keys_and_args()
    assert script_keys == ["claim", "permit", keys.AUDIT_STREAM, keys.PLAN_STREAM, "mark", "seen"]
    assert args[0] == "111"


def test_a_reply_no_wrapper_knows_is_an_error_naming_it() -> None:
    assert one_of(("ok", "busy"), "busy") == "busy"
    with pytest.raises(ValueError) as refused:
        one_of(("ok", "busy"), "nope")
    assert str(refused.value) == "script replied 'nope', not one of ('ok', 'busy')"


def test_the_prologue_binds_each_name_to_its_position() -> None:
    lines = LAYOUT.prologue().splitlines()
    assert lines == [
        "local nk = 1",
        "local stream = KEYS[nk]; nk = nk + 1",
        "local hold = nil",
        "if string.sub(ARGV[1], 1, 1) == '1' then hold = KEYS[nk]; nk = nk + 1 end",
        "local mark = nil",
        "if string.sub(ARGV[1], 2, 2) == '1' then mark = KEYS[nk]; nk = nk + 1 end",
        "local counts = {unpack(KEYS, nk)}",
        "local plan_id = ARGV[2]",
        "local ttl_s = ARGV[3]",
        "local fields = {unpack(ARGV, 4)}",
    ]


def test_the_permit_scripts_acknowledged_stream_is_a_declared_key() -> None:
    assert "plans?" in ISSUE_PERMIT_LAYOUT.keys and "group" in ISSUE_PERMIT_LAYOUT.args
