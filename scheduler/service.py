"""The node's background scheduler: APScheduler 3 BackgroundScheduler, job store in the node's database.

`Scheduler(settings, sessions, index)` adds each job of `scheduler.tasks.JOBS` whose
schedule in `[scheduler]` is not empty (crontab or "every N[smhd]"), replacing
the stored definition, so the settings file stays the one home of every
schedule. Every run is a row of `scheduler_runs` (outcome ok / failed /
breach, summary JSON). A job that raises is logged (`scheduled_job_failed`),
recorded as failed and runs again at its next time; nothing reaches the node.
"""
from __future__ import annotations

import json
import threading
import traceback

import structlog
from sqlalchemy.orm import sessionmaker

from config.settings import Settings, trigger_of
from node.store.db import utcnow
from node.store.runs import RunOutcome, SchedulerRun
from retrieval.index import CaseIndex
from scheduler.tasks import JOBS

log = structlog.get_logger(__name__)

_ACTIVE: "Scheduler | None" = None  # the started scheduler whose jobs the stored job references run


def run_job(settings: Settings, sessions: sessionmaker, name: str, trigger: str = "schedule", **kwargs) -> SchedulerRun:
    """Run job `name` now, recorded in `scheduler_runs`; never raises for the job's own errors."""
    if name not in JOBS:
        raise ValueError(f"job must be one of {', '.join(JOBS)}, got {name!r}")
    with sessions.begin() as session:
        run = SchedulerRun(job=name, started_at=utcnow(), outcome=RunOutcome.RUNNING, trigger=trigger)
        session.add(run)
        session.flush()
        run_id = run.id
    bound = log.bind(job=name, run_id=run_id)
    bound.info("scheduled_job_started", trigger=trigger)
    try:
        outcome, summary = JOBS[name](settings, sessions, **kwargs)
    except Exception as exc:
        outcome, summary = RunOutcome.FAILED, {"error": f"{type(exc).__name__}: {exc}"[:1000],
                                            "traceback": traceback.format_exc()[-3000:]}
        bound.error("scheduled_job_failed", error=summary["error"])
    with sessions.begin() as session:
        run = session.get(SchedulerRun, run_id)
        run.outcome, run.finished_at = outcome, utcnow()
        run.summary = json.dumps(summary, default=str)
    bound.info("scheduled_job_finished", outcome=outcome.value)
    return run


def _run_stored(name: str) -> None:
    """What the persistent job store references (`scheduler.service:_run_stored`)."""
    active = _ACTIVE
    if active is None:
        log.error("scheduled_job_failed", job=name, error="no scheduler is running in this process")
        return
    run_job(active.settings, active.sessions, name, index=active.index)


class Scheduler:
    """Start/stop the background jobs of one node (or of `smartnodule scheduler` alone)."""

    def __init__(self, settings: Settings, sessions: sessionmaker, index: CaseIndex | None = None) -> None:
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
        from apscheduler.schedulers.background import BackgroundScheduler

        self.settings, self.sessions, self.index = settings, sessions, index
        cfg = settings.scheduler
        self.triggers = {name: trigger_of(getattr(cfg, name), cfg.timezone) for name in JOBS}
        self._scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=sessions.kw["bind"])},
            executors={"default": {"type": "threadpool", "max_workers": 2}},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": cfg.misfire_grace_s},
            timezone=cfg.timezone)
        self._lock = threading.Lock()

    def start(self) -> None:
        global _ACTIVE
        with self._lock:
            _ACTIVE = self
            self._scheduler.start(paused=True)
            for name in JOBS:
                trigger = self.triggers[name]
                if trigger is None:
                    if self._scheduler.get_job(name):
                        self._scheduler.remove_job(name)
                    continue
                self._scheduler.add_job("scheduler.service:_run_stored", trigger, args=[name], id=name, name=name,
                                        replace_existing=True)
            self._scheduler.resume()
        log.info("scheduler_started", jobs=self.jobs())

    def jobs(self) -> dict[str, str]:
        return {j.id: str(j.next_run_time) for j in self._scheduler.get_jobs()}

    def stop(self) -> None:
        global _ACTIVE
        with self._lock:
            if self._scheduler.running:
                self._scheduler.shutdown(wait=False)
            if _ACTIVE is self:
                _ACTIVE = None
        log.info("scheduler_stopped")
