"""The review tables (users, their sessions, verdicts) on the node's database, and the rule that makes a verdict final.

Only reviewers and adjudicators read cases (`READING_ROLES`): an administrator's
verdict is refused by `record_verdict` and ignored by `decide`, so it can never
become a final verdict that feeds drift checks and retraining.

A verdict is never edited: a reviewer who changes their mind records a new
row, and the old one points to it through `superseded_by`. The current reads
of a case are the rows not superseded, one per reviewer.

The final-verdict rule (`final_verdict`):
- no read: the case is unread;
- one read (by anyone, adjudicator included): provisional, pending a second read;
- two or more reads that agree on nodule present/absent: final;
- reads that disagree: the most recent adjudicator's read among them is final;
  without one the case needs an adjudicator.
Final means the case leaves every review queue; otherwise it stays in the
queue of each user who has not read it yet (a case that needs adjudication
only in the adjudicators' queue).
"""
from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Boolean, Enum, Float, ForeignKey, Integer, String, Text, false, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from node.store.db import Base, Job, JobState, utcnow
from node.store.roles import Role

# Jobs whose results exist: the ones a reviewer can read.
PROCESSED = (JobState.ENCODED, JobState.DELIVERING, JobState.SENT, JobState.FAILED_DELIVERY)


READING_ROLES = frozenset({Role.REVIEWER, Role.ADJUDICATOR})


class NotAReader(PermissionError):
    """A user whose role may not record verdicts tried to."""


class User(Base):
    """A person who may log in: argon2 password hash, SHA-256 of their API token."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=16))
    password_hash: Mapped[str] = mapped_column(String(256))
    api_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class WebSession(Base):
    """One login: the cookie carries a random id, only its SHA-256 is stored here.

    Logging out deletes the row; a password change, a disable or a token
    rotation deletes every row of the user, so every copy of every cookie ends.
    """

    __tablename__ = "web_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class Verdict(Base):
    """One expert read of one job; a changed read is a new row that supersedes this one."""

    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    reviewer: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=16))
    nodule_present: Mapped[bool] = mapped_column(Boolean)
    location_row: Mapped[float | None] = mapped_column(Float)
    location_col: Mapped[float | None] = mapped_column(Float)
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("verdicts.id"))


class Status(str, enum.Enum):
    UNREAD = "unread"
    PROVISIONAL = "provisional"
    NEEDS_ADJUDICATION = "needs adjudication"
    FINAL = "final"


@dataclass(frozen=True)
class CaseStanding:
    """Where a case stands: status, the verdict (final or provisional, else None), who has read it."""

    status: Status
    nodule_present: bool | None
    readers: frozenset[str]

    @property
    def label(self) -> str | None:
        """'present' / 'absent' for a final verdict, else None (as SimilarCase.verdict wants)."""
        if self.status is not Status.FINAL:
            return None
        return "present" if self.nodule_present else "absent"


def decide(reads: Iterable[Verdict]) -> CaseStanding:
    """Apply the final-verdict rule to the current reads of one case (reads by other roles are ignored)."""
    reads = sorted((v for v in reads if v.role in READING_ROLES), key=lambda v: (v.created_at, v.id))
    readers = frozenset(v.reviewer for v in reads)
    values = {v.nodule_present for v in reads}
    if not reads:
        return CaseStanding(Status.UNREAD, None, readers)
    if len(reads) == 1:
        return CaseStanding(Status.PROVISIONAL, reads[0].nodule_present, readers)
    if len(values) == 1:
        return CaseStanding(Status.FINAL, values.pop(), readers)
    adjudications = [v for v in reads if v.role is Role.ADJUDICATOR]
    if adjudications:
        return CaseStanding(Status.FINAL, adjudications[-1].nodule_present, readers)
    return CaseStanding(Status.NEEDS_ADJUDICATION, None, readers)


def current_reads(session: Session, job_ids: Iterable[int]) -> dict[int, list[Verdict]]:
    """The reads not superseded of each of `job_ids` (jobs without a read map to [])."""
    ids = list(job_ids)
    reads: dict[int, list[Verdict]] = {job_id: [] for job_id in ids}
    if ids:
        for verdict in session.scalars(select(Verdict).where(Verdict.job_id.in_(ids),
                                                             Verdict.superseded_by.is_(None))):
            reads[verdict.job_id].append(verdict)
    return reads


def final_verdict(session: Session, job_id: int) -> CaseStanding:
    """Where the case of `job_id` stands under the final-verdict rule (module docstring)."""
    return decide(current_reads(session, [job_id])[job_id])


def outcomes(session: Session, job_ids: Iterable[int]) -> dict[int, CaseStanding]:
    """`final_verdict` of many jobs in one query."""
    return {job_id: decide(reads) for job_id, reads in current_reads(session, job_ids).items()}


def record_verdict(session: Session, job_id: int, user: User, *, nodule_present: bool,
                   location: tuple[float, float] | None, comment: str | None) -> Verdict:
    """Add `user`'s read of `job_id`, superseding their previous one; the caller commits.

    Raises `NotAReader` for a user whose role may not read cases.
    """
    if user.role not in READING_ROLES:
        raise NotAReader(f"role {user.role.value} may not record verdicts")
    verdict = Verdict(job_id=job_id, reviewer=user.username, role=user.role, nodule_present=nodule_present,
                      location_row=location[0] if location else None,
                      location_col=location[1] if location else None,
                      comment=comment or None, created_at=utcnow())
    session.add(verdict)
    session.flush()
    previous = session.scalars(select(Verdict).where(
        Verdict.job_id == job_id, Verdict.reviewer == user.username,
        Verdict.superseded_by.is_(None), Verdict.id != verdict.id))
    for old in previous:
        old.superseded_by = verdict.id
    return verdict


def awaits(outcome: CaseStanding, user: User) -> bool:
    """Whether the case belongs in `user`'s review queue (never in an administrator's)."""
    if user.role not in READING_ROLES or outcome.status is Status.FINAL or user.username in outcome.readers:
        return False
    return outcome.status is not Status.NEEDS_ADJUDICATION or user.role is Role.ADJUDICATOR


def review_queue(session: Session, user: User) -> list[tuple[Job, CaseStanding]]:
    """The processed jobs flagged for review that await `user`'s read, oldest first."""
    jobs = list(session.scalars(select(Job).where(Job.review_required.is_(True), Job.state.in_(PROCESSED))
                                .order_by(Job.received_at, Job.id)))
    states = outcomes(session, [job.id for job in jobs])
    return [(job, states[job.id]) for job in jobs if awaits(states[job.id], user)]


def open_reviews(session: Session) -> int:
    """How many processed jobs flagged for review have no final verdict yet."""
    ids = session.scalars(select(Job.id).where(Job.review_required.is_(True), Job.state.in_(PROCESSED))).all()
    return sum(outcome.status is not Status.FINAL for outcome in outcomes(session, ids).values())
