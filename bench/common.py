"""Shared helpers of the benchmarks: DCMTK tools, waiting for a port, the phantom cache, the shipped model card, tables.

Phantoms are generated once per size and seed under `CACHE` (2048 px takes about
a second each) and reused by every benchmark and every run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from config.settings import NodeSettings
from node.orthanc_peer import free_port, stop_process  # noqa: F401  (the benchmarks' way to pick a port and stop a child)

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK leaves Nagle on: 40 ms per instance without it
CACHE = Path(os.environ.get("SMARTNODULE_BENCH_CACHE", "/tmp/smartnodule-bench"))
SEED0 = 900000
CALLING_AET = "STORESCU"
NODE_AET = NodeSettings.model_fields["ae_title"].default  # the node refuses any other called AE title


def wait_listening(port: int, timeout_s: float = 120, process: subprocess.Popen | None = None,
                   called_aet: str = NODE_AET) -> None:
    """Return once a C-ECHO to `called_aet` at 127.0.0.1:port succeeds; RuntimeError on timeout or when
    `process` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before listening on {port}")
        echo = subprocess.run([ECHOSCU, "-aet", CALLING_AET, "-aec", called_aet, "127.0.0.1", str(port)],
                              capture_output=True, env=DCMTK_ENV)
        if echo.returncode == 0:
            return
        time.sleep(0.3)
    raise RuntimeError(f"nothing answered C-ECHO on port {port} within {timeout_s} s")


def phantoms(count: int, size: int = 2048, seed0: int = SEED0, cache: Path = CACHE) -> list[Path]:
    """`count` single-image phantom studies (seeds seed0...) at `size` px, generated only where missing."""
    from inference.training.phantoms import write_phantom_series

    folder = cache / f"phantoms-{size}"
    paths = []
    for seed in range(seed0, seed0 + count):
        path = folder / f"phantom_{seed:06d}.dcm"
        if not path.is_file():
            [written] = write_phantom_series(folder / ".new", 1, seed0=seed, size=size)
            written.replace(path)
        paths.append(path)
    return paths


def model_card() -> tuple[Path, str]:
    """The shipped model card (path, description): a benchmark measures the model the node serves, so a missing
    card or weights file ends the benchmark with one line instead of measuring something else."""
    from inference.predictor import DEFAULT_CARD

    def missing(path: Path) -> SystemExit:
        return SystemExit(f"bench: the shipped model is missing ({path} not found); benchmarks measure the shipped "
                          "model only: restore inference/models/ from the repository")

    if not DEFAULT_CARD.is_file():
        raise missing(DEFAULT_CARD)
    weights = DEFAULT_CARD.parent / json.loads(DEFAULT_CARD.read_text())["weights_file"]
    if not weights.is_file():
        raise missing(weights)
    return DEFAULT_CARD, "shipped card"


def node_env(port: int, data_dir: Path, **settings: object) -> dict[str, str]:
    """Environment for a `smartnodule` subprocess: port, data dir, STORESCU allowed, plus `SECTION__KEY=value`."""
    env = {**DCMTK_ENV, "SMARTNODULE_NODE__PORT": str(port), "SMARTNODULE_NODE__DATA_DIR": str(data_dir),
           "SMARTNODULE_NODE__ALLOWED_CALLING_AETS": json.dumps([CALLING_AET]),
           "SMARTNODULE_METRICS__ENABLED": "false"}  # several roles on this machine would share metrics.port
    for key, value in settings.items():
        env[f"SMARTNODULE_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


def start_node(role: str, env: dict[str, str]) -> subprocess.Popen:
    """`smartnodule ROLE` (run, scp, worker) as a subprocess, its console output discarded."""
    return subprocess.Popen([sys.executable, "-m", "node.cli", role], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def send(port: int, files: list[Path], senders: int = 1, called_aet: str = NODE_AET) -> float:
    """DCMTK storescu, one association per sender, files dealt round-robin; wall seconds until all finished."""
    senders = min(senders, len(files))
    start = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aet", CALLING_AET, "-aec", called_aet, "127.0.0.1", str(port),
                               *map(str, files[i::senders])], env=DCMTK_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(senders)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {err.decode()[-500:]}")
    return time.perf_counter() - start


def tree(process: psutil.Process) -> list[psutil.Process]:
    return [process, *process.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live children."""
    total = 0.0
    for proc in tree(psutil.Process(pid)):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, MiB."""
    total = 0
    for proc in tree(psutil.Process(pid)):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    """A plain right-aligned text table; floats with 3 significant decimals."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
