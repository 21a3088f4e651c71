"""Sustained load: a burst of M single-image 2048 px studies from 4 concurrent DCMTK senders through the full node.

Default: one `smartnodule run` process (SCP, one worker, delivery; SQLite).
`--workers 1 2 3`: for each K, one `smartnodule scp` and K `smartnodule worker`
processes on a fresh PostgreSQL database (created on --database-url's server
and dropped afterwards). Results go to a local Orthanc. Throughput is studies
per hour from the first `received_at` to the last `finished_at` of the SENT job
rows; peak RSS sums the node processes (sampled every 0.5 s); the queue depth
(job rows not yet finished) is sampled every second and written as CSV and PNG
under test-output/bench/; the per-stage medians come from each job's stage_seconds.

    .venv/bin/python -m bench.sustained --m 200
    .venv/bin/python -m bench.sustained --m 60 --workers 1 2 3
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sqlalchemy import create_engine, func, select, text

from bench.common import free_port, load1, model_card, node_env, phantoms, print_table, rss_mb, send, start_node, stop_process, \
    wait_listening
from node.store.db import TERMINAL, Job, JobState, open_database
from node.orthanc_peer import OrthancPeer

OUT = Path(__file__).resolve().parent.parent / "test-output" / "bench"
POSTGRES = "postgresql+psycopg://postgres:postgres@127.0.0.1:5432/postgres"


@dataclass
class Samples:
    """What the sampler thread saw: (seconds since start, jobs not finished) and the peak RSS."""

    depth: list[tuple[float, int]]
    peak_rss_mb: float = 0.0


@contextmanager
def fresh_postgres(server_url: str):
    """A new database on `server_url`'s server, yielded as a URL and dropped afterwards."""
    name = f"smartnodule_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def wait_started(audit: Path, processes: list[subprocess.Popen], timeout_s: float = 300) -> None:
    """Wait for every process's `node_started` event (workers log it once their model is loaded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError("a node process exited during start-up")
        if audit.is_file() and audit.read_text().count('"node_started"') >= len(processes):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the node processes did not all start within {timeout_s} s")


def sample(sessions, pids: list[int], stop_event: threading.Event, samples: Samples) -> None:
    start = time.monotonic()
    next_depth = start
    while not stop_event.wait(0.5):
        samples.peak_rss_mb = max(samples.peak_rss_mb, sum(rss_mb(pid) for pid in pids))
        if time.monotonic() >= next_depth:
            with sessions() as session:
                depth = session.scalar(select(func.count(Job.id)).where(Job.state.not_in(TERMINAL)))
            samples.depth.append((round(time.monotonic() - start, 1), depth))
            next_depth += 1.0


def plot(depth: list[tuple[float, int]], png: Path, title: str) -> None:
    """Queue depth over time as a PNG: matplotlib when installed, else drawn with OpenCV."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        plt = None
    t = np.array([s for s, _ in depth] or [0.0])
    d = np.array([n for _, n in depth] or [0])
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(t, d)
        ax.set(xlabel="seconds", ylabel="jobs not finished", title=title)
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return
    w, h, m = 800, 400, 50
    img = np.full((h, w, 3), 255, np.uint8)
    sx, sy = (w - 2 * m) / max(t.max(), 1.0), (h - 2 * m) / max(d.max(), 1)
    pts = np.stack([m + t * sx, h - m - d * sy], axis=1).astype(np.int32)
    cv2.rectangle(img, (m, m), (w - m, h - m), (0, 0, 0), 1)
    cv2.polylines(img, [pts], False, (200, 80, 0), 2, cv2.LINE_AA)
    for text_, xy in ((title, (m, 30)), (f"{t.max():.0f} s", (w - m - 40, h - 20)), ("0", (m - 5, h - 20)),
                      (f"{d.max()} jobs", (5, m - 5))):
        cv2.putText(img, text_, xy, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(png), img)


