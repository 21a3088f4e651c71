"""Retraining end to end: verdicts on processed jobs -> fine-tune (child process) -> MLflow run and registered
version -> gate refuses a sabotaged candidate, passes one equal to the champion -> promotion switches the running
node's model between jobs (the SR names the new version) -> rollback restores the old one.

The promotable candidate is fine-tuned for 0 steps (weights equal to the champion's, a new registry version), so
the gate's outcome is deterministic; the sabotaged one is trained on flipped labels at a high learning rate.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from inference.model_card import load_card
from inference.predictor import DEFAULT_CARD
from node.scu import send_files
from node.store.db import Job, JobState
from tests.conftest import audit_events, finished_jobs, wait_for

SHIPPED = load_card(DEFAULT_CARD).version  # the champion every retrain starts from

pytestmark = pytest.mark.integration
PROCESSED = {JobState.ENCODED, JobState.SENT}


def _send(settings, files):
    results = send_files(list(files), host="127.0.0.1", port=settings.node.port, called_aet=settings.node.ae_title,
                         calling_aet="STORESCU")
    assert [r.status for r in results] == [0] * len(files)


def _truth(path: str) -> tuple[bool, tuple[float, float] | None]:
    comment = str(dcmread(path, stop_before_pixels=True).ImageComments)
    found = re.search(r"row (\d+), col (\d+)", comment)
    return (found is not None, (float(found.group(1)), float(found.group(2))) if found else None)


def _sr_text(job: Job) -> str:
    return str(dcmread(Path(job.results_dir) / "sr.dcm"))


def _job_for(sessions, sop_uid: str) -> Job:
    with sessions() as session:
        return session.scalars(select(Job).where(Job.sop_instance_uid == sop_uid)).one()


def test_retrain_gate_promote_and_rollback(make_settings, running_node, phantom_files, tmp_path):
    from scheduler import registry
    from inference.training.phantoms import write_phantom_series
    from scheduler.registry import ChampionWatcher
    from node.store.review import Role, User, record_verdict
    from scheduler.service import run_job

    settings = make_settings(registry={"min_new_verdicts": 4, "heldout_percent": 34, "eval_phantoms": 4,
                                       "fine_tune_phantoms": 2, "fine_tune_steps": 2, "fine_tune_batch": 2,
                                       "watch_interval_s": 0.2, "auto_promote": False})
    node = running_node(settings, model_loader=lambda: ChampionWatcher(settings).current, deliver=False)
    _send(settings, phantom_files)
    jobs = wait_for(lambda: finished_jobs(node.sessions, len(phantom_files), PROCESSED), 180, 0.5, "processed jobs")
    assert {j.model_version for j in jobs} == {SHIPPED}

    # too few verdicts: the job waits
    run = run_job(settings, node.sessions, "retrain")
    assert run.outcome.value == "ok" and '"waiting"' in run.summary

    with node.sessions.begin() as session:
        readers = [User(username=f"reader{i}", role=Role.REVIEWER, password_hash="-") for i in (1, 2)]
        session.add_all(readers)
        session.flush()
        for job in jobs:
            present, location = _truth(job.spool_path)
            for reader in readers:
                record_verdict(session, job.id, reader, nodule_present=present, location=location, comment=None)

    # 1. a real (tiny) fine-tune: registered version with its MLflow run
    run = run_job(settings, node.sessions, "retrain")
    assert run.outcome.value == "ok", run.summary
    import json

    first = json.loads(run.summary)
    assert first["registry_version"] == "2" and first["card_version"] == f"{SHIPPED}+ft.2"
    assert first["train_cases"] + first["heldout_cases"] == len(jobs)
    client = registry.client(settings)
    mlrun = client.get_run(first["run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["steps"] == "2" and "train_loss" in mlrun.data.metrics
    assert mlrun.data.tags["data_fingerprint"] == first["data_fingerprint"]
    assert "gate_candidate_auc" in mlrun.data.metrics
    artifacts = {a.path for a in client.list_artifacts(first["run_id"], "model")}
    assert {"model/card.json", f"model/smartnodule-nodule-{SHIPPED}+ft.2.safetensors"} <= artifacts
    assert registry.champion_version(client, settings) == "1"  # auto_promote is off

    # the child's progress reached the structured log as it came, not when the child ended: the last training step
    # was logged (parent's clock) before the child wrote its result (child's clock), after which it still calibrated,
    # registered and ran the gate
    from datetime import datetime

    progress = [e for e in audit_events(settings) if e["event"] == "retrain_progress"]
    assert {"data", "train", "gate", "done"} <= {e["phase"] for e in progress}
    train = [e for e in progress if e["phase"] == "train"]
    assert [e["done"] for e in train] == [0, 1, 2] and all(e["total"] == 2 for e in train)
    assert train[-1]["loss"] > 0
    assert datetime.fromisoformat(train[-1]["timestamp"]).timestamp() < first["finished_at"]

    # 2. a candidate made worse on purpose is refused by the gate
    run = run_job(settings, node.sessions, "retrain", force=True,
                  overrides={"flip_labels": True, "steps": 8, "lr": 0.01, "phantoms": 4})
    bad = json.loads(run.summary)
    assert bad["gate_passed"] is False, bad
    with pytest.raises(registry.RegistryError, match="gate"):
        registry.promote(settings, bad["registry_version"], approved_by="test")

    # 3. a candidate equal to the champion passes; promoted by the administrator
    run = run_job(settings, node.sessions, "retrain", force=True, overrides={"steps": 0})
    good = json.loads(run.summary)
    assert good["gate_passed"] is True, good
    assert registry.promote(settings, good["registry_version"], approved_by="test") == "1"
    new_version = good["card_version"]

    # the running node switches between jobs: the next SR names the new version
    [extra] = write_phantom_series(tmp_path / "more", 1, seed0=9300, size=512)
    _send(settings, [extra])
    job = wait_for(lambda: (j := _job_for(node.sessions, dcmread(extra).SOPInstanceUID)).state in PROCESSED and j,
                   120, 0.3, "job on the new champion")
    assert job.model_version == new_version
    assert new_version in _sr_text(job)

    # rollback restores the previous champion
    assert registry.rollback(settings) == (good["registry_version"], "1")
    [again] = write_phantom_series(tmp_path / "again", 1, seed0=9301, size=512)
    _send(settings, [again])
    job = wait_for(lambda: (j := _job_for(node.sessions, dcmread(again).SOPInstanceUID)).state in PROCESSED and j,
                   120, 0.3, "job after rollback")
    assert job.model_version == SHIPPED and f"{SHIPPED}+ft" not in _sr_text(job)
    print("retrain figures:", {k: first[k] for k in ("train_seconds", "gate_seconds", "total_seconds", "wall_seconds")},
          "bad gate:", bad["gate_reasons"])
