"""`qt chaos`'s verdict (cli/chaos.py ``verdict``): a run passes only when every promise held AND it did
something: plans executed, the store restarted, services killed with some kill inside the order path (with
--store-loss: the store lost, with a consumption forgotten), forgeries attempted and rejected."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import pytest

from quantum_trader.cli.chaos import RECOVERY_LIMIT_S, ChaosReport, _position_changes, fill_shown_ms, verdict
from quantum_trader.domain import oracle


def a_run(**changes: Any) -> ChaosReport:
    """A run that did everything and broke nothing."""
    report = ChaosReport(
        plans=64,
        results=64,
        executions=40,
        orders=40,
        orders_verified=40,
        service_kills=2,
        store_restarts=1,
        unplanned_at_restart=3,
        lossless_restart=True,
        kills_in_order_path=1,
        store_loss_run=False,
        store_losses=0,
        losses_in_order_path=0,
        forgotten_consumptions=0,
        forgeries_attempted=4,
        forgeries_rejected=4,
        max_recovery_s=0.4,
    )
    return dataclasses.replace(report, **changes)


LOSSY = {"store_loss_run": True, "store_losses": 3, "losses_in_order_path": 2, "forgotten_consumptions": 9}


def test_a_run_that_did_everything_and_broke_nothing_passes() -> None:
    report = a_run()
    assert verdict(report) == [] and report.ok
    assert verdict(a_run(**LOSSY)) == []
    # a --store-loss run's faults are its losses: it needs no service kill
    assert verdict(a_run(**LOSSY, service_kills=0, kills_in_order_path=0)) == []


@pytest.mark.parametrize(
    ("changes", "failure"),
    [
        ({"executions": 0}, "nothing executed"),  # e.g. every plan denied or timed out
        ({"service_kills": 0, "kills_in_order_path": 0}, "no service was killed"),
        ({"store_restarts": 0}, "the store was never restarted"),
        ({"unplanned_at_restart": 0}, "no proposal was in flight unplanned when the store restarted"),
        ({"refused_after_store_change": 2}, "a store restart that lost nothing refused 2 proposals"),
        ({"kills_in_order_path": 0}, "no kill landed inside the order path"),
        ({**LOSSY, "store_losses": 0, "losses_in_order_path": 0}, "the store never forgot anything"),
        ({**LOSSY, "losses_in_order_path": 0}, "no store loss forgot a consumption"),
        ({"forgeries_attempted": 0, "forgeries_rejected": 0}, "no forgery was attempted"),
        ({"forgeries_rejected": 0}, "no forgery was rejected"),
        ({"max_recovery_s": RECOVERY_LIMIT_S + 0.1}, "recovery after the store restart took"),
    ],
)
def test_a_run_that_proved_nothing_or_recovered_slowly_fails(changes: dict[str, Any], failure: str) -> None:
    report = a_run(**changes)
    failures = verdict(report)
    assert any(f.startswith(failure) for f in failures), failures
    assert not report.ok


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"duplicate_orders": 1}, "duplicate orders"),
        ({"lost_plans": 1}, "lost plans"),
        ({"duplicate_results": 2}, "duplicate results"),
        ({"results_disagreeing_with_exchange": 1}, "results that disagree with the exchange"),
        ({"executions_without_two_permits": 1}, "executions without two permits"),
        ({"resent_closed_twice": 1}, "retried proposals that closed twice"),
        ({"forgeries_executed": 1}, "forged permits that executed"),
    ],
)
def test_a_broken_promise_fails(changes: dict[str, Any], name: str) -> None:
    report = a_run(**changes)
    n = next(iter(changes.values()))
    assert verdict(report) == [f"{name}: {n}"] and not report.ok


@pytest.mark.parametrize("kind", oracle.KINDS)
def test_every_oracle_finding_fails(kind: str) -> None:
    report = a_run(oracle={**dict.fromkeys(oracle.KINDS, 0), kind: 3})
    assert verdict(report) == [f"oracle: {kind}: 3"] and not report.ok


def test_the_store_loss_requirements_only_apply_to_store_loss_runs() -> None:
    plain = a_run()
    assert plain.ok
    assert verdict(dataclasses.replace(plain, store_loss_run=True)) == ["the store never forgot anything"]


def test_a_default_report_proves_nothing() -> None:
    failures = verdict(ChaosReport())
    assert {"nothing executed", "no service was killed", "no forgery was attempted"} <= set(failures)
    assert "the store never forgot anything" in verdict(ChaosReport(store_loss_run=True))


def test_refusals_fail_only_a_run_whose_store_restart_lost_nothing() -> None:
    """The plain run's store fsyncs every write, so its restart may refuse nothing; the --store-loss run's
    losses refuse what they must (proposals older than an instance that forgot)."""
    assert verdict(a_run(**LOSSY, lossless_restart=False, refused_after_store_change=5)) == []


FAILOVER = {
    "failover_run": True,
    "store_restarts": 0,
    "unplanned_at_restart": 0,
    "lossless_restart": False,
    "service_kills": 0,
    "failovers": 3,
    "failover_seconds": [4.2, 3.9, 3.2],
    "sentinel_restarts": 1,
}


def test_a_failover_run_needs_its_own_faults_not_the_store_restart_or_service_kills() -> None:
    assert verdict(a_run(**FAILOVER)) == []


@pytest.mark.parametrize(
    ("changes", "failure"),
    [
        ({"failovers": 2, "failover_seconds": [4.2, 3.9]}, "2 failovers of the 3 faults of the primary"),
        ({"failover_seconds": [4.2, 30.0, 3.2]}, "failovers over"),
        ({"failover_seconds": [4.2, 3.9]}, "failovers over"),  # one never answered
        ({"sentinel_restarts": 0}, "no Sentinel was restarted"),
        ({"kills_in_order_path": 0}, "no fault of the primary landed inside the order path"),
        ({"writes_taken_by_a_resumed_primary": 1}, "writes taken by a resumed old primary: 1"),
    ],
)
def test_a_failover_run_fails_on_what_it_did_not_prove_or_broke(changes: dict[str, Any], failure: str) -> None:
    failures = verdict(a_run(**{**FAILOVER, **changes}))
    assert any(f.startswith(failure) for f in failures), failures


STREAMED = {"stream_faults_run": True, "stream_faults": {"drop": 1, "expire": 1}, "fills_timed": 40,
            "fill_shown_ms": {"p50": 4, "p99": 900, "max": 1200}}  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "failure"),
    [
        ({}, None),
        ({"stream_faults": {}}, "no fault of the user-data stream was armed"),
        ({"fills_timed": 0, "fill_shown_ms": {}}, "no fill was timed into the snapshots"),
        ({"fills_never_shown": 2}, "2 fills never showed in the snapshots"),
        ({"fill_shown_ms": {"p50": 4, "p99": 900, "max": 15001}}, "a fill showed in its snapshot after 15001 ms"),
        ({"snapshot_disagreements_at_end": 1}, "1 snapshots disagree with the exchange at the end"),
    ],
)
def test_a_stream_faults_run_needs_every_fill_shown_in_its_snapshot_in_time(
    changes: dict[str, Any], failure: str | None
) -> None:
    failures = verdict(a_run(**{**STREAMED, **changes}))
    assert failures == [] if failure is None else [f for f in failures if f.startswith(failure)] != [], failures


D = Decimal


def test_each_fill_is_timed_to_the_first_read_of_its_snapshot_showing_it_or_a_later_fill() -> None:
    fills = [(1000, "BTCUSDT", D("0.9")), (1500, "BTCUSDT", D("0.8")), (1100, "ETHUSDT", D("2")),
             (3000, "BTCUSDT", D("0.7"))]  # fmt: skip
    shown = {
        "BTCUSDT": [(900, D("1")), (1010, D("0.9")), (1700, D("0.7"))],  # 0.8 skipped: the later 0.7 covers it
        "ETHUSDT": [(900, D("3")), (1050, D("2"))],  # already shown as it happened (the chain's result came first)
    }
    lags, unshown = fill_shown_ms(fills, shown)
    assert sorted(lags) == [0, 0, 10, 200] and unshown == 0  # 1010-1000, 1700-1500, 1700 <= 3000: 0
    # a fill its snapshot never showed (nor anything later), and a symbol never read
    lags, unshown = fill_shown_ms([(1000, "BTCUSDT", D("0.5")), (1000, "XRPUSDT", D("1"))], shown)
    assert (lags, unshown) == ([], 2)


def test_only_account_updates_change_positions() -> None:
    update = {"e": "ACCOUNT_UPDATE", "E": 7, "a": {"m": "ORDER", "P": [{"s": "BTCUSDT", "pa": "0.5", "ps": "BOTH"}]}}
    assert _position_changes(update) == [(7, "BTCUSDT", D("0.5"))]
    assert _position_changes({"e": "ORDER_TRADE_UPDATE", "E": 7, "o": {}}) == []
    assert _position_changes({"e": "ACCOUNT_UPDATE", "E": 8, "a": {"m": "FUNDING_FEE", "P": []}}) == []


def test_the_time_p33_was_down_does_not_count_against_a_fill() -> None:
    """Killed 100 ms after the fill, back 5 s later, shown 30 ms after its return: 130 ms of P3.3 running."""
    fills = [(1000, "BTCUSDT", D("0.9"))]
    shown = {"BTCUSDT": [(900, D("1")), (6130, D("0.9"))]}
    assert fill_shown_ms(fills, shown, [(1100, 6100)]) == ([130], 0)
    assert fill_shown_ms(fills, shown, [(200, 800), (7000, 8000)]) == ([5130], 0)  # downtimes elsewhere


def test_fills_of_one_millisecond_keep_their_event_order() -> None:
    """Two fills in one millisecond, read only as the second's position: both shown (sorted by amount, the first
    would look never shown)."""
    fills = [(1000, "BTCUSDT", D("0.9")), (1000, "BTCUSDT", D("0.8"))]
    assert fill_shown_ms(fills, {"BTCUSDT": [(900, D("1")), (1010, D("0.8"))]}) == ([10, 10], 0)