def run_once(files: list[Path], workers: int | None, database_url: str | None, orthanc: OrthancPeer, card: Path,
             senders: int, timeout_s: float) -> dict:
    """One burst; workers None: `smartnodule run` on SQLite, else one scp and `workers` worker processes."""
    work = Path(tempfile.mkdtemp(prefix="bench-sustained-"))
    port = free_port()
    env = node_env(port, work / "node", model__card=str(card), worker__poll_interval_s="0.05",
                   destinations=[orthanc.destination()])
    if database_url:
        env["SMARTNODULE_NODE__DATABASE_URL"] = database_url
    roles = ["run"] if workers is None else ["scp"] + ["worker"] * workers
    processes = [start_node(role, env) for role in roles]
    samples = Samples([])
    stop_event = threading.Event()
    sampler: threading.Thread | None = None
    try:
        wait_listening(port, process=processes[0])
        wait_started(work / "node" / "logs" / "audit.jsonl", processes)
        sessions = open_database(database_url or f"sqlite:///{work / 'node' / 'smartnodule.db'}")
        sampler = threading.Thread(target=sample, args=(sessions, [p.pid for p in processes], stop_event, samples))
        sampler.start()
        send_s = send(port, files, senders)
        deadline = time.monotonic() + timeout_s
        while True:
            with sessions() as session:
                done = session.scalar(select(func.count(Job.id)).where(Job.state.in_(TERMINAL)))
            if done >= len(files):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done} of {len(files)} jobs finished within {timeout_s} s")
            time.sleep(1.0)
    finally:
        stop_event.set()
        if sampler is not None:
            sampler.join()
        for process in processes:
            stop_process(process, 60)
    with sessions() as session:
        jobs = list(session.scalars(select(Job)))
    sessions.kw["bind"].dispose()
    sent = [j for j in jobs if j.state is JobState.SENT]
    if len(sent) != len(files):
        states = {s.value: sum(j.state is s for j in jobs) for s in JobState if any(j.state is s for j in jobs)}
        raise RuntimeError(f"{len(sent)} of {len(files)} jobs SENT: {states}")
    span_s = (max(j.finished_at for j in sent) - min(j.received_at for j in sent)).total_seconds()
    splits = [json.loads(j.stage_seconds) for j in sent]
    label = "run" if workers is None else f"scp+{workers}w"
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / f"sustained-{label}-queue.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("seconds", "jobs_not_finished"), *samples.depth])
    plot(samples.depth, OUT / f"sustained-{label}-queue.png",
         f"{len(files)} studies, {senders} senders, {label}: jobs not finished")
    return {"label": label, "workers": 1 if workers is None else workers, "studies": len(sent),
            "span_s": round(span_s, 1), "send_s": round(send_s, 1),
            "images_per_hour": round(3600 * len(sent) / span_s), "peak_rss_mb": round(samples.peak_rss_mb),
            "max_queue": max((d for _, d in samples.depth), default=0),
            "stage_median_s": {k: round(statistics.median(s.get(k, 0.0) for s in splits), 3)
                               for k in dict.fromkeys(k for s in splits for k in s)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=200, help="studies in the burst (the issue's figure: 500)")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker process counts to run in turn beside one scp on PostgreSQL")
    parser.add_argument("--database-url", default=POSTGRES,
                        help="PostgreSQL server (admin URL) on which a fresh database is created and dropped")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for the last job (default 20 x M)")
    args = parser.parse_args()
    files = phantoms(args.m, args.size)
    card, card_note = model_card()
    results = []
    with OrthancPeer(Path(tempfile.mkdtemp(prefix="bench-sustained-orthanc-"))) as orthanc:
        for workers in args.workers or [None]:
            if workers is None:
                results.append(run_once(files, None, None, orthanc, card, args.senders, args.timeout or 20 * args.m))
                continue
            with fresh_postgres(args.database_url) as url:
                results.append(run_once(files, workers, url, orthanc, card, args.senders, args.timeout or 20 * args.m))
    print(f"model: {card_note}; {args.m} studies at {args.size} px from {args.senders} storescu senders; "
          f"queue plots in {OUT}")
    stages = list(results[0]["stage_median_s"])
    print_table(["node", "studies", "span s", "images/h", "peak RSS MB", "max queue", *(f"{k} s" for k in stages)],
                [[r["label"], r["studies"], r["span_s"], r["images_per_hour"], r["peak_rss_mb"], r["max_queue"],
                  *(r["stage_median_s"].get(k, "") for k in stages)] for r in results])
    best = max(results, key=lambda r: r["images_per_hour"])
    print(json.dumps({"bench": "sustained", "m": args.m, "model": card_note,
                      "images_per_hour": best["images_per_hour"], "peak_rss_mb": best["peak_rss_mb"],
                      "workers": best["workers"], "runs": results, "load1": load1()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
