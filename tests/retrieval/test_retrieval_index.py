"""Similar-case retrieval: the near-duplicate is found, exact and IVF; the index survives a restart."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from config.settings import RetrievalSettings
from node.store.db import Job, JobState, open_database
from node.cases import rebuild_index, similar_cases
from retrieval.index import INDEX_FILE, CaseIndex
from node.store.review import Role, User, record_verdict

DIM = 64
COUNT = 3000


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def embeddings() -> np.ndarray:
    return unit(np.random.default_rng(7).standard_normal((COUNT, DIM)))


def near_duplicate(vector: np.ndarray, seed: int = 1) -> np.ndarray:
    return unit(vector + 0.05 * np.random.default_rng(seed).standard_normal(vector.shape).astype(np.float32))


def filled(folder, embeddings, **settings) -> CaseIndex:
    index = CaseIndex(folder, RetrievalSettings(**settings))
    for job_id, vector in enumerate(embeddings, start=1):
        index.add(job_id, vector)
    return index


@pytest.mark.parametrize("settings, ivf", [
    ({"ivf_threshold": 5000}, False),
    ({"ivf_threshold": 1000, "nlist": 32, "nprobe": 4}, True),
])
def test_nearest_neighbour_is_the_near_duplicate(tmp_path, embeddings, settings, ivf):
    index = CaseIndex(tmp_path, RetrievalSettings(**settings))
    for job_id, vector in enumerate(embeddings[:1200], start=1):  # one by one, as the worker adds
        index.add(job_id, vector)
    assert index.is_ivf is ivf
    query = near_duplicate(embeddings[500])
    found = index.search(query, 5)
    assert found[0].job_id == 501 and found[0].similarity > 0.9
    assert [n.similarity for n in found] == sorted((n.similarity for n in found), reverse=True)
    assert all(n.job_id != 501 for n in index.search(query, 5, exclude_job_id=501))


def test_adding_a_job_again_replaces_its_embedding(tmp_path, embeddings):
    index = filled(tmp_path, embeddings[:10])
    index.add(3, embeddings[7])
    assert len(index) == 10
    assert {n.job_id for n in index.search(embeddings[7], 2)} == {3, 8}


def test_index_persists_and_is_reloaded(tmp_path, embeddings):
    filled(tmp_path, embeddings[:50])
    assert (tmp_path / INDEX_FILE).is_file() and not list(tmp_path.glob(".cases-*"))
    again = CaseIndex(tmp_path, RetrievalSettings())
    assert len(again) == 50
    assert again.search(embeddings[20], 1)[0].job_id == 21


def test_bad_input_names_the_parameter(tmp_path, embeddings):
    index = filled(tmp_path, embeddings[:3])
    with pytest.raises(ValueError, match="embedding has dimension 8"):
        index.add(9, unit(np.ones(8)))
    with pytest.raises(ValueError, match="k must be"):
        index.search(embeddings[0], 0)
    with pytest.raises(ValueError, match="retrieval.nlist"):
        CaseIndex(tmp_path, RetrievalSettings(ivf_threshold=10, nlist=20))


def _job(i: int, embedding: np.ndarray, version: str = "1.0") -> Job:
    encoded = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=i if version == "1.0" else -1)
    return Job(sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
               study_instance_uid=f"1.2.3.{i}.1", series_instance_uid=f"1.2.3.{i}.2",
               transfer_syntax_uid="1.2.840.10008.1.2.1", calling_aet="STORESCU", spool_path="/nonexistent",
               size_bytes=1, state=JobState.SENT, model_version=version, probability=0.5,
               encoded_at=encoded, embedding=embedding.tobytes())


@pytest.mark.parametrize("count, ivf", [(300, False), (COUNT, True)])
def test_rebuild_from_database_and_similar_cases_with_verdicts(tmp_path, embeddings, count, ivf):
    sessions = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with sessions.begin() as session:
        session.add_all(_job(i, embeddings[i]) for i in range(count))
        session.add(_job(count, near_duplicate(embeddings[10])))
        session.add(_job(count + 1, embeddings[11], version="0.9"))  # another model's space: left out
        session.flush()
        for name in ("ann", "bob"):
            record_verdict(session, 11, User(username=name, role=Role.REVIEWER), nodule_present=True,
                           location=None, comment=None)
    index = CaseIndex(tmp_path / "retrieval", RetrievalSettings(ivf_threshold=1000, nlist=32, nprobe=4))
    assert rebuild_index(sessions, index) == count + 1
    assert index.is_ivf is ivf
    cases = similar_cases(sessions, index, embeddings[10], k=3, exclude_job_id=count + 1)  # job 11's embedding
    assert len(cases) == 3
    assert cases[0].verdict == "present" and cases[0].similarity > 0.9
    assert cases[1].verdict is None


# --- one index, one file: the case index seen by several instances (roles, processes) ----------------------

def _database_with_cases(tmp_path, embeddings, count):
    sessions = open_database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with sessions.begin() as session:
        session.add_all(_job(i, embeddings[i]) for i in range(1, count + 1))
    return sessions


def test_worker_add_after_a_reindex_elsewhere_keeps_the_rebuilt_cases(tmp_path, embeddings):
    sessions = _database_with_cases(tmp_path, embeddings, 40)
    folder = tmp_path / "retrieval"
    worker = filled(folder, embeddings[1:4])  # the worker's copy: jobs 1-3 (ids from 1), before the reindex
    assert len(worker) == 3
    nightly = CaseIndex(folder, RetrievalSettings())  # the scheduler's reindex in another process
    assert rebuild_index(sessions, nightly) == 40
    worker.add(41, embeddings[41])  # the worker's next case
    assert len(worker) == 41
    reread = CaseIndex(folder, RetrievalSettings())
    assert len(reread) == 41  # the file kept the rebuilt cases, not the worker's stale three
    assert reread.search(embeddings[30], 1)[0].job_id == 30


def test_web_role_sees_a_case_added_by_a_worker(tmp_path, embeddings):
    folder = tmp_path / "retrieval"
    web = CaseIndex(folder, RetrievalSettings())  # loaded once at the web role's start, empty then
    assert len(web) == 0 and web.search(embeddings[5], 1) == []
    worker = CaseIndex(folder, RetrievalSettings())
    worker.add(5, embeddings[5])
    assert web.search(embeddings[5], 1)[0].job_id == 5
    worker.add(6, embeddings[6])
    assert len(web) == 2


def test_scheduler_reindex_rebuilds_the_instance_the_root_passed(tmp_path, embeddings, make_settings):
    from scheduler.tasks import reindex
    from scheduler.service import Scheduler, _run_stored

    settings = make_settings()
    sessions = _database_with_cases(tmp_path, embeddings, 25)
    root = CaseIndex.from_settings(settings)  # the composition root's one instance
    root.add(99, embeddings[99])
    scheduler = Scheduler(settings, sessions, root)
    scheduler.start()
    try:
        _run_stored("reindex")  # what the stored APScheduler job runs
    finally:
        scheduler.stop()
    assert len(root) == 25 and root.search(embeddings[99], 1)[0].job_id != 99
    assert reindex(settings, sessions, index=root)[1] == {"cases": 25}
