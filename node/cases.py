"""Similar past cases of a job, joined with their final verdicts: the one place that join is made.

The worker puts the result into the PDF report (`similar_cases`), the review
page and the API show it with links (`similar_jobs`). The date shown is the
date the node received the past case (no patient data leaves the database).
"""
from __future__ import annotations

import numpy as np
import structlog
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node.store.db import Job
from retrieval.index import CaseIndex
from node.store.review import outcomes
from sr_writer.encode import SimilarCase

log = structlog.get_logger(__name__)


def similar_jobs(sessions: sessionmaker, index: CaseIndex, job_id: int, k: int
                 ) -> list[tuple[int, SimilarCase]]:
    """(job id, SimilarCase) of the `k` past cases nearest to `job_id`, most similar first.

    A job without an embedding (not processed yet) has no similar cases.
    """
    with sessions() as session:
        embedding = session.scalar(select(Job.embedding).where(Job.id == job_id))
    if embedding is None:
        return []
    return nearest_cases(sessions, index, embedding, k, exclude_job_id=job_id)


def nearest_cases(sessions: sessionmaker, index: CaseIndex, embedding: np.ndarray | bytes, k: int,
                  exclude_job_id: int | None = None) -> list[tuple[int, SimilarCase]]:
    """(job id, SimilarCase) of the `k` past cases nearest to `embedding`, with their final verdicts."""
    neighbours = index.search(embedding, k, exclude_job_id=exclude_job_id)
    ids = [n.job_id for n in neighbours]
    with sessions() as session:
        jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(ids)))}
        verdicts = outcomes(session, ids)
    return [(n.job_id, SimilarCase(received_on=jobs[n.job_id].received_at.date().isoformat(),
                                   probability=min(max(jobs[n.job_id].probability or 0.0, 0.0), 1.0),
                                   verdict=verdicts[n.job_id].label,
                                   similarity=min(max(n.similarity, 0.0), 1.0)))
            for n in neighbours if n.job_id in jobs]


def similar_cases(sessions: sessionmaker, index: CaseIndex, embedding: np.ndarray | bytes, k: int,
                  exclude_job_id: int | None = None) -> list[SimilarCase]:
    """The `k` past cases nearest to `embedding` with their final verdicts (for the PDF report)."""
    return [case for _, case in nearest_cases(sessions, index, embedding, k, exclude_job_id)]


def rebuild_index(sessions: sessionmaker, index: CaseIndex, model_version: str | None = None) -> int:
    """Recreate `index` from the database; returns the number of cases indexed.

    Only jobs of `model_version` (default: that of the most recently encoded
    job) are taken: another model's embeddings are not comparable.
    """
    with sessions() as session:
        if model_version is None:
            model_version = session.scalar(
                select(Job.model_version).where(Job.embedding.is_not(None))
                .order_by(Job.encoded_at.desc(), Job.id.desc()).limit(1))
        rows = [] if model_version is None else session.execute(
            select(Job.id, Job.embedding)
            .where(Job.embedding.is_not(None), Job.model_version == model_version)
            .order_by(Job.id)).all()
    ids = np.array([row.id for row in rows], dtype=np.int64)
    vectors = np.stack([np.frombuffer(row.embedding, dtype=np.float32) for row in rows]) if rows else None
    index.rebuild_from(ids, vectors)
    log.info("retrieval_index_rebuilt", cases=len(rows), model_version=model_version)
    return len(rows)
