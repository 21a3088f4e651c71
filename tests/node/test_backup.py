"""Backups that restore (node.store.backup): a running node is backed up, its data folder (and database) destroyed,
the archive restored, and every job, verdict, audit line, spool file and index entry is back with an intact audit
chain; a changed byte anywhere is refused before anything is written; an older schema stops the start until
`smartnodule migrate` has backed up and upgraded."""
from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from sqlalchemy import create_engine, select, text

from node.audit import AUDIT_FILE, configure_logging, key_path, read_key, verify_chain
from node.cli import main
from node.store.backup import MANIFEST, BackupError, backup, manifest_digest, pg_invocation, restore, verify
from node.store.db import (Job, SchemaBehind, SchemaUnknown, _alembic_config, head_revision, make_engine,
                           open_database)
from node.store.review import Role, User, Verdict, record_verdict
from retrieval.index import CaseIndex
from tests.conftest import finished_jobs, wait_for


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _snapshot(sessions) -> tuple[dict, list]:
    with sessions() as session:
        jobs = {j.id: (j.sop_instance_uid, j.state, j.probability, j.spool_path, j.content_sha256, j.results_dir)
                for j in session.scalars(select(Job))}
        verdicts = [(v.id, v.job_id, v.reviewer, v.nodule_present) for v in session.scalars(select(Verdict))]
    return jobs, verdicts


def _index_ids(settings, probe: bytes) -> set[int]:
    return {n.job_id for n in CaseIndex.from_settings(settings).search(np.frombuffer(probe, dtype=np.float32), 50)}


def _send(settings, files):
    from node.scu import send_files

    results = send_files(files, host="127.0.0.1", port=settings.node.port, called_aet="SMARTNODULE",
                         calling_aet="STORESCU")
    assert all(r.stored for r in results)


@pytest.mark.integration
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_running_node_is_backed_up_destroyed_and_restored(database, make_settings, phantom_files, tmp_path, request):
    from node.service import Node

    url = {"database_url": request.getfixturevalue("postgres_url")} if database == "postgresql" else {}
    settings = make_settings(node=url)
    configure_logging(settings.log_dir)
    node = Node(settings, scheduler=False)
    node.start()
    try:
        _send(settings, phantom_files[:4])
        jobs = wait_for(lambda: finished_jobs(node.sessions, 4), 180, message="four processed jobs")
        with node.sessions.begin() as session:
            reader = User(username="rita", role=Role.REVIEWER, password_hash="-")
            session.add(reader)
            record_verdict(session, jobs[0].id, reader, nodule_present=True, location=(10.0, 20.0), comment="seen")
        before_jobs, before_verdicts = _snapshot(node.sessions)
        audit_before = (settings.log_dir / AUDIT_FILE).read_text().splitlines()
        assert {"instance_stored", "job_encoded"} <= {json.loads(line)["event"] for line in audit_before}
        probe = jobs[0].embedding
        index_before = _index_ids(settings, probe)
        assert index_before == set(before_jobs)

        # more instances arrive while the backup runs
        sender = threading.Thread(target=_send, args=(settings, phantom_files[4:]))
        sender.start()
        manifest = backup(settings, tmp_path / "backups")
        sender.join()
        wait_for(lambda: finished_jobs(node.sessions, 6), 180, message="six processed jobs")
    finally:
        node.stop()
        node.sessions.kw["bind"].dispose()
    configure_logging(None)  # closes the audit file (its checkpoint written at close, as a stopped node's is)
    assert manifest.path.is_file() and manifest.schema_revision == head_revision() and manifest.database == database
    assert {"database", "spool", "results", "logs", "retrieval"} <= {p.name for p in manifest.parts}

    shutil.rmtree(settings.node.data_dir)
    if database == "postgresql":
        engine = create_engine(settings.database_url)
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        engine.dispose()

    report = restore(manifest.path, settings)

    assert report.schema_to == head_revision() and report.files == manifest.files
    sessions = open_database(settings.database_url)
    after_jobs, after_verdicts = _snapshot(sessions)
    assert {k: after_jobs[k] for k in before_jobs} == before_jobs  # every job that was there before the backup
    assert after_verdicts == before_verdicts
    for _, _, _, spool_path, content_sha256, results_dir in after_jobs.values():  # and nothing the files lack
        assert _sha256(spool_path) == content_sha256
        assert results_dir is None or (Path(results_dir) / "sr.dcm").is_file()
    audit_after = (settings.log_dir / AUDIT_FILE).read_text().splitlines()
    assert audit_after[:len(audit_before)] == audit_before
    check = verify_chain(settings.log_dir / AUDIT_FILE, read_key(key_path(settings.audit, settings.node.data_dir)))
    assert check.intact and check.checkpoint, check.problem
    index_after = _index_ids(settings, probe)
    assert index_before <= index_after <= set(after_jobs)
    sessions.kw["bind"].dispose()

    restored = Node(settings, workers=0, scheduler=False)  # the restored node takes instances again
    restored.start()
    try:
        _send(settings, phantom_files[:1])  # a known instance: acknowledged, no new version
        with restored.sessions() as session:
            assert session.scalar(select(Job).where(Job.sop_instance_uid == before_jobs[jobs[0].id][0])).version == 1
    finally:
        restored.stop()
        restored.sessions.kw["bind"].dispose()


