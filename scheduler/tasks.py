"""The scheduler's tasks (APScheduler jobs; the DICOM job queue is node/store/jobs.py).

Each takes (settings, sessions) and returns (RunOutcome, summary dict).

drift: `scheduler.drift.check`, alert on breach. retrain: fine-tune in a child
process when enough new adjudicated cases exist (a `FineTuneManifest` in, a
`FineTuneResult` file back, its progress logged as `retrain_progress` events as
it comes), then promote when the gate passed and `registry.auto_promote`. reindex: rebuild the FAISS case index.
retention: delete spool files and results of finished jobs past retention.
echo: C-ECHO every destination. backup: one archive of everything the node
holds (`node.store.backup`), the newest `scheduler.backup_keep` kept.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import structlog
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from config.settings import Settings
from node.alerts import Alert, Alerter
from node.cases import rebuild_index
from node.store.backup import backup as take_backup, prune as prune_backups
from node.store.db import Job, JobState, utcnow
from node.store.review import PROCESSED, Status, Verdict, current_reads, decide
from node.store.runs import RunOutcome
from node.tls import client_context, tls_args
from retrieval.index import CaseIndex
from scheduler import registry
from scheduler.drift import check
from scheduler.fine_tune_contract import AdjudicatedCase, ContractError, FineTuneManifest, FineTuneResult, Progress

log = structlog.get_logger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent


def drift(settings: Settings, sessions: sessionmaker, **_) -> tuple[RunOutcome, dict]:
    report = check(settings, sessions)
    if report.get("breaches"):
        _alert(settings, sessions, "drift", f"model drift: {len(report['breaches'])} breach(es)",
               "; ".join(report["breaches"]))
        return RunOutcome.BREACH, report
    return RunOutcome.OK, report


def _alert(settings: Settings, sessions: sessionmaker, key: str, summary: str, detail: str) -> None:
    alerts = settings.alerts
    if not (alerts.webhook_url or alerts.mail_to):
        return
    Alerter(settings, sessions).send(Alert(key, summary, detail))


# --- retraining ---------------------------------------------------------------------------------------------

def adjudicated_cases(settings: Settings, sessions: sessionmaker) -> list[AdjudicatedCase]:
    """Processed jobs with a final verdict and their spool file: label, click location, held-out flag, watermark."""
    read = select(Verdict.job_id).where(Verdict.superseded_by.is_(None))
    with sessions() as session:
        jobs = {j.id: j for j in session.scalars(select(Job).where(Job.state.in_(PROCESSED), Job.id.in_(read)))}
        reads = current_reads(session, list(jobs))
    cases = []
    for job_id, job_reads in reads.items():
        outcome = decide(job_reads)
        if outcome.status is not Status.FINAL or not Path(jobs[job_id].spool_path).is_file():
            continue
        clicks = [(v.location_row, v.location_col) for v in job_reads
                  if v.nodule_present == outcome.nodule_present and v.location_row is not None and v.location_col is not None]
        location = (sum(c[0] for c in clicks) / len(clicks), sum(c[1] for c in clicks) / len(clicks)) if clicks else None
        uid = jobs[job_id].sop_instance_uid
        cases.append(AdjudicatedCase(
            job_id=job_id, sop_instance_uid=uid, spool_path=Path(jobs[job_id].spool_path),
            nodule_present=bool(outcome.nodule_present), location=location if outcome.nodule_present else None,
            heldout=int(hashlib.sha256(uid.encode()).hexdigest()[:8], 16) % 100 < settings.registry.heldout_percent,
            verdict_id=max(v.id for v in job_reads)))
    return sorted(cases, key=lambda c: c.job_id)


def verdict_watermark(settings: Settings) -> int:
    """The newest verdict id any registered candidate was trained with (0: none yet)."""
    return max([int(v["tags"].get("verdict_watermark", 0)) for v in registry.versions(settings)] + [0])


def retrain(settings: Settings, sessions: sessionmaker, *, force: bool = False, overrides: dict | None = None,
            **_) -> tuple[RunOutcome, dict]:
    """Fine-tune on the adjudicated cases in a child process when enough are new (or `force`).

    `overrides` are FineTuneManifest fields (steps, lr, flip_labels, ...); an unknown one is refused.
    """
    champion = registry.ensure_registered(settings)
    cases = adjudicated_cases(settings, sessions)
    watermark = verdict_watermark(settings)
    new = sum(c.verdict_id > watermark for c in cases)
    if new < settings.registry.min_new_verdicts and not force:
        return RunOutcome.OK, {"status": "waiting", "new_adjudicated": new, "needed": settings.registry.min_new_verdicts}
    mv = registry.client(settings).get_model_version(settings.registry.model_name, champion)
    champion_card = registry.shipped_card(settings) if mv.tags.get("shipped") == "true" \
        else registry.download(settings, champion)
    work = settings.node.data_dir / "fine-tune"
    work.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    manifest = FineTuneManifest.create("retrain job", settings=settings, champion_card=Path(champion_card),
                                       champion_version=champion, cases=tuple(cases),
                                       verdict_watermark=max([c.verdict_id for c in cases] + [watermark]),
                                       result_path=work / f"result-{stamp}.json", **(overrides or {}))
    manifest_path = manifest.write(work / f"manifest-{stamp}.json")
    started = time.monotonic()
    try:
        stream_child(["-m", "scheduler.fine_tune", str(manifest_path), "--progress", "never"], work / "last.log",
                     settings.registry.fine_tune_timeout_s)
        result = FineTuneResult.read(manifest.result_path)
    finally:
        manifest_path.unlink(missing_ok=True)
        manifest.result_path.unlink(missing_ok=True)
    summary = result.summary()
    summary["wall_seconds"] = round(time.monotonic() - started, 2)
    summary["new_adjudicated"] = new
    if result.gate_passed and settings.registry.auto_promote:
        registry.promote(settings, result.registry_version, approved_by="auto (gate passed)")
        summary["promoted"] = True
    log.info("candidate_trained", version=result.registry_version, card_version=result.card_version,
             gate_passed=result.gate_passed, promoted=summary.get("promoted", False))
    return RunOutcome.OK, summary


def stream_child(args: list[str], log_path: Path, timeout_s: float) -> None:
    """Run `python ARGS` (the fine-tune child), streaming: each `Progress` line of its stdout is logged as a
    `retrain_progress` event when it arrives; all its output goes to `log_path` as it comes. Killed after
    `timeout_s`. RuntimeError (with the last line of its stderr) unless it exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    stderr_lines: list[str] = []
    with open(log_path, "w", buffering=1) as out, subprocess.Popen(
            [sys.executable, *args], cwd=REPO_ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1) as proc:
        timed_out = threading.Event()
        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.start()

        def drain_stderr() -> None:
            for line in proc.stderr or ():  # a pipe (stderr=PIPE)
                out.write(line)
                stderr_lines[:] = [*stderr_lines[-19:], line.rstrip()]

        drainer = threading.Thread(target=drain_stderr, name="fine-tune-stderr", daemon=True)
        drainer.start()
        try:
            for line in proc.stdout or ():  # a pipe (stdout=PIPE)
                out.write(line)
                _log_progress(line)
            proc.wait()
        finally:
            timer.cancel()
            drainer.join(timeout=10)
    if timed_out.is_set():
        raise RuntimeError(f"fine-tune killed after registry.fine_tune_timeout_s = {timeout_s:g} s (its output: {log_path})")
    if proc.returncode != 0:
        last = next((line for line in reversed(stderr_lines) if line.strip()), "")
        raise RuntimeError(f"fine-tune exited {proc.returncode}: {last} (its output: {log_path})")


