"""The similar-case index: FAISS over the L2-normalised embeddings of past cases, ids = job ids.

Owns how embeddings are searched and kept on disk. Up to `ivf_threshold` cases
the search is exact (IndexFlatIP in an IndexIDMap2); past it the index is
rebuilt as an IndexIVFFlat (inner product, `nlist` clusters, `nprobe` searched).
Inner product of unit vectors is the cosine similarity.

The index lives in `<data_dir>/retrieval/cases.faiss`, written after every
change to a temporary file that replaces it atomically. It is a cache of the
database: `node.cases.rebuild_index` recreates it from the jobs' embeddings of the
model version in service, since embeddings of another model live in another
space. Every public method holds one lock, so the worker, the web app and the
scheduler may share an instance; the composition root (`node/service.py`, the
`smartnodule web` command) creates that one instance and passes it on.

The file is the truth between processes (scale-out roles): every public method
first re-reads it when its generation (inode, size, mtime) differs from the one
this instance last read or wrote, so a worker's `add` after another process's
rebuild adds to the rebuilt cases, and the web role sees cases a worker added.
"""
from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import structlog

from config.settings import RetrievalSettings, Settings

log = structlog.get_logger(__name__)

INDEX_FILE = "cases.faiss"


@dataclass(frozen=True)
class Neighbour:
    """A past case near the query: its job id and cosine similarity (inner product)."""

    job_id: int
    similarity: float


class CaseIndex:
    """Thread-safe FAISS index of case embeddings, persisted in `folder`."""

    def __init__(self, folder: Path, settings: RetrievalSettings) -> None:
        if settings.nlist > settings.ivf_threshold:
            raise ValueError(f"retrieval.nlist ({settings.nlist}) must not exceed "
                             f"retrieval.ivf_threshold ({settings.ivf_threshold})")
        self._folder = Path(folder)
        self._settings = settings
        self._lock = threading.Lock()
        self._index: faiss.Index | None = None
        self._generation: tuple[int, int, int] | None = None
        with self._lock:
            self._reload_if_changed()

    @classmethod
    def from_settings(cls, settings: Settings) -> "CaseIndex":
        return cls(settings.node.data_dir / "retrieval", settings.retrieval)

    def __len__(self) -> int:
        with self._lock:
            self._reload_if_changed()
            return 0 if self._index is None else self._index.ntotal

    @property
    def is_ivf(self) -> bool:
        with self._lock:
            self._reload_if_changed()
            return isinstance(self._index, faiss.IndexIVF)

    def add(self, job_id: int, embedding: np.ndarray | bytes) -> None:
        """Add (or replace) the embedding of `job_id` and persist the index."""
        vector = _as_matrix(embedding, "embedding")
        with self._lock:
            self._reload_if_changed()
            if self._index is None:
                self._index = self._flat(vector.shape[1])
            elif vector.shape[1] != self._index.d:
                raise ValueError(f"embedding has dimension {vector.shape[1]}, the index {self._index.d}")
            ids = np.array([job_id], dtype=np.int64)
            # faiss's Python wrapper takes an id array here; its stubs list only the C++ IDSelector overload
            self._index.remove_ids(ids)  # type: ignore[arg-type]
            self._index.add_with_ids(vector, ids)
            if isinstance(self._index, faiss.IndexIDMap2) and self._index.ntotal > self._settings.ivf_threshold:
                self._index = self._ivf(*_contents(self._index))
                log.info("retrieval_index_switched_to_ivf", cases=self._index.ntotal)
            self._save(self._index)

    def rebuild_from(self, ids: np.ndarray, vectors: np.ndarray | None) -> None:
        """Replace the whole index with `vectors` (rows, unit length) under job `ids`, and persist it."""
        with self._lock:
            if vectors is None or len(vectors) == 0:
                self._index = None
                (self._folder / INDEX_FILE).unlink(missing_ok=True)
                self._generation = None
                return
            ids = np.asarray(ids, dtype=np.int64)
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            if len(vectors) > self._settings.ivf_threshold:
                self._index = self._ivf(ids, vectors)
            else:
                self._index = self._flat(vectors.shape[1])
                self._index.add_with_ids(vectors, ids)
            self._save(self._index)

    def search(self, embedding: np.ndarray | bytes, k: int, exclude_job_id: int | None = None
               ) -> list[Neighbour]:
        """The `k` nearest past cases, most similar first, `exclude_job_id` left out."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        query = _as_matrix(embedding, "embedding")
        with self._lock:
            self._reload_if_changed()
            if self._index is None or self._index.ntotal == 0:
                return []
            if query.shape[1] != self._index.d:
                raise ValueError(f"embedding has dimension {query.shape[1]}, the index {self._index.d}")
            wanted = min(k + (exclude_job_id is not None), self._index.ntotal)
            similarities, ids = self._index.search(query, wanted)
        found = [Neighbour(int(i), float(s)) for s, i in zip(similarities[0], ids[0])
                 if i != -1 and i != exclude_job_id]
        return found[:k]

    def _reload_if_changed(self) -> None:
        """Re-read the file when another instance (or process) replaced or removed it since we last saw it."""
        generation = _generation(self._folder / INDEX_FILE)
        if generation == self._generation:
            return
        if generation is None:
            self._index = None
        else:
            self._index = faiss.read_index(str(self._folder / INDEX_FILE))
            self._set_nprobe(self._index)
            log.info("retrieval_index_reloaded", cases=self._index.ntotal)
        self._generation = generation

    def _flat(self, dimension: int) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))

    def _ivf(self, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
        dimension = vectors.shape[1]
        nlist = min(self._settings.nlist, len(vectors))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dimension), dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.add_with_ids(vectors, ids)
        self._set_nprobe(index)
        return index

    def _set_nprobe(self, index: faiss.Index) -> None:
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = self._settings.nprobe

    def _save(self, index: faiss.Index) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self._folder, prefix=".cases-", suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(index, temp)
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(temp, self._folder / INDEX_FILE)
            self._generation = _generation(self._folder / INDEX_FILE)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def _generation(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, mtime ns) of the index file, None when there is none: each save writes a new inode."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _as_matrix(embedding: np.ndarray | bytes, name: str) -> np.ndarray:
    vector = np.frombuffer(embedding, dtype=np.float32) if isinstance(embedding, bytes) \
        else np.asarray(embedding, dtype=np.float32)
    if vector.ndim != 1 or vector.size == 0 or not np.all(np.isfinite(vector)):
        raise ValueError(f"{name} must be a non-empty finite 1-D vector, got shape {vector.shape}")
    return np.ascontiguousarray(vector.reshape(1, -1))


def _contents(index: faiss.IndexIDMap2) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of a flat IndexIDMap2."""
    ids = faiss.vector_to_array(index.id_map).astype(np.int64)
    return ids, index.index.reconstruct_n(0, index.ntotal)
