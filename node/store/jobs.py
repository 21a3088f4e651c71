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

from node.store.db import Delivery, DeliveryState, Job, JobState, utcnow

log = structlog.get_logger(__name__)

S = JobState
# Besides these, a new version of the instance takes a job from any state back to RECEIVED (`replace_instance`).
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
    content_sha256: str | None = None  # of the spooled file
    version: int = 1


@dataclass(frozen=True)
class KnownInstance:
    """The job row of a SOP instance received before: its id, current version and that version's digest."""

    job_id: int
    version: int
    content_sha256: str | None
    spool_path: str


class StaleVersion(RuntimeError):
    """Another store made a newer version of the instance meanwhile."""


@dataclass(frozen=True)
class Claim:
    """A job taken by one worker until `lease_expires_at`."""

    job_id: int
    state: JobState
    attempt: int
    owner: str
    lease_expires_at: datetime


def known_instance(session_factory: sessionmaker, sop_instance_uid: str) -> KnownInstance | None:
    """What the database knows of `sop_instance_uid`, or None for a new instance."""
    with session_factory() as session:
        row = session.execute(select(Job.id, Job.version, Job.content_sha256, Job.spool_path)
                              .where(Job.sop_instance_uid == sop_instance_uid)).first()
    return None if row is None else KnownInstance(*row)


def admit(session_factory: sessionmaker, instance: ReceivedInstance) -> tuple[int, bool]:
    """Commit the job row for a spooled instance; returns (job id, created).

    A repeat of a known SOP instance updates nothing and creates no second job:
    one source instance yields one set of results (a new version of it goes
    through `replace_instance`).
    """
    with session_factory.begin() as session:
        existing = session.scalar(select(Job.id).where(Job.sop_instance_uid == instance.sop_instance_uid))
        if existing is not None:
            return existing, False
        job = Job(**instance.__dict__, state=S.RECEIVED, attempts=0, delivery_attempts=0)
        session.add(job)
        session.flush()
        return job.id, True


def replace_instance(session_factory: sessionmaker, known: KnownInstance, instance: ReceivedInstance) -> None:
    """Make `instance` (version `known.version + 1`, already in the spool) the job's instance, and start over.

    The job goes back to RECEIVED from whatever state it was in (the one move outside
    `TRANSITIONS`), its
    counters and lease cleared and its deliveries pending again, so the new version
    is processed and its results, which carry the same deterministic UIDs, replace
    the earlier ones. A worker still busy with the earlier version loses its lease
    check. StaleVersion when another store changed the version meanwhile.
    """
    now = utcnow()
    with session_factory.begin() as session:
        replaced = session.execute(
            update(Job).where(Job.id == known.job_id, Job.version == known.version)
            .values(version=instance.version, content_sha256=instance.content_sha256,
                    spool_path=instance.spool_path, size_bytes=instance.size_bytes,
                    transfer_syntax_uid=instance.transfer_syntax_uid, modality=instance.modality,
                    calling_aet=instance.calling_aet, calling_host=instance.calling_host,
                    state=S.RECEIVED, reason=None, attempts=0, delivery_attempts=0, lease_owner=None,
                    lease_expires_at=None, next_attempt_at=now, finished_at=None, updated_at=now)
        ).rowcount
        if not replaced:
            raise StaleVersion(f"job {known.job_id} is no longer at version {known.version}")
        session.execute(update(Delivery).where(Delivery.job_id == known.job_id)
                        .values(state=DeliveryState.PENDING, attempts=0, last_status=None, last_error=None))


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
