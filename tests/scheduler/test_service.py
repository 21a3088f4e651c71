"""Scheduler service: schedules from settings, persistent job store, every run recorded, a failing job retried
at its next time without harm; housekeeping jobs; the CLI subcommands."""
from __future__ import annotations

import argparse
import json
import sqlite3
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from node.store.backup import verify
from node.store.db import Job, JobState, utcnow
from node.store.db import open_database as _open_database
from node.store.runs import RunOutcome, SchedulerRun
from tests.conftest import wait_for


def open_database(settings):
    settings.node.data_dir.mkdir(parents=True, exist_ok=True)
    return _open_database(settings.database_url)


def _runs(sessions, job=None):
    with sessions() as session:
        query = select(SchedulerRun).order_by(SchedulerRun.id)
        return list(session.scalars(query if job is None else query.where(SchedulerRun.job == job)))


def test_trigger_parsing():
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    from config.settings import SettingsError, load_settings
    from scheduler.service import trigger_of

    assert trigger_of("", "UTC") is None
    assert isinstance(trigger_of("every 15m", "UTC"), IntervalTrigger)
    assert trigger_of("every 2h", "UTC").interval == timedelta(hours=2)
    assert isinstance(trigger_of("0 2 * * *", "UTC"), CronTrigger)
    with pytest.raises(SettingsError, match="scheduler.drift"):
        load_settings(None, scheduler={"drift": "nightly"})


def test_failing_job_is_recorded_and_runs_again(make_settings, monkeypatch):
    from structlog.testing import capture_logs

    from scheduler import tasks
    from scheduler.service import Scheduler

    off = {name: "" for name in tasks.JOBS}
    settings = make_settings(scheduler={**off, "reindex": "every 1s", "backup": "every 1s"})
    sessions = open_database(settings)

    def broken(settings, sessions, **_):
        raise RuntimeError("index disk gone")

    monkeypatch.setitem(tasks.JOBS, "reindex", broken)
    scheduler = Scheduler(settings, sessions)
    with capture_logs() as logs:
        scheduler.start()
        try:
            assert set(scheduler.jobs()) == {"reindex", "backup"}
            wait_for(lambda: len([r for r in _runs(sessions, "reindex") if r.outcome is RunOutcome.FAILED]) >= 2
                     and len([r for r in _runs(sessions, "backup") if r.outcome is RunOutcome.OK]) >= 2, 20, 0.2,
                     "two failed reindex runs and two backups")
        finally:
            scheduler.stop()
    failed = [r for r in _runs(sessions, "reindex")][0]
    assert "index disk gone" in json.loads(failed.summary)["error"] and failed.finished_at is not None
    assert any(e["event"] == "scheduled_job_failed" and e.get("job") == "reindex" for e in logs)
    # the job store persisted the schedule in the node's database
    with sqlite3.connect(settings.database_url[len("sqlite:///"):]) as db:
        assert {row[0] for row in db.execute("select id from apscheduler_jobs")} == {"reindex", "backup"}
    archive = Path(json.loads(_runs(sessions, "backup")[-1].summary)["archive"])
    assert "database/node.sqlite" in [name for name, _, _ in verify(archive)["files"]]
    with tarfile.open(archive) as tar:
        tar.extract("database/node.sqlite", settings.node.data_dir / "copy", filter="data")
    with sqlite3.connect(settings.node.data_dir / "copy" / "database" / "node.sqlite") as db:
        assert db.execute("select count(*) from scheduler_runs").fetchone()[0] >= 1


def test_retention_deletes_only_old_finished_cases(make_settings):
    from scheduler.service import run_job

    settings = make_settings(scheduler={"retention_days": 1})
    sessions = open_database(settings)
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    old, recent, pending = (utcnow() - timedelta(days=3), utcnow(), None)
    rows = []
    for i, (state, finished) in enumerate([(JobState.SENT, old), (JobState.SENT, recent),
                                           (JobState.FAILED_DELIVERY, old), (JobState.RECEIVED, pending)]):
        spool = settings.spool_dir / f"1.2.3.{i}.dcm"
        spool.write_bytes(b"x" * 10)
        results = settings.results_dir / f"1.2.3.{i}"
        results.mkdir(parents=True)
        (results / "sr.dcm").write_bytes(b"y")
        rows.append(Job(sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2", study_instance_uid="1.2",
                        series_instance_uid="1.2", transfer_syntax_uid="1.2", calling_aet="A", spool_path=str(spool),
                        size_bytes=10, state=state, attempts=1, delivery_attempts=0, finished_at=finished,
                        results_dir=str(results)))
    with sessions.begin() as session:
        session.add_all(rows)
    run = run_job(settings, sessions, "retention")
    summary = json.loads(run.summary)
    assert run.outcome is RunOutcome.OK and summary["spool_files_deleted"] == 1 and summary["result_folders_deleted"] == 1
    assert not (settings.spool_dir / "1.2.3.0.dcm").exists()
    assert all((settings.spool_dir / f"1.2.3.{i}.dcm").exists() for i in (1, 2, 3))


@pytest.mark.integration
def test_echo_records_round_trip_and_failure(make_settings):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from node.orthanc_peer import free_port
    from scheduler.service import run_job

    port, dead = free_port(), free_port()
    peer = AE(ae_title="PEER")
    peer.add_supported_context(Verification)
    server = peer.start_server(("127.0.0.1", port), block=False)
    try:
        settings = make_settings(destinations=[{"name": "peer", "ae_title": "PEER", "host": "127.0.0.1", "port": port},
                                               {"name": "gone", "ae_title": "GONE", "host": "127.0.0.1", "port": dead}],
                                 delivery={"timeout_s": 2})
        sessions = open_database(settings)
        run = run_job(settings, sessions, "echo")
    finally:
        server.shutdown()
    result = json.loads(run.summary)["destinations"]
    assert result["peer"]["ok"] and result["peer"]["round_trip_ms"] > 0
    assert not result["gone"]["ok"] and run.outcome is RunOutcome.FAILED


def test_cli_subcommands(make_settings, tmp_path, capsys):
    from config.settings import load_settings
    from scheduler.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "cli"}"\naccept_any_calling_ae = true\n')
    (tmp_path / "cli").mkdir()
    open_database(load_settings(config))  # a node's data folder: `job` refuses one without a database
    args = parser.parse_args(["job", "backup", "--config", str(config)])
    assert args.func(args) == 0
    out = capsys.readouterr().out  # structlog's console lines come first
    assert json.loads(out[out.index('{\n  "job"'):])["outcome"] == "ok"
    args = parser.parse_args(["model", "rollback", "--config", str(config)])
    assert args.func(args) == 2 and "no previous champion" in capsys.readouterr().out
    for argv in (["scheduler", "--config", "x"], ["model", "promote", "3"], ["model", "list"]):
        assert callable(parser.parse_args(argv).func)
