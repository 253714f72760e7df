"""Pipeline replies by name: commands queued a fixed number per item come back as one tuple per item."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any


def in_groups(replies: Sequence[Any], size: int) -> Iterator[tuple[Any, ...]]:
    """``replies`` of ``size`` commands queued per item, as one tuple per item, in the order queued."""
    if len(replies) % size:
        raise ValueError(f"{len(replies)} replies are not groups of {size}")
    items = iter(replies)
    return zip(*[items] * size, strict=True)
