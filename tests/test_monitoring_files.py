"""docker/prometheus and docker/grafana against the node: promtool checks the config and the rules and runs their
unit tests; every metric the dashboard and the rules name is one the node exports (renaming a metric fails here)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from node.health import CachedHealth, HealthCollector
from node.metrics import REGISTRY, _Events
from node.store.db import open_database, utcnow
from node.store.runs import RunOutcome, SchedulerRun

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "smartnodule-dashboard.json"
# Series Prometheus makes itself for every target; not the node's to export.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
METRIC = re.compile(r"\b((?:smartnodule|process)_[a-z0-9_]+)\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", ""),
            "gauge": ("",), "info": ("_info",), "unknown": ("",)}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is absent: install the Debian package prometheus (Makefile DEBS; make test does as root)")
    return path


def run_promtool(*args: str) -> str:
    done = subprocess.run([promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_accepts_the_config_and_the_rules():
    assert "SUCCESS" in run_promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 9 rules found" in run_promtool("check", "rules", "alerts.yml")


def test_promtool_rule_unit_tests_pass():
    assert "SUCCESS" in run_promtool("test", "rules", "alerts_test.yml")


@pytest.fixture
def exported(make_settings) -> set[str]:
    """Every series name the node can export: this process's event metrics and the database gauges, over a
    database where a drift check has run (the one family that exists only after a first run)."""
    settings = make_settings()
    settings.node.data_dir.mkdir(parents=True)
    sessions = open_database(settings.database_url)
    with sessions.begin() as session:
        session.add(SchedulerRun(job="drift", started_at=utcnow() - timedelta(minutes=1), finished_at=utcnow(),
                                 outcome=RunOutcome.BREACH, summary=json.dumps(
                                     {"figures": {"probability": {"psi": 0.31}}, "breaches": ["probability: PSI"]})))
    names = set()
    for collector in (_Events(), HealthCollector(CachedHealth(settings, sessions, None, 0))):
        for family in collector.collect():
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def rule_expressions() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_every_metric_of_the_dashboard_exists_in_the_node(exported):
    expressions = dashboard_expressions()
    used = {name for expr in expressions for name in METRIC.findall(expr)}
    assert len(expressions) >= 15
    assert {"smartnodule_instances_received_total", "smartnodule_stage_seconds_bucket", "smartnodule_queue_depth",
            "smartnodule_deliveries_total", "smartnodule_model_info", "smartnodule_drift_psi",
            "smartnodule_scheduler_last_success_timestamp_seconds", "smartnodule_jobs_failed_delivery"} <= used
    assert not used - exported, f"the dashboard names metrics the node does not export: {sorted(used - exported)}"


def test_the_alert_rules_reference_existing_metrics_only(exported):
    used = {name for expr in rule_expressions() for name in re.findall(r"\b([a-z_:][a-z0-9_:]*)\s*[{\[]", expr)}
    used |= {name for expr in rule_expressions() for name in METRIC.findall(expr)}
    assert "smartnodule_healthy" in used and "smartnodule_up" not in used
    assert not used - exported - PROMETHEUS_OWN - {"by", "without", "on", "ignoring"}, sorted(used - exported)


def test_the_old_misleading_names_are_gone(exported):
    assert "smartnodule_up" not in exported and "smartnodule_deliveries_failed" not in exported
    assert {"smartnodule_healthy", "smartnodule_jobs_failed_delivery", "smartnodule_drift_breaches"} <= exported
    assert REGISTRY.get_sample_value("smartnodule_jobs_finished_total", {"state": "SENT"}) is not None


def test_the_metrics_section_is_on_as_shipped_off_when_missing_and_strict(tmp_path):
    from config.settings import SettingsError, load_settings

    shipped = load_settings(None).metrics
    assert (shipped.enabled, shipped.host, shipped.port) == (True, "127.0.0.1", 9464)
    bare = tmp_path / "bare.toml"
    bare.write_text("[node]\naccept_any_calling_ae = true\n")
    assert load_settings(bare).metrics.enabled is False  # a file without the section opens no port
    with pytest.raises(SettingsError, match=r"metrics\.port: Input should be less than or equal to 65535"):
        load_settings(bare, metrics={"port": 70000})
    with pytest.raises(SettingsError, match=r"metrics\.path: Extra inputs are not permitted"):
        load_settings(bare, metrics={"path": "/m"})