@pytest.fixture
def node_folder(make_settings):
    """A node's data folder without a running node: database with jobs, spool and result files, audit log,
    index, MLflow database and artifacts."""
    settings = make_settings()
    settings.node.data_dir.mkdir(parents=True)
    configure_logging(settings.log_dir)
    sessions = open_database(settings.database_url)
    index = CaseIndex.from_settings(settings)
    for i in range(1, 4):
        spool = settings.spool_dir / "1.2.3" / f"1.2.3.{i}.dcm"
        spool.parent.mkdir(parents=True, exist_ok=True)
        spool.write_bytes(bytes([i]) * 5000)
        results = settings.results_dir / f"1.2.3.{i}" / "attempt-1"
        results.mkdir(parents=True)
        (results / "sr.dcm").write_bytes(b"SR" * 100)
        with sessions.begin() as session:
            session.add(Job(id=i, sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2", study_instance_uid="1.2.3",
                            series_instance_uid="1.2", transfer_syntax_uid="1.2", calling_aet="STORESCU",
                            spool_path=str(spool), size_bytes=5000, state="ENCODED", results_dir=str(results),
                            content_sha256=_sha256(spool)))
        index.add(i, np.eye(8, dtype=np.float32)[i])
        structlog_event(i)
    with sqlite3.connect(settings.node.data_dir / "mlflow.db") as mlflow:
        mlflow.execute("create table runs (id integer)")
    (settings.artifact_root / "1" / "model").mkdir(parents=True)
    (settings.artifact_root / "1" / "model" / "weights.safetensors").write_bytes(b"w" * 3000)
    sessions.kw["bind"].dispose()
    configure_logging(None)
    return settings


def structlog_event(job_id: int) -> None:
    import structlog

    structlog.get_logger("tests.backup").info("instance_stored", job_id=job_id)