def _log_progress(line: str) -> None:
    try:
        step = Progress.parse(line)
    except ContractError as exc:
        log.warning("retrain_progress_unreadable", error=str(exc)[:300])
        return
    if step is not None:
        log.info("retrain_progress", phase=step.phase, done=step.done, total=step.total, loss=step.loss,
                 elapsed_s=step.elapsed_s, eta_s=step.eta_s, child_at=step.at)


# --- housekeeping -------------------------------------------------------------------------------------------

def reindex(settings: Settings, sessions: sessionmaker, index: CaseIndex | None = None, **_) -> tuple[RunOutcome, dict]:
    """Rebuild the case index through its owner's instance (`index`, from the composition root) when there is one."""
    return RunOutcome.OK, {"cases": rebuild_index(sessions, CaseIndex.from_settings(settings) if index is None else index)}


def retention(settings: Settings, sessions: sessionmaker, **_) -> tuple[RunOutcome, dict]:
    """Delete the spool file and results of SENT / SKIPPED / REJECTED jobs finished before the retention limit.

    The job rows stay (with their figures and verdicts); a purged case no longer
    feeds retraining or the drift check's image statistics.
    """
    import shutil

    cutoff = utcnow() - timedelta(days=settings.scheduler.retention_days)
    done = (JobState.SENT, JobState.SKIPPED, JobState.REJECTED)
    files = folders = 0
    freed = 0
    with sessions() as session:
        rows = session.execute(select(Job.id, Job.spool_path, Job.results_dir)
                               .where(Job.state.in_(done), Job.finished_at < cutoff)).all()
    spool_root, results_root = settings.spool_dir.resolve(), settings.results_dir.resolve()
    for row in rows:
        spool = Path(row.spool_path).resolve()
        if spool.is_file() and spool.is_relative_to(spool_root):
            freed += spool.stat().st_size
            spool.unlink()
            files += 1
        if row.results_dir:
            results = Path(row.results_dir).resolve()
            if results.is_dir() and results.is_relative_to(results_root):
                freed += sum(p.stat().st_size for p in results.rglob("*") if p.is_file())
                shutil.rmtree(results)
                folders += 1
    return RunOutcome.OK, {"jobs_considered": len(rows), "spool_files_deleted": files, "result_folders_deleted": folders,
                        "bytes_freed": freed, "cutoff": cutoff.isoformat()}


