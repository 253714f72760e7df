"""bus/replies.py: pipeline replies queued a fixed number per item, read back as one tuple per item."""

from __future__ import annotations

import pytest

from quantum_trader.bus.replies import in_groups


def test_replies_come_back_one_tuple_per_item_in_order() -> None:
    assert list(in_groups(["s1", "l1", "m1", "s2", "l2", "m2"], 3)) == [("s1", "l1", "m1"), ("s2", "l2", "m2")]
    assert list(in_groups([], 2)) == []


def test_a_reply_count_that_is_not_whole_groups_is_refused() -> None:
    with pytest.raises(ValueError, match="5 replies are not groups of 2"):
        in_groups([1, 2, 3, 4, 5], 2)
