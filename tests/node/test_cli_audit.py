"""CLI actions that change state reach the audit file: `resend`, `model promote` and `model rollback`."""
from __future__ import annotations

import json

import pytest

from config.settings import load_settings
from node.audit import AUDIT_FILE, configure_logging, node_key, verify_chain
from node.cli import main
from node.store.db import Job, JobState, open_database


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\naccept_any_calling_ae = true\n')
    (tmp_path / "var").mkdir()
    open_database(load_settings(path).database_url)  # a node's data folder: the CLI refuses one without a database
    yield path
    configure_logging(None)


def audit_events(config) -> list[dict]:
    settings = load_settings(config)
    path = settings.log_dir / AUDIT_FILE
    assert verify_chain(path, node_key(settings)).intact
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resend_from_the_cli_is_audited(config):
    sessions = open_database(load_settings(config).database_url)
    with sessions.begin() as session:
        job = Job(sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", study_instance_uid="1.2.3",
                  series_instance_uid="1.2.3.5", transfer_syntax_uid="1.2.840.10008.1.2.1", calling_aet="DX",
                  spool_path="/nonexistent", size_bytes=1, state=JobState.FAILED_DELIVERY, results_dir="/nonexistent")
        session.add(job)
        session.flush()
        job_id = job.id
    assert main(["resend", str(job_id), "--config", str(config)]) == 0
    requeued = [e for e in audit_events(config) if e["event"] == "delivery_requeued"]
    assert len(requeued) == 1 and requeued[0]["job_id"] == job_id and requeued[0]["via"] == "cli"
    assert requeued[0]["actor"] and requeued[0]["previous_state"] == "FAILED_DELIVERY"


def test_model_promote_and_rollback_from_the_cli_are_audited(config):
    from scheduler import registry

    settings = load_settings(config)
    client = registry.client(settings)
    assert registry.ensure_registered(settings, client) == "1"
    shipped = registry.versions(settings, client)[0]
    client.create_model_version(settings.registry.model_name, shipped["source"], run_id=shipped["run_id"],
                                tags={"state": "ready", "gate": "passed", "card_version": "test"})
    assert main(["model", "promote", "2", "--config", str(config)]) == 0
    assert main(["model", "rollback", "--config", str(config)]) == 0
    events = {e["event"]: e for e in audit_events(config)}
    assert events["model_promoted"]["version"] == "2" and events["model_promoted"]["approved_by"]
    assert (events["model_rolled_back"]["version"], events["model_rolled_back"]["to"]) == ("2", "1")