def test_archive_lists_every_part_and_restores_into_an_empty_folder(node_folder, tmp_path):
    manifest = backup(node_folder, tmp_path / "backups")
    parts = {p.name: p for p in manifest.parts}
    assert set(parts) == {"retrieval", "database", "mlflow", "spool", "results", "logs", "mlartifacts"}
    assert parts["spool"].files == 3 and parts["spool"].bytes == 15000 and parts["logs"].files == 2
    assert oct(manifest.path.stat().st_mode & 0o777) == "0o600" and manifest.skipped == ()
    listed = {name: sha for name, _, sha in verify(manifest.path)["files"]}
    assert listed["data/spool/1.2.3/1.2.3.2.dcm"] == _sha256(node_folder.spool_dir / "1.2.3" / "1.2.3.2.dcm")
    before = {p.relative_to(node_folder.node.data_dir): _sha256(p)
              for p in node_folder.node.data_dir.rglob("*") if p.is_file() and "smartnodule.db" not in p.name}

    shutil.rmtree(node_folder.node.data_dir)
    restore(manifest.path, node_folder)

    after = {p.relative_to(node_folder.node.data_dir): _sha256(p)
             for p in node_folder.node.data_dir.rglob("*") if p.is_file() and "smartnodule.db" not in p.name}
    assert after == before  # mlflow.db compared as a file: the online backup copies every page
    assert oct((node_folder.node.data_dir / "smartnodule.db").stat().st_mode & 0o777) == "0o600"
    with open_database(node_folder.database_url)() as session:
        assert [j.sop_instance_uid for j in session.scalars(select(Job).order_by(Job.id))] == \
            ["1.2.3.1", "1.2.3.2", "1.2.3.3"]


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _offsets(archive: Path) -> dict[str, int]:
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
    spool, database, manifest = (members["data/spool/1.2.3/1.2.3.2.dcm"], members["database/node.sqlite"],
                                 members[MANIFEST])
    return {"spool file": spool.offset_data + 100, "database page": database.offset_data + 4096 + 7,
            "tar header": spool.offset + 110,  # inside the size/mode fields of a header
            "manifest": manifest.offset_data + manifest.size // 2,
            "padding after the manifest": archive.stat().st_size - 100}


@pytest.mark.parametrize("where", ["spool file", "database page", "tar header", "manifest",
                                   "padding after the manifest"])
def test_a_changed_byte_is_refused_before_anything_is_written(node_folder, tmp_path, where):
    manifest = backup(node_folder, tmp_path / "backups")
    _flip(manifest.path, _offsets(manifest.path)[where])
    shutil.rmtree(node_folder.node.data_dir)

    with pytest.raises(BackupError, match="damaged|differ"):
        restore(manifest.path, node_folder)

    assert not node_folder.node.data_dir.exists()


def test_damaged_member_is_named(node_folder, tmp_path):
    manifest = backup(node_folder, tmp_path / "backups")
    _flip(manifest.path, _offsets(manifest.path)["spool file"])
    with pytest.raises(BackupError, match="data/spool/1.2.3/1.2.3.2.dcm differs from the manifest"):
        verify(manifest.path)


def test_restore_refuses_a_folder_in_use_and_a_newer_schema(node_folder, tmp_path):
    manifest = backup(node_folder, tmp_path / "backups")
    spool_file = node_folder.spool_dir / "1.2.3" / "1.2.3.1.dcm"
    spool_file.write_bytes(b"changed after the backup")
    with pytest.raises(BackupError, match="is not empty.*--force"):
        restore(manifest.path, node_folder)
    assert spool_file.read_bytes() == b"changed after the backup"

    (node_folder.node.data_dir / "stray").write_text("not in the archive")
    restore(manifest.path, node_folder, force=True)
    assert spool_file.read_bytes() == bytes([1]) * 5000 and not (node_folder.node.data_dir / "stray").exists()

    elsewhere = node_folder.model_copy(update={"node": node_folder.node.model_copy(
        update={"data_dir": tmp_path / "elsewhere"})})
    with pytest.raises(BackupError, match="node.data_dir"):
        restore(manifest.path, elsewhere)
    assert not (tmp_path / "elsewhere").exists()

    with sqlite3.connect(node_folder.node.data_dir / "smartnodule.db") as db:  # as a newer version leaves it
        db.execute("update alembic_version set version_num = '9999_from_the_future'")
    newer = backup(node_folder, tmp_path / "backups").path
    shutil.rmtree(node_folder.node.data_dir)
    with pytest.raises(BackupError, match="schema revision 9999_from_the_future.*does not know"):
        restore(newer, node_folder)
    assert not node_folder.node.data_dir.exists()


