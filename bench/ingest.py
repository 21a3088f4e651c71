"""Ingest: DCMTK `storescu` into the node's receiver, DCMTK's `storescp` and pynetdicom's stock `storescp`.

The same cached phantom files (N at 2048 px, about 8.4 MB each, and N at 512 px)
go to each receiver in turn, from one storescu association and from 4
concurrent ones: the node as `smartnodule scp` (spool fsync + SQLite job row
before success), `/usr/bin/storescp -od DIR` and `python -m pynetdicom storescp
-od DIR`. Each receiver's stored files (job rows for the node) are counted
before a figure is reported. CPU is the receiver process's user + system time.

    .venv/bin/python -m bench.ingest --n 100
    .venv/bin/python -m bench.ingest --n 50 --profile   # where the node's time goes (cProfile, in-process)
    .venv/bin/python -m bench.ingest --n 50 --profile --profile-px 512
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from bench.common import (DCMTK_ENV, cpu_seconds, free_port, load1, node_env, phantoms, print_table, send,
                          start_node, stop_process, wait_listening)
from node.store.db import Job, open_database

RECEIVERS = ("node", "dcmtk", "pynetdicom")
SIZES = (2048, 512)
SENDERS = (1, 4)


@dataclass(frozen=True)
class Run:
    size: int
    senders: int
    receiver: str
    images: int
    megabytes: float
    seconds: float
    cpu_s: float

    @property
    def img_s(self) -> float:
        return self.images / self.seconds


def start_receiver(receiver: str, port: int, out: Path) -> subprocess.Popen:
    if receiver == "node":
        return start_node("scp", node_env(port, out))
    command = {"dcmtk": ["/usr/bin/storescp", "-od", str(out), str(port)],
               "pynetdicom": [sys.executable, "-m", "pynetdicom", "storescp", "-od", str(out), str(port)]}[receiver]
    return subprocess.Popen(command, env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stored_count(receiver: str, out: Path) -> int:
    if receiver == "node":
        with open_database(f"sqlite:///{out / 'smartnodule.db'}")() as session:
            rows = session.scalar(select(func.count(Job.id)))
        files = sum(1 for p in (out / "spool").rglob("*.dcm") if ".incoming" not in p.parts)
        return min(rows, files)
    return sum(1 for p in out.iterdir() if p.is_file())


def measure(receiver: str, files: list[Path], senders: int, size: int, work: Path) -> Run:
    out = work / receiver
    out.mkdir()
    port = free_port()
    process = start_receiver(receiver, port, out)
    try:
        wait_listening(port, process=process)
        cpu0 = cpu_seconds(process.pid)
        seconds = send(port, files, senders)
        cpu_s = cpu_seconds(process.pid) - cpu0
    finally:
        stop_process(process, 60)
    stored = stored_count(receiver, out)
    if stored != len(files):
        raise RuntimeError(f"{receiver} stored {stored} of {len(files)} files")
    shutil.rmtree(out)
    return Run(size, senders, receiver, len(files), sum(p.stat().st_size for p in files) / 1e6, seconds, cpu_s)


def median_run(runs: list[Run]) -> Run:
    """The run with the median rate (rounds of one configuration)."""
    return sorted(runs, key=lambda r: r.img_s)[len(runs) // 2]


def benchmark(n: int, rounds: int) -> dict:
    files = {size: phantoms(n, size) for size in SIZES}
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    results: dict[tuple[int, int, str], Run] = {}
    try:
        for size in SIZES:
            for senders in SENDERS:
                runs: dict[str, list[Run]] = {r: [] for r in RECEIVERS}
                for i in range(rounds):
                    order = RECEIVERS[i % 3:] + RECEIVERS[:i % 3]  # rotate who goes first
                    for receiver in order:
                        runs[receiver].append(measure(receiver, files[size], senders, size, work))
                for receiver, done in runs.items():
                    results[size, senders, receiver] = median_run(done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for (size, senders, receiver), run in results.items():
        dcmtk = results[size, senders, "dcmtk"]
        rows.append([size, senders, receiver, run.images, f"{run.img_s:.1f}", f"{run.megabytes / run.seconds:.0f}",
                     f"{1000 * run.cpu_s / run.images:.1f}", f"{run.img_s / dcmtk.img_s:.2f}"])
    print_table(["px", "senders", "receiver", "stored", "img/s", "MB/s", "CPU ms/img", "x dcmtk"], rows)

    def rate(size: int, senders: int, receiver: str) -> float:
        return round(results[size, senders, receiver].img_s, 2)

    def cpu_ms(receiver: str) -> float:
        run = results[2048, 1, receiver]
        return round(1000 * run.cpu_s / run.images, 1)

    return {"bench": "ingest", "n": n, "rounds": rounds,
            "node_img_s": rate(2048, 1, "node"), "dcmtk_img_s": rate(2048, 1, "dcmtk"),
            "ratio_vs_dcmtk": round(rate(2048, 1, "node") / rate(2048, 1, "dcmtk"), 3),
            "stock_pynetdicom_img_s": rate(2048, 1, "pynetdicom"),
            "ratio_vs_stock_pynetdicom": round(rate(2048, 1, "node") / rate(2048, 1, "pynetdicom"), 3),
            "node_img_s_4senders": rate(2048, 4, "node"), "dcmtk_img_s_4senders": rate(2048, 4, "dcmtk"),
            "ratio_vs_dcmtk_4senders": round(rate(2048, 4, "node") / rate(2048, 4, "dcmtk"), 3),
            "node_small_img_s": rate(512, 1, "node"), "dcmtk_small_img_s": rate(512, 1, "dcmtk"),
            "node_small_img_s_4senders": rate(512, 4, "node"), "dcmtk_small_img_s_4senders": rate(512, 4, "dcmtk"),
            "node_cpu_ms_per_img": cpu_ms("node"), "dcmtk_cpu_ms_per_img": cpu_ms("dcmtk"),
            "stock_pynetdicom_cpu_ms_per_img": cpu_ms("pynetdicom"), "load1": load1()}


class ThreadProfiles:
    """cProfile in every thread started while active (pynetdicom's DUL reader and association threads)."""

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []

    def _start(self, *_args: object) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile()
        self.profiles.append(profile)
        profile.enable()

    def __enter__(self) -> "ThreadProfiles":
        threading.setprofile(self._start)
        return self

    def __exit__(self, *_exc: object) -> None:
        threading.setprofile(None)

    def stats(self) -> pstats.Stats:
        stats = pstats.Stats(self.profiles[0])
        for profile in self.profiles[1:]:
            stats.add(profile)
        return stats


# Where a received instance's time goes, summed over all threads: cumulative time of (function, file) ...
STAGES = (
    ("DUL: read + decode PDUs", "_read_pdu_data", "dul.py"),
    ("  socket reads", "recv", "receive.py"),
    ("  P-DATA fragments to temp file", "decode_msg", "dimse_messages.py"),
    ("C-STORE handler (_on_store)", "_on_store", "scp.py"),
    ("  header dcmread", "dcmread", "filereader.py"),
    ("  spool place (fsync, rename, 2 dir fsyncs)", "place", "spool.py"),
    ("  job row admit (SQLite commit)", "admit", "jobs.py"),
)
# ... and self time of every function in files whose path contains one of the parts.
SELF_TIME = (
    ("self: pynetdicom", ("pynetdicom/",)),
    ("self: logging (structlog + stdlib)", ("structlog/", "/logging/")),
    ("self: sqlalchemy + sqlite3", ("sqlalchemy/", "sqlite3")),
    ("self: os.fsync", ("posix.fsync",)),
    ("self: file writes", ("_io.FileIO",)),
)


def profile(n: int, size: int) -> dict:
    """Run an in-process receive-only Node under cProfile for N `size` px instances from one storescu."""
    from config.settings import load_settings
    from node.audit import configure_logging
    from node.service import Node

    files = phantoms(n, size)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-profile-"))
    port = free_port()
    settings = load_settings(None, node={"port": port, "data_dir": str(work), "allowed_calling_aets": ["STORESCU"]},
                             metrics={"enabled": False})
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            configure_logging(settings.log_dir)  # the console handler writes to /dev/null, as in the subprocess
            node = Node(settings, workers=0, deliver=False)
            node.start()
            try:
                wait_listening(port)
                with ThreadProfiles() as threads:
                    cpu0 = os.times()
                    seconds = send(port, files)
                    cpu = os.times()
            finally:
                node.stop()
        stored = stored_count("node", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if stored != n:
        raise RuntimeError(f"node stored {stored} of {n} files")
    stats = threads.stats()
    stats.sort_stats("tottime").print_stats(20)
    per_image = {}
    for label, name, file_part in STAGES:
        seconds_in = sum(v[3] for k, v in stats.stats.items() if k[2] == name and file_part in k[0])
        per_image[label] = round(1000 * seconds_in / n, 2)
    for label, parts in SELF_TIME:
        seconds_in = sum(v[2] for k, v in stats.stats.items() if any(p in k[0] or p in k[2] for p in parts))
        per_image[label] = round(1000 * seconds_in / n, 2)
    cpu_ms = 1000 * (cpu.user + cpu.system - cpu0.user - cpu0.system) / n
    print(f"profiled: {n} instances in {seconds:.2f} s ({n / seconds:.1f} img/s under cProfile), "
          f"process CPU {cpu_ms:.1f} ms/img")
    print_table(["stage (cumulative, all threads)", "ms/img"], [[k, f"{v:.2f}"] for k, v in per_image.items()])
    return {"bench": "ingest-profile", "n": n, "px": size, "img_s_profiled": round(n / seconds, 2),
            "cpu_ms_per_img": round(cpu_ms, 1),
            "stage_ms_per_img": {k.strip(): v for k, v in per_image.items()}, "load1": load1()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="images per size (default 100)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat each configuration, report the median")
    parser.add_argument("--profile", action="store_true", help="profile the node's receiver instead")
    parser.add_argument("--profile-px", type=int, choices=SIZES, default=2048, help="image size to profile")
    args = parser.parse_args()
    print(json.dumps(profile(args.n, args.profile_px) if args.profile else benchmark(args.n, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
