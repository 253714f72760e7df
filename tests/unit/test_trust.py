"""When the store's word is complete for a plan (pure rules of domain/trust.py)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quantum_trader.domain.trust import (
    Epoch,
    StoreIdentity,
    prior_sends_signed_before,
    started_before_ms,
    stream_id,
    trusted,
)

IDENTITY = StoreIdentity("run-1", "repl-1")
EPOCH = Epoch(IDENTITY, (1_700_000_000_000, 3), since=1_700_000_100.0)


@pytest.mark.parametrize(
    ("entry_id", "expected"),
    [
        ("1700000000000-4", True),  # after the floor, same millisecond
        ("1700000000001-0", True),
        ("1700000000000-3", False),  # the floor itself existed before the instance was first used
        ("1700000000000-2", False),
        ("1699999999999-9", False),
        ("garbage", False),
        ("", False),
    ],
)
def test_only_proposals_after_the_floor_are_vouched_for(entry_id: str, expected: bool) -> None:
    assert trusted(EPOCH, entry_id, now=1_700_000_100.0) is expected


def test_without_an_epoch_nothing_is_vouched_for() -> None:
    assert trusted(None, "9999999999999-0", now=1_700_000_100.0) is False


def test_a_proposal_nearly_as_old_as_the_records_live_is_not_vouched_for() -> None:
    """Its plan's markers may have expired (a day): the store's silence about it proves nothing."""
    from quantum_trader.domain.trust import TRUST_MAX_AGE_S

    young = f"{1_700_000_001_000}-0"
    assert trusted(EPOCH, young, now=1_700_000_001.0 + TRUST_MAX_AGE_S - 1) is True
    assert trusted(EPOCH, young, now=1_700_000_001.0 + TRUST_MAX_AGE_S + 1) is False


@given(a=st.tuples(st.integers(0, 2**48), st.integers(0, 99)), b=st.tuples(st.integers(0, 2**48), st.integers(0, 99)))
def test_stream_ids_compare_as_the_store_orders_them(a: tuple[int, int], b: tuple[int, int]) -> None:
    assert (stream_id(f"{a[0]}-{a[1]}") < stream_id(f"{b[0]}-{b[1]}")) == (a < b)


def test_forgotten_sends_were_signed_before_the_instance_began_plus_one_window() -> None:
    # no plan record: the attempt consumed on an earlier instance, so before `since`, and signed inside its window
    assert prior_sends_signed_before(EPOCH, None, 1.2, now=1_700_000_500.0) == pytest.approx(1_700_000_101.2)
    # a record that predates the instance is the plan's only incarnation: its own window bounds it
    assert prior_sends_signed_before(EPOCH, 1_700_000_050.0, 1.2, now=1_700_000_500.0) == pytest.approx(1_700_000_051.2)
    # so is one made on this instance (an older proposal is never planned again): its window, later than `since`
    assert prior_sends_signed_before(EPOCH, 1_700_000_400.0, 1.2, now=1_700_000_500.0) == pytest.approx(1_700_000_401.2)
    # no epoch known at all: only "now" bounds it
    assert prior_sends_signed_before(None, None, 1.2, now=1_700_000_500.0) == pytest.approx(1_700_000_501.2)


@given(start_ms=st.integers(1_700_000_000_000, 1_800_000_000_000), elapsed_ms=st.integers(0, 10**8))
def test_the_start_bound_from_whole_second_uptime_is_never_before_the_real_start(
    start_ms: int, elapsed_ms: int
) -> None:
    """The store reports uptime as whole seconds of now minus whole seconds of its start (Valkey, Redis): the
    bound must not fall before the real start, or entries written just before it would look newer (the store
    loss test found exactly that with ``now - uptime``)."""
    now_ms = start_ms + elapsed_ms
    uptime_s = now_ms // 1000 - start_ms // 1000
    bound = started_before_ms(now_ms, uptime_s)
    assert start_ms < bound <= start_ms + 1000  # the end of the second it started in
    # the server's cached seconds can lag its microsecond clock by a tick: the bound only gets later
    lagging = started_before_ms(now_ms, max(0, uptime_s - 1))
    assert start_ms < lagging <= start_ms + 2000


def test_an_epoch_read_again_is_the_same_epoch_whatever_was_learnt_since() -> None:
    from dataclasses import replace

    again = replace(EPOCH, searched=True)
    assert EPOCH.same_as(again) and again.same_as(EPOCH)
    assert not EPOCH.same_as(replace(EPOCH, floor=(1_700_000_000_001, 0)))
    assert not EPOCH.same_as(replace(EPOCH, identity=StoreIdentity("run-2", "repl-1")))
    assert not EPOCH.same_as(None)


def test_a_promoted_replica_waits_out_the_fence_of_its_cut_off_primary() -> None:
    """After a failover the old primary, cut off, may still have taken writes (a consume, then the order) until
    its replicas' acknowledgements were min-replicas-max-lag old: a record-less plan's sends are bounded that
    much later. A restarted instance's predecessor is gone (no fence), and a plan's own record bounds it."""
    promoted = dataclasses.replace(EPOCH, promoted=True, promoted_at=EPOCH.since)
    now = 1_700_000_500.0
    assert prior_sends_signed_before(promoted, None, 1.2, now, fence_s=11.0) == pytest.approx(1_700_000_112.2)
    assert prior_sends_signed_before(EPOCH, None, 1.2, now, fence_s=11.0) == pytest.approx(1_700_000_101.2)
    assert prior_sends_signed_before(promoted, 1_700_000_050.0, 1.2, now, fence_s=11.0) == pytest.approx(
        1_700_000_051.2
    )
    # the promoted primary restarted 5 s after the promotion: its epoch began then, the fence still runs
    restarted = dataclasses.replace(EPOCH, since=EPOCH.since + 5, promoted_at=EPOCH.since)
    assert prior_sends_signed_before(restarted, None, 1.2, now, fence_s=11.0) == pytest.approx(1_700_000_112.2)
    # long after: the restart's own start bounds it
    later = dataclasses.replace(EPOCH, since=EPOCH.since + 60, promoted_at=EPOCH.since)
    assert prior_sends_signed_before(later, None, 1.2, now, fence_s=11.0) == pytest.approx(1_700_000_161.2)
