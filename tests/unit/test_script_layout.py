"""bus/scripts.py Layout: a script's keys and arguments by name, packed into KEYS/ARGV and bound back to the
same names in Lua (the scripts' behaviour itself: tests/integration/test_scripts.py, on real stores)."""

from __future__ import annotations

import pytest

from quantum_trader.bus.scripts import ISSUE_PERMIT_LAYOUT, Layout

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
        ({"stream": "s", "hold": None, "mark": None}, {"plan_id": "p", "ttl_s": 1, "fields": []}, "missing"),
        (
            {"stream": "s", "hold": None, "mark": None, "counts": [], "extra": "x"},
            {"plan_id": "p", "ttl_s": 1, "fields": []},
            "not in the layout",
        ),
        ({"stream": "s", "hold": None, "mark": None, "counts": []}, {"plan_id": "p", "fields": []}, "missing"),
        (
            {"stream": "", "hold": None, "mark": None, "counts": []},
            {"plan_id": "p", "ttl_s": 1, "fields": []},
            "required",
        ),
    ],
)
def test_a_name_missing_extra_or_an_empty_required_key_is_refused(named_keys, named_args, error: str) -> None:
    with pytest.raises(TypeError, match=error):
        LAYOUT.pack(named_keys, named_args)


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
