"""The scheduler's tables on the node's database: one row per job run, and APScheduler's job store.

`scheduler_runs` records every run (job name, start, end, outcome ok / failed /
breach, a JSON summary). `apscheduler_jobs` is APScheduler 3's own
SQLAlchemyJobStore table, declared here (same columns) so that Alembic creates
it and autogenerate sees it as part of the schema.
"""
from __future__ import annotations

import enum
import json
from datetime import datetime

from sqlalchemy import Column, Enum, Float, Integer, LargeBinary, String, Table, Text, Unicode, select
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from node.store.db import Base, utcnow


class RunOutcome(str, enum.Enum):
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    BREACH = "breach"


class SchedulerRun(Base):
    """One run of one scheduled (or hand-started) job."""

    __tablename__ = "scheduler_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job: Mapped[str] = mapped_column(String(32), index=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[datetime | None]
    outcome: Mapped[RunOutcome] = mapped_column(Enum(RunOutcome, native_enum=False, length=16))
    trigger: Mapped[str] = mapped_column(String(16), default="schedule")
    summary: Mapped[str | None] = mapped_column(Text)  # JSON


apscheduler_jobs = Table(
    "apscheduler_jobs",
    Base.metadata,
    Column("id", Unicode(191), primary_key=True),
    Column("next_run_time", Float(25), index=True),
    Column("job_state", LargeBinary, nullable=False),
)


def latest_drift(sessions: sessionmaker) -> dict | None:
    """The newest finished drift run for the health page: outcome, when, summary (None: never ran)."""
    with sessions() as session:
        run = session.scalars(select(SchedulerRun).where(SchedulerRun.job == "drift",
                                                         SchedulerRun.outcome != RunOutcome.RUNNING)
                              .order_by(SchedulerRun.id.desc()).limit(1)).first()
        if run is None:
            return None
        return {"outcome": run.outcome.value, "finished_at": run.finished_at,
                "summary": json.loads(run.summary or "{}")}