def echo(settings: Settings, sessions: sessionmaker, **_) -> tuple[RunOutcome, dict]:
    """C-ECHO every destination; failed when any does not answer success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # names generated at import, no stubs

    results = {}
    for dest in settings.destinations:
        ae = AE(ae_title=settings.node.ae_title)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.delivery.timeout_s
        started = time.perf_counter()
        tls = tls_args(client_context(settings.tls), dest.host) if dest.tls else None
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
            if not assoc.is_established:
                results[dest.name] = {"ok": False, "error": "association rejected or aborted"}
                continue
            status = assoc.send_c_echo()
            assoc.release()
            ok = bool(status) and status.Status == 0x0000
            results[dest.name] = {"ok": ok, "round_trip_ms": round((time.perf_counter() - started) * 1000, 1),
                                  "status": f"0x{status.Status:04X}" if status else None}
        except Exception as exc:
            results[dest.name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
    failed = [name for name, r in results.items() if not r["ok"]]
    if failed:
        _alert(settings, sessions, "echo_failed", f"C-ECHO failed: {', '.join(failed)}", json.dumps(results))
    return (RunOutcome.FAILED if failed else RunOutcome.OK), {"destinations": results}


def backup(settings: Settings, sessions: sessionmaker, **_) -> tuple[RunOutcome, dict]:
    """One archive of everything the node holds (`node.store.backup`, as `smartnodule backup`) into
    `scheduler.backup_dir`; the newest `scheduler.backup_keep` archives are kept."""
    manifest = take_backup(settings, settings.backup_dir)
    removed = prune_backups(settings.backup_dir, settings.scheduler.backup_keep)
    return RunOutcome.OK, {"archive": str(manifest.path), "bytes": manifest.size_bytes, "files": manifest.files,
                        "schema_revision": manifest.schema_revision, "skipped": list(manifest.skipped),
                        "removed": [path.name for path in removed]}


JOBS = {"drift": drift, "retrain": retrain, "reindex": reindex, "retention": retention, "echo": echo,
        "backup": backup}
