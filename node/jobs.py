"""The job queue: admission of received instances, leased claims, and the allowed state transitions.

Claims work on SQLite and PostgreSQL alike: a candidate is selected (with
`FOR UPDATE SKIP LOCKED` where the database has it) and taken by a conditional
UPDATE that succeeds for exactly one claimant.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

import psutil
import structlog

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.db import Delivery, DeliveryState, Job, JobState, utcnow

log = structlog.get_logger(__name__)

S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.RECEIVED: frozenset({S.RUNNING}),
    S.RUNNING: frozenset({S.RUNNING, S.RECEIVED, S.ENCODED, S.SKIPPED, S.REJECTED, S.FAILED}),
    S.ENCODED: frozenset({S.DELIVERING}),
    S.DELIVERING: frozenset({S.DELIVERING, S.ENCODED, S.SENT, S.FAILED_DELIVERY}),
    S.SENT: frozenset({S.ENCODED}),
    S.FAILED_DELIVERY: frozenset({S.ENCODED}),
    S.FAILED: frozenset({S.RECEIVED}),
    S.SKIPPED: frozenset(),
    S.REJECTED: frozenset(),
}

# The two kinds of work a worker claims: (state a job waits in, state while leased).
PROCESS = (S.RECEIVED, S.RUNNING)
DELIVER = (S.ENCODED, S.DELIVERING)


class TransitionError(RuntimeError):
    """A state change that `TRANSITIONS` does not allow."""


@dataclass(frozen=True)
class ReceivedInstance:
    """What the receiver knows about an instance it has just made durable in the spool."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    calling_aet: str
    calling_host: str
    spool_path: str
    size_bytes: int


@dataclass(frozen=True)
class Claim:
    """A job taken by one worker until `lease_expires_at`."""

    job_id: int
    state: JobState
    attempt: int
    owner: str
    lease_expires_at: datetime


def admit(session_factory: sessionmaker, instance: ReceivedInstance) -> tuple[int, bool]:
    """Commit the job row for a spooled instance; returns (job id, created).

    A repeat of a known SOP instance updates nothing and creates no second job:
    one source instance yields one set of results.
    """
    with session_factory.begin() as session:
        existing = session.scalar(select(Job.id).where(Job.sop_instance_uid == instance.sop_instance_uid))
        if existing is not None:
            return existing, False
        job = Job(**instance.__dict__, state=S.RECEIVED, attempts=0, delivery_attempts=0)
        session.add(job)
        session.flush()
        return job.id, True


def claim(
    session_factory: sessionmaker, work: tuple[JobState, JobState], owner: str, lease_s: float
) -> Claim | None:
    """Take the oldest job that is waiting in `work[0]` (and due), or whose lease in `work[1]` expired."""
    waiting, leased = work
    while True:
        now = utcnow()
        with session_factory.begin() as session:
            ready = or_(
                and_(Job.state == waiting, Job.next_attempt_at <= now),
                and_(Job.state == leased, Job.lease_expires_at < now),
            )
            candidate = session.execute(
                select(Job.id, Job.state, Job.lease_expires_at)
                .where(ready)
                .order_by(Job.next_attempt_at, Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if candidate is None:
                return None
            expires = now + timedelta(seconds=lease_s)
            counter = Job.attempts if waiting is S.RECEIVED else Job.delivery_attempts
            taken = session.execute(
                update(Job)
                .where(Job.id == candidate.id, Job.state == candidate.state)
                .where(
                    Job.lease_expires_at.is_(None) if candidate.lease_expires_at is None
                    else Job.lease_expires_at == candidate.lease_expires_at
                )
                .values({Job.state: leased, Job.lease_owner: owner, Job.lease_expires_at: expires,
                         counter: counter + 1, Job.updated_at: now})
                .returning(counter)
            ).first()
            if taken is not None:
                return Claim(candidate.id, leased, taken[0], owner, expires)
        # Another claimant won the race for this row; look again.


def transition(
    session: Session,
    job_id: int,
    claim_or_state: Claim | JobState,
    to: JobState,
    **values,
) -> Job:
    """Move a job to `to`, checking the allowed transitions and, for a claim, that we still hold it."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise TransitionError(f"job {job_id} does not exist")
    expected = claim_or_state.state if isinstance(claim_or_state, Claim) else claim_or_state
    if job.state is not expected:
        raise TransitionError(f"job {job_id} is {job.state.value}, expected {expected.value}")
    if isinstance(claim_or_state, Claim) and job.lease_owner != claim_or_state.owner:
        raise TransitionError(f"job {job_id} lease is held by {job.lease_owner}, not {claim_or_state.owner}")
    if to not in TRANSITIONS[job.state]:
        raise TransitionError(f"job {job_id}: {job.state.value} -> {to.value} is not allowed")
    job.state = to
    if to not in (S.RUNNING, S.DELIVERING):
        job.lease_owner = None
        job.lease_expires_at = None
    for key, value in values.items():
        setattr(job, key, value)
    return job


def ensure_deliveries(session: Session, job: Job, destinations: list[str]) -> list[Delivery]:
    """The job's delivery rows for `destinations`, created PENDING where missing."""
    known = {d.destination: d for d in job.deliveries}
    for name in destinations:
        if name not in known:
            known[name] = Delivery(destination=name, state=DeliveryState.PENDING, attempts=0)
            job.deliveries.append(known[name])
    return [known[name] for name in destinations]


def requeue_delivery(session_factory: sessionmaker, job_id: int) -> JobState:
    """Re-send a job's results (`smartnodule resend`): FAILED_DELIVERY or SENT back to ENCODED."""
    with session_factory.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise TransitionError(f"job {job_id} does not exist")
        previous = job.state
        transition(session, job_id, previous, S.ENCODED, delivery_attempts=0, next_attempt_at=utcnow())
        for delivery in job.deliveries:
            if delivery.state is not DeliveryState.SENT or previous is S.SENT:
                delivery.state = DeliveryState.PENDING
                delivery.attempts = 0
        return previous


HOST = socket.gethostname()


def lease_owner(role: str, index: int) -> str:
    return f"{HOST}/{os.getpid()}/{role}-{index}"


def release_dead_leases(sessions: sessionmaker) -> int:
    """Expire the leases of this host's processes that no longer run; returns how many."""
    with sessions.begin() as session:
        owners = session.scalars(
            Job.__table__.select().with_only_columns(Job.lease_owner).distinct()
            .where(Job.state.in_([JobState.RUNNING, JobState.DELIVERING]), Job.lease_owner.like(f"{HOST}/%"))
        ).all()
        dead = [o for o in owners if not psutil.pid_exists(int(o.split("/")[1]))]
        if not dead:
            return 0
        result = session.execute(update(Job).where(Job.lease_owner.in_(dead)).values(lease_expires_at=utcnow()))
        log.warning("dead_leases_released", owners=dead, jobs=result.rowcount)
        return result.rowcount