def test_manifest_digest_covers_every_field():
    manifest = {"format": "smartnodule-backup", "schema_revision": "0001", "files": [["a", 1, "00"]]}
    assert manifest_digest(manifest) != manifest_digest({**manifest, "schema_revision": "0002"})
    assert manifest_digest(manifest) == manifest_digest({**manifest, "digest": "ignored"})


def _older_database(settings, revision: str = "0002_review_reasons") -> None:
    settings.node.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()


def test_an_older_schema_stops_the_start_until_migrate_has_backed_up(make_settings, tmp_path, capsys):
    settings = make_settings()
    _older_database(settings)
    with pytest.raises(SchemaBehind, match=r"0002_review_reasons.*smartnodule migrate"):
        open_database(settings.database_url)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{settings.node.data_dir}"\naccept_any_calling_ae = true\n')
    assert main(["jobs", "--config", str(config)]) == 2
    assert "smartnodule migrate" in capsys.readouterr().err

    assert main(["migrate", "--config", str(config)]) == 0

    out = capsys.readouterr().out
    assert "backup written:" in out and f"0002_review_reasons -> {head_revision()}" in out
    [archive] = settings.backup_dir.glob("smartnodule-backup-*.tar")
    assert verify(archive)["schema_revision"] == "0002_review_reasons"
    open_database(settings.database_url)  # starts now
    assert main(["migrate", "--config", str(config)]) == 0
    assert "nothing to migrate" in capsys.readouterr().out


def test_a_newer_schema_is_refused(make_settings):
    settings = make_settings()
    _older_database(settings, "head")
    engine = make_engine(settings.database_url)
    with engine.begin() as connection:
        connection.execute(text("update alembic_version set version_num = '9999_from_the_future'"))
    engine.dispose()
    with pytest.raises(SchemaUnknown, match="9999_from_the_future"):
        open_database(settings.database_url)


def test_cli_backup_and_restore(node_folder, tmp_path, capsys):
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{node_folder.node.data_dir}"\naccept_any_calling_ae = true\n')
    assert main(["backup", "--config", str(config), "--to", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    [archive] = (tmp_path / "out").glob("smartnodule-backup-*.tar")
    assert f"backup written: {archive}" in out and "spool" in out

    assert main(["restore", str(archive), "--config", str(config)]) == 2
    assert "--force" in capsys.readouterr().err
    shutil.rmtree(node_folder.node.data_dir)
    assert main(["restore", str(archive), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "restored" in out and "chain intact" in out
    events = [json.loads(line)["event"] for line in (node_folder.log_dir / AUDIT_FILE).read_text().splitlines()]
    assert events[-1] == "backup_restored"
    configure_logging(None)


def test_scheduled_backup_keeps_the_newest(node_folder):
    from node.store.runs import RunOutcome
    from scheduler.service import run_job

    settings = node_folder.model_copy(update={"scheduler": node_folder.scheduler.model_copy(update={"backup_keep": 2})})
    sessions = open_database(settings.database_url)
    runs = [run_job(settings, sessions, "backup") for _ in range(3)]
    assert all(run.outcome is RunOutcome.OK for run in runs)
    kept = sorted(settings.backup_dir.glob("smartnodule-backup-*.tar"))
    assert [Path(json.loads(run.summary)["archive"]) for run in runs[1:]] == kept
    assert json.loads(runs[-1].summary)["removed"] == [Path(json.loads(runs[0].summary)["archive"]).name]


def test_the_postgresql_password_goes_in_the_environment_never_on_the_command_line():
    argv, env = pg_invocation(["pg_dump", "--format=custom"],
                              "postgresql+psycopg://node:s3cr%27et@db.example:5433/smartnodule?sslmode=require")
    assert not any("s3cr" in arg for arg in argv) and env["PGPASSWORD"] == "s3cr'et"
    assert argv[-1] == "--dbname=host='db.example' port='5433' user='node' dbname='smartnodule' sslmode='require'"
