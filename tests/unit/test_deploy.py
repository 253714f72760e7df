"""The operator's files: Prometheus alerts and scrape config, the Grafana dashboard. Every metric they query
must be one the services export (a renamed metric would silently turn an alert off)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from quantum_trader.exchange.userstream import StreamHealth
from quantum_trader.services.metrics import ApplyMetrics, BrainMetrics, GovernorMetrics, build_info, stream_metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NAME = re.compile(r"\b((?:qt|p33)_[a-z0-9_]+)")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}


def exported_names() -> set[str]:
    names: set[str] = set()
    for kind, cls in (("apply", ApplyMetrics), ("governor", GovernorMetrics), ("brain", BrainMetrics)):
        registry = CollectorRegistry()
        cls(registry)
        build_info(registry, kind)
        if kind != "governor":  # the user-data stream's health, registered by the brain and Apply
            stream_metrics(registry, "p33" if kind == "brain" else "qt_apply", StreamHealth)
        for family in registry.collect():
            names.add(family.name)
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
    return names


def queried_names(expr: str) -> set[str]:
    return set(NAME.findall(expr))


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_alert_is_complete_and_queries_exported_metrics() -> None:
    exported = exported_names()
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "alert names must be unique"
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        names = queried_names(rule["expr"])
        # Prometheus's own `up` series is the one exception: it exists exactly when our metrics cannot be read
        assert names or rule["expr"].startswith("up{job="), f"{rule['alert']} queries none of our metrics"
        assert names <= exported, f"{rule['alert']} queries unknown metrics {names - exported}"


def test_the_alerts_cover_what_the_operator_must_hear_about() -> None:
    queried = set().union(*(queried_names(r["expr"]) for r in alert_rules()))
    for must in (
        "qt_apply_permit_timeouts_total",  # timeouts
        "qt_governor_permits_total",  # deny ratio
        "p33_permits_total",
        "p33_snapshot_age_seconds",  # stale snapshots
        "p33_consumer_lag",  # consumer lag
        "p33_ledger_drift",  # drift
        "qt_build_info",  # a silent service
        "qt_apply_unresolved_orders",
        "qt_apply_store_up",
        "qt_apply_exchange_limit_used_ratio",  # headroom under the exchange's limits
        "qt_apply_stream_healthy",
    ):
        assert must in queried, must


def test_the_scrape_jobs_are_the_ones_the_alerts_name() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"][0] for job in config["scrape_configs"]}
    assert jobs == {"qt-apply": "127.0.0.1:8043", "qt-governor": "127.0.0.1:8044", "qt-p33": "127.0.0.1:8045"}
    assert config["rule_files"] == ["alerts.yml"]
    service_down = next(r for r in alert_rules() if r["alert"] == "QtServiceDown")
    assert all(job in service_down["expr"] for job in jobs)


def test_the_grafana_dashboard_queries_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "quantum-trader.json").read_text())
    exported = exported_names()
    assert dashboard["uid"] == "quantum-trader" and dashboard["panels"]
    seen: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = queried_names(target["expr"])
            assert names and names <= exported, f"{panel['title']}: unknown {names - exported}"
            seen |= names
    for must in ("p33_ledger_drift", "p33_snapshot_age_seconds", "qt_apply_permit_wait_seconds_bucket"):
        assert must in seen


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed here")
def test_promtool_accepts_the_rules() -> None:  # pragma: no cover - only where Prometheus is installed
    done = subprocess.run(
        ["promtool", "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
