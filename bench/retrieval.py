"""Similar-case retrieval: query time of the FAISS case index, exact (flat) and IVF, side by side.

Fills an index with N unit embeddings of the model's dimension plus a near-duplicate of
one of them, then times Q queries per index kind and checks that the near-duplicate is
the nearest neighbour of its original.

    .venv/bin/python -m bench.retrieval --n 5000
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import load1, print_table
from config.settings import RetrievalSettings
from retrieval.index import CaseIndex

DIMENSION = 256


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


def measure(kind: str, embeddings: np.ndarray, queries: int, k: int) -> dict:
    n = len(embeddings)
    threshold = n + 10 if kind == "flat" else 100
    index = CaseIndex(Path(tempfile.mkdtemp(prefix=f"bench-{kind}-")),
                      RetrievalSettings(ivf_threshold=threshold, nlist=max(16, int(np.sqrt(n))), nprobe=8))
    started = time.perf_counter()
    index.rebuild_from(np.arange(1, n + 1), embeddings)
    build_s = time.perf_counter() - started
    rng = np.random.default_rng(1)
    seconds = []
    for job_id in rng.integers(1, n, queries):
        start = time.perf_counter()
        index.search(embeddings[job_id - 1], k)
        seconds.append(time.perf_counter() - start)
    nearest = index.search(embeddings[9], 2, exclude_job_id=10)[0].job_id  # job 10's near-duplicate is job n
    return {"kind": kind, "ivf": index.is_ivf, "build_s": round(build_s, 3),
            "median_ms": round(1000 * statistics.median(seconds), 3),
            "p95_ms": round(1000 * sorted(seconds)[int(0.95 * (len(seconds) - 1))], 3),
            "near_duplicate_found": nearest == n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    embeddings = unit(rng.normal(size=(args.n, DIMENSION)))
    embeddings[-1] = unit(embeddings[9] + 0.05 * rng.normal(size=DIMENSION))  # near-duplicate of job 10
    results = [measure(kind, embeddings, args.queries, args.k) for kind in ("flat", "ivf")]
    print_table(["index", "IVF", "build s", "median ms", "p95 ms", "near-duplicate first"],
                [[r["kind"], r["ivf"], r["build_s"], r["median_ms"], r["p95_ms"], r["near_duplicate_found"]]
                 for r in results])
    print(json.dumps({"bench": "retrieval", "n": args.n, "dimension": DIMENSION,
                      **{f"{r['kind']}_median_ms": r["median_ms"] for r in results},
                      **{f"{r['kind']}_p95_ms": r["p95_ms"] for r in results},
                      "near_duplicate_found": all(r["near_duplicate_found"] for r in results), "load1": load1()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
