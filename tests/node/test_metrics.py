"""Metrics in every role: a real node on loopback with its metrics port, a real C-STORE, a scrape over HTTP."""
from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from config.settings import SettingsError
from node.metrics import serve_metrics
from node.orthanc_peer import free_port
from node.scu import send_files
from node.store.db import TERMINAL, JobState
from tests.conftest import finished_jobs, poll

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def scrape(port: int) -> tuple[str, dict[tuple[str, tuple], float]]:
    """The exposition text and its samples, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def value(samples, metric: str, /, **labels) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_a_stored_instance_moves_the_counters_of_the_scraped_node(make_settings, running_node, phantom_files):
    port = free_port()
    closed = free_port()  # a destination nobody answers on: one attempt, then FAILED_DELIVERY
    settings = make_settings(metrics={"enabled": True, "port": port}, delivery={"max_attempts": 1},
                             web={"health_cache_s": 0},  # the database gauges as of each scrape
                             destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": closed}])
    node = running_node(settings, workers=1)
    _, before = scrape(port)

    [result] = send_files(phantom_files[:1], host="127.0.0.1", port=settings.node.port, called_aet="SMARTNODULE",
                          calling_aet="STORESCU")
    assert result.stored
    [job] = poll(lambda: finished_jobs(node.sessions, 1, TERMINAL), 120, "the job")
    assert job.state is JobState.FAILED_DELIVERY
    finished = ("smartnodule_jobs_finished_total", (("state", "FAILED_DELIVERY"),))  # counted after the commit
    text, after = poll(lambda: (lambda got: got if got[1].get(finished, 0) > before.get(finished, 0) else None)(
        scrape(port)), 30, "the finished job's counter")

    received = {"calling_ae": "STORESCU", "status": "0x0000"}
    assert value(after, "smartnodule_instances_received_total", **received) == \
        value(before, "smartnodule_instances_received_total", **received) + 1
    assert value(after, "smartnodule_jobs_finished_total", state="FAILED_DELIVERY") == \
        value(before, "smartnodule_jobs_finished_total", state="FAILED_DELIVERY") + 1
    failed = {"destination": "pacs", "status": "failed"}
    assert value(after, "smartnodule_deliveries_total", **failed) == value(before, "smartnodule_deliveries_total", **failed) + 1
    for stage in ("queued", "read", "preprocess", "predict", "encode", "deliver"):
        assert value(after, "smartnodule_stage_seconds_count", stage=stage) == \
            value(before, "smartnodule_stage_seconds_count", stage=stage) + 1
    model = {"name": job.model_name, "version": job.model_version, "sha256": job.model_sha256}
    assert value(after, "smartnodule_model_info", **model) == 1
    # the database gauges, read at scrape time
    assert value(after, "smartnodule_jobs", state="FAILED_DELIVERY") == 1
    assert value(after, "smartnodule_jobs_failed_delivery", destination="pacs") == 1
    assert value(after, "smartnodule_healthy") == 0
    assert ("smartnodule_queue_depth", (("state", "ENCODED"),)) in after
    assert 'smartnodule_stage_seconds_bucket{le="0.01",stage="predict"}' in text
    assert "smartnodule_up" not in text and "smartnodule_deliveries_failed" not in text
    # labels carry AE titles, states and stages: never a UID of what was received
    for uid in (job.sop_instance_uid, job.study_instance_uid, job.series_instance_uid):
        assert uid not in text


def test_a_metrics_port_in_use_is_one_clear_error(make_settings, running_node, tmp_path):
    port = free_port()
    settings = make_settings(metrics={"enabled": True, "port": port})
    node = running_node(settings, workers=0, scheduler=False, deliver=False)
    assert node.metrics is not None
    with pytest.raises(SettingsError, match=rf"metrics.port {port} on 127.0.0.1 cannot be used"):
        serve_metrics(settings, node.sessions)

    config = tmp_path / "scp.toml"  # the scp role started by the CLI while the first node holds the port
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "second"}"\nport = {free_port()}\naccept_any_calling_ae = true\n'
                      f'[metrics]\nenabled = true\nport = {port}\n')
    done = subprocess.run([sys.executable, "-m", "node.cli", "scp", "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: metrics.port {port} on 127.0.0.1 cannot be used (Address already in use); two roles on one machine "
        f"need different ports, e.g. SMARTNODULE_METRICS__PORT={port + 1}")
    assert "scp_started" not in done.stderr  # nothing listened


@pytest.mark.parametrize("role", ["scheduler", "web"])
def test_the_scheduler_and_web_roles_serve_metrics_too(role, tmp_path):
    """The roles that do not go through node.service.Node: `smartnodule scheduler` and `smartnodule web`."""
    from datetime import timedelta

    from node.store.db import open_database, utcnow
    from node.store.runs import RunOutcome, SchedulerRun

    data = tmp_path / "var"
    data.mkdir()
    finished = utcnow() - timedelta(hours=1)
    with open_database(f"sqlite:///{data / 'smartnodule.db'}").begin() as session:
        session.add(SchedulerRun(job="reindex", started_at=finished, finished_at=finished, outcome=RunOutcome.OK))
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{data}"\naccept_any_calling_ae = true\n'
                      f'[metrics]\nenabled = true\nport = {port}\n'
                      f'[web]\nenabled = true\nport = {free_port()}\nsecret_key = "{"k" * 48}"\n'
                      '[scheduler]\ndrift = ""\nretrain = ""\nreindex = ""\nretention = ""\necho = ""\nbackup = ""\n')
    process = subprocess.Popen([sys.executable, "-m", "node.cli", role, "--config", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def answered():
            try:
                return scrape(port)
            except OSError:
                assert process.poll() is None, f"the {role} role exited with {process.returncode}"
                return None

        text, samples = poll(answered, 120, f"the {role} role's metrics")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert value(samples, "smartnodule_scheduler_last_success_timestamp_seconds", scheduled_job="reindex") == \
        pytest.approx(finished.timestamp(), abs=1e-3)
    assert value(samples, "smartnodule_healthy") == 1 and "process_resident_memory_bytes" in text
