"""The job queue: exclusive claims under concurrency, lease expiry, allowed transitions, dead-lease recovery."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from node.store.db import Job, JobState, open_database, utcnow
from node.store.jobs import DELIVER, PROCESS, ReceivedInstance, TransitionError, admit, claim, requeue_delivery, transition
from node.store.jobs import release_dead_leases


def instance(n: int) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=f"1.2.3.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.0", transfer_syntax_uid="1.2.840.10008.1.2.1", modality="DX",
        calling_aet="STORESCU", calling_host="127.0.0.1", spool_path=f"/spool/{n}.dcm", size_bytes=100)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def sessions(request, tmp_path):
    """The same queue on the embedded database and on the scale-out one."""
    if request.param == "sqlite":
        return open_database(f"sqlite:///{tmp_path / 'jobs.db'}")
    return open_database(request.getfixturevalue("postgres_url"))


def test_admit_is_idempotent_per_sop_instance(sessions):
    first, created = admit(sessions, instance(1))
    again, created_again = admit(sessions, instance(1))
    assert first == again and created and not created_again


def test_concurrent_claims_take_each_job_exactly_once(sessions):
    for n in range(60):
        admit(sessions, instance(n))
    taken: list[int] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        while (c := claim(sessions, PROCESS, f"host/1/w{index}", lease_s=60)) is not None:
            with lock:
                taken.append(c.job_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == list(range(1, 61))


def test_expired_lease_is_claimed_again_and_counts_the_attempt(sessions):
    job_id, _ = admit(sessions, instance(1))
    first = claim(sessions, PROCESS, "host/1/a", lease_s=0.2)
    assert first.attempt == 1 and claim(sessions, PROCESS, "host/1/b", lease_s=60) is None
    time.sleep(0.3)
    second = claim(sessions, PROCESS, "host/1/b", lease_s=60)
    assert (second.job_id, second.attempt, second.owner) == (job_id, 2, "host/1/b")
    with sessions.begin() as session, pytest.raises(TransitionError, match="lease is held by host/1/b"):
        transition(session, job_id, first, JobState.ENCODED)


def test_transitions_outside_the_table_are_refused(sessions):
    job_id, _ = admit(sessions, instance(1))
    with sessions.begin() as session, pytest.raises(TransitionError, match="RECEIVED -> SENT is not allowed"):
        transition(session, job_id, JobState.RECEIVED, JobState.SENT)


def test_delivery_waits_for_its_backoff(sessions):
    job_id, _ = admit(sessions, instance(1))
    taken = claim(sessions, PROCESS, "host/1/a", lease_s=60)
    with sessions.begin() as session:
        transition(session, job_id, taken, JobState.ENCODED, next_attempt_at=utcnow() + timedelta(seconds=30))
    assert claim(sessions, DELIVER, "host/1/d", lease_s=60) is None
    with sessions.begin() as session:
        session.execute(update(Job).values(next_attempt_at=utcnow()))
    assert claim(sessions, DELIVER, "host/1/d", lease_s=60).job_id == job_id


def test_resend_moves_failed_delivery_back_to_encoded(sessions):
    job_id, _ = admit(sessions, instance(1))
    with sessions.begin() as session:
        session.execute(update(Job).values(state=JobState.FAILED_DELIVERY))
    assert requeue_delivery(sessions, job_id) is JobState.FAILED_DELIVERY
    with sessions() as session:
        assert session.get(Job, job_id).state is JobState.ENCODED
    with pytest.raises(TransitionError):
        requeue_delivery(sessions, job_id + 1)


def test_leases_of_dead_processes_on_this_host_are_released(sessions):
    from node.store.jobs import HOST

    admit(sessions, instance(1))
    admit(sessions, instance(2))
    claim(sessions, PROCESS, f"{HOST}/999999999/process-0", lease_s=3600)  # no such pid
    claim(sessions, PROCESS, f"{HOST}/1/process-0", lease_s=3600)  # pid 1 is alive
    assert release_dead_leases(sessions) == 1
    retaken = claim(sessions, PROCESS, f"{HOST}/2/process-0", lease_s=60)
    assert retaken is not None and retaken.attempt == 2
    with sessions() as session:
        assert session.scalar(select(Job.lease_owner).where(Job.id == retaken.job_id)) == f"{HOST}/2/process-0"
