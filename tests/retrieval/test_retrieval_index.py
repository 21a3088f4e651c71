"""Similar-case retrieval: the near-duplicate is found, exact and IVF; the index survives a restart."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from config.settings import RetrievalSettings
from node.db import Job, JobState, open_database
from retrieval.cases import similar_cases
from retrieval.index import INDEX_FILE, CaseIndex
from review_web.models import Role, User, record_verdict

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
    index = filled(tmp_path, embeddings[:50])
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
    assert index.rebuild(sessions) == count + 1
    assert index.is_ivf is ivf
    cases = similar_cases(sessions, index, embeddings[10], k=3, exclude_job_id=count + 1)  # job 11's embedding
    assert len(cases) == 3
    assert cases[0].verdict == "present" and cases[0].similarity > 0.9
    assert cases[1].verdict is None
