"""Fault suite: real node processes (`smartnodule run|scp|worker`), a real Orthanc as destination, storescu as sender.

`python -m tests.faults.suite [--short] [--only NAME ...]` runs each scenario,
prints a table (scenario, sent, acknowledged, processed, delivered, duplicates,
lost; for attacks also the node's peak resident memory growth during the attack
and whether an allowed sender's C-ECHO was always answered within 5 s; checks)
and, as its last line, one JSON object of the totals (with `attacks` and
`rss_growth_mb_max`). It exits non-zero when an acknowledged instance is lost, a
result is duplicated, or a scenario's own check fails (an attack's: memory growth
over RSS_GROWTH_BOUND_MB, or the allowed sender not served). --short: fewest
instances, shortest outages.

Attacks (hostile peers from tests/hostile.py) run against a node warmed up by
one processed study; afterwards the scenario's studies are sent and counted like
every other scenario's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import psutil
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from inference.training.phantoms import generate_phantom, phantom_dataset, write_phantom_series
from node.store.db import TERMINAL, Job, JobState, open_database
from node.orthanc_peer import OrthancPeer, free_port, stop_process
from node.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from tests.conftest import POSTGRES_ADMIN_URL, STORESCU, all_jobs, poll
from tests.data.make_messy_corpus import PATIENT_VALUES, build_corpus
from tests.hostile import echo, pdu_length_bomb, rle_pixel_bomb, small_instance, store, store_file, write_deflate_bomb

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Scale:
    instances: int
    outage_s: float


SHORT, LONG = Scale(instances=3, outage_s=4.0), Scale(instances=10, outage_s=20.0)


@dataclass
class Result:
    scenario: str
    sent: int = 0
    acknowledged: int = 0
    processed: int = 0
    delivered: int = 0
    duplicates: int = 0
    lost: int = 0
    rss_growth_mb: float | None = None  # attacks: the node's peak resident memory growth during the attack
    served: bool | None = None  # attacks: every allowed C-ECHO during the attack answered within SERVED_WITHIN_S
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)


@dataclass
class Sent:
    """What a sender got back: the C-STORE status per SOP Instance UID (None: no response)."""

    statuses: dict[str, int | None]

    @property
    def acknowledged(self) -> set[str]:
        return {uid for uid, status in self.statuses.items() if status == SUCCESS}


def phantoms(folder: Path, count: int, seed0: int) -> dict[str, Path]:
    """`count` small phantom studies, by SOP Instance UID."""
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in write_phantom_series(folder, count, seed0=seed0, size=512)}


STATUS_LINE = re.compile(r"Received Store Response(?: \(([^)]*)\))?")


def storescu(files: dict[str, Path], port: int) -> Sent:
    """Send every file on one association; a status per file from storescu's verbose output."""
    done = subprocess.run([STORESCU, "-v", "-nh", "-aet", "STORESCU", "-aec", "SMARTNODULE", "-to", "20", "-ta", "20",
                           "-td", "20", "127.0.0.1", str(port), *map(str, files.values())],
                          capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"})
    output = done.stdout + done.stderr
    statuses: dict[str, int | None] = dict.fromkeys(files)
    blocks = output.split("Sending file: ")[1:]
    by_path = {str(p): uid for uid, p in files.items()}
    for block in blocks:
        uid = by_path.get(block.splitlines()[0].strip())
        found = STATUS_LINE.search(block)
        if uid is None or found is None:
            continue
        words = (found.group(1) or "").lower()
        statuses[uid] = SUCCESS if words.startswith("success") else \
            OUT_OF_RESOURCES if "resources" in words or "a7" in words else 0xFFFF
    return Sent(statuses)


def statuses(sent: Sent) -> list[str]:
    return sorted("none" if s is None else f"0x{s:04X}" for s in sent.statuses.values())


def wait(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.2):
    """`tests.conftest.poll` at the suite's pace: a TimeoutError ends one scenario, not the suite."""
    return poll(predicate, timeout_s, what, interval_s)


def eventually(predicate: Callable[[], object], timeout_s: float) -> bool:
    try:
        wait(predicate, timeout_s, "a condition")
    except TimeoutError:
        return False
    return True


class NodeProcess:
    """`smartnodule ROLE` in a subprocess, configured through SMARTNODULE_* environment overrides."""

    def __init__(self, workdir: Path, role: str = "run", **overrides: object) -> None:
        self.workdir, self.role = workdir, role
        self.port = int(overrides.pop("node__port", 0) or free_port())
        self.env = {**os.environ, "TCP_NODELAY": "1",
                    "SMARTNODULE_NODE__PORT": str(self.port),
                    "SMARTNODULE_NODE__DATA_DIR": str(workdir / "node"),
                    "SMARTNODULE_NODE__ALLOWED_CALLING_AETS": json.dumps(["STORESCU"]),
                    "SMARTNODULE_WORKER__POLL_INTERVAL_S": "0.1",
                    "SMARTNODULE_MODEL__THREADS": "1",
                    "SMARTNODULE_DELIVERY__BACKOFF_INITIAL_S": "0.5",
                    "SMARTNODULE_DELIVERY__BACKOFF_MAX_S": "2",
                    "SMARTNODULE_DELIVERY__MAX_ATTEMPTS": "100"}
        for key, value in overrides.items():
            self.env[f"SMARTNODULE_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def data_dir(self) -> Path:
        return Path(self.env["SMARTNODULE_NODE__DATA_DIR"])

    def open_database(self) -> sessionmaker:
        """The node's database: SQLite in its data folder unless the overrides name another."""
        return open_database(self.env.get("SMARTNODULE_NODE__DATABASE_URL", f"sqlite:///{self.data_dir / 'smartnodule.db'}"))

    def start(self) -> "NodeProcess":
        self.starts += 1
        log = (self.workdir / f"{self.role}-{self.port}-{self.starts}.log").open("ab")
        config = self.workdir / "node.toml"  # defaults and the environment only, not the shipped file
        config.touch()
        self.process = subprocess.Popen([sys.executable, "-m", "node.cli", self.role, "--config", str(config)],
                                        cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if self.role != "worker":
            wait(lambda: self._alive() and echo(self.port, 1.0), 120, f"{self.role} to answer C-ECHO", 0.3)
        return self

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"smartnodule {self.role} exited with {self.process.returncode}; see {self.workdir}")
        return True

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            stop_process(self.process, 60)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def audit(data_dir: Path) -> list[dict]:
    path = data_dir / "logs" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def settled(sessions, uids: set[str]) -> list[Job] | None:
    """The jobs of `uids`, once each exists and is finished."""
    found = {j.sop_instance_uid: j for j in all_jobs(sessions)}
    return [found[u] for u in uids] if all(u in found and found[u].state in TERMINAL for u in uids) else None


def tally(result: Result, sent: set[str], acknowledged: set[str], sessions, data_dir: Path,
          orthanc: OrthancPeer, timeout_s: float = 180.0) -> list[Job]:
    """Wait for every acknowledged instance to finish, then count processed, delivered, duplicates and lost."""
    result.sent, result.acknowledged = len(sent), len(acknowledged)
    try:
        finished = wait(lambda: settled(sessions, acknowledged), timeout_s, "every acknowledged instance", 0.5)
    except TimeoutError as exc:
        result.failures.append(str(exc))
        finished = [j for j in all_jobs(sessions) if j.sop_instance_uid in acknowledged]
    encoded = Counter(e.get("job_id") for e in audit(data_dir) if e.get("event") == "job_encoded")
    by_uid = {j.sop_instance_uid: j for j in finished}
    result.processed = sum(1 for j in finished if encoded[j.id] >= 1)
    result.check(all(encoded[j.id] <= j.version for j in finished),  # each version of an instance once
                 f"processed more than once: {[j.id for j in finished if encoded[j.id] > j.version]}")
    srs = sr_counts(orthanc, {uid: by_uid[uid] for uid in acknowledged if uid in by_uid})
    result.delivered = sum(1 for n in srs.values() if n >= 1)
    result.duplicates = sum(n - 1 for n in srs.values() if n > 1)
    result.lost = sum(1 for uid in acknowledged if uid not in by_uid or by_uid[uid].state is not JobState.SENT
                      or srs.get(uid, 0) == 0)
    return finished


def sr_counts(orthanc: OrthancPeer, jobs_by_uid: dict[str, Job]) -> dict[str, int]:
    """SR instances in Orthanc per source SOP Instance UID (each phantom is its own study)."""
    client = orthanc.client
    counts = {}
    for uid, job in jobs_by_uid.items():
        found = client.post("tools/find", json={"Level": "Instance", "Query": {
            "StudyInstanceUID": job.study_instance_uid, "Modality": "SR"}}).json()
        counts[uid] = len(found)
    return counts


# --- scenarios -----------------------------------------------------------------------------------

def sigkill_during_burst(workdir: Path, scale: Scale) -> Result:
    """SIGKILL the node while storescu is sending a burst; restart; the sender retries what was not acknowledged."""
    result = Result("sigkill_during_burst")
    files = phantoms(workdir / "in", max(4, 2 * scale.instances), 9300)
    with OrthancPeer(workdir / "orthanc") as peer:
        node = NodeProcess(workdir, destinations=[peer.destination()]).start()
        sessions = node.open_database()
        killer = threading.Thread(target=lambda: (wait(lambda: len(all_jobs(sessions)) >= len(files) // 2, 60,
                                                       "half the burst", 0.02), node.kill()))
        killer.start()
        first = storescu(files, node.port)
        killer.join()
        acknowledged = first.acknowledged
        result.check(0 < len(acknowledged) < len(files) or any(
            j.state in (JobState.RECEIVED, JobState.RUNNING) for j in all_jobs(sessions)), "kill came too late")
        node.start()
        try:
            retry = storescu({u: p for u, p in files.items() if u not in acknowledged}, node.port)
            tally(result, set(files), acknowledged | retry.acknowledged, sessions, node.data_dir, peer)
            result.acknowledged = len(acknowledged | retry.acknowledged)
        finally:
            node.stop()
    return result


def destination_down(workdir: Path, scale: Scale) -> Result:
    """Orthanc stopped while results are ready; started again after the outage; everything delivered once."""
    result = Result("destination_down")
    files = phantoms(workdir / "in", scale.instances, 9400)
    with OrthancPeer(workdir / "orthanc") as peer:
        node = NodeProcess(workdir, destinations=[peer.destination()]).start()
        sessions = node.open_database()
        try:
            peer.stop()
            sent = storescu(files, node.port)
            wait(lambda: all(j.state is JobState.ENCODED and j.delivery_attempts >= 1 for j in all_jobs(sessions))
                 and len(all_jobs(sessions)) == len(files), 120, "a failed delivery attempt for every job", 0.3)
            time.sleep(scale.outage_s)
            result.check(not any(j.state is JobState.SENT for j in all_jobs(sessions)), "SENT while Orthanc was down")
            peer.start()
            tally(result, set(files), sent.acknowledged, sessions, node.data_dir, peer)
        finally:
            node.stop()
    return result


def database_unavailable(workdir: Path, scale: Scale) -> Result:
    """PostgreSQL refuses connections to the node's database: C-STORE answered 0xA700; resent after, all processed."""
    result = Result("database_unavailable")
    files = phantoms(workdir / "in", scale.instances, 9500)
    name = f"smartnodule_fault_{os.getpid()}_{int(time.time())}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    def allow(on: bool) -> None:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(on).lower()}'))
            if not on:
                connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                        "WHERE datname = :name"), {"name": name})

    try:
        with OrthancPeer(workdir / "orthanc") as peer:
            node = NodeProcess(workdir, destinations=[peer.destination()], node__database_url=url).start()
            try:
                allow(False)
                during = storescu(files, node.port)
                result.check(all(s == OUT_OF_RESOURCES for s in during.statuses.values()),
                             f"statuses during the outage {statuses(during)}, expected 0xA700")
                time.sleep(scale.outage_s)
                allow(True)
                after = storescu(files, node.port)
                tally(result, set(files), during.acknowledged | after.acknowledged, node.open_database(),
                      node.data_dir, peer)
                result.check(node.process.poll() is None, "node exited")
            finally:
                node.stop()
    finally:
        allow(True)
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return result


def disk_full(workdir: Path, scale: Scale) -> Result:
    """The data folder on a 20 MB tmpfs with about 100 KB left and `node.min_free_disk_mb` 0, so that each
    transfer runs into ENOSPC: every C-STORE is answered 0xA700 (no abort), nothing half-written is processed
    or left; freed, resent, all processed. (With the threshold above 0 the association is rejected before
    any transfer: tests/node/test_admission.py.)"""
    result = Result("disk_full")
    files = phantoms(workdir / "in", scale.instances, 9600)
    mount = workdir / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)]).returncode != 0:
        result.failures.append("mount -t tmpfs failed (needs root)")
        return result
    try:
        with OrthancPeer(workdir / "orthanc") as peer:
            node = NodeProcess(workdir, destinations=[peer.destination()], node__data_dir=str(mount / "node"),
                               node__min_free_disk_mb="0").start()
            sessions = node.open_database()
            filler = mount / "filler"
            try:
                with filler.open("wb") as f:  # leave about 100 KB: the database and the log still fit
                    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
                    f.write(bytes(max(0, free - 100 * 1024)))
                during = storescu(files, node.port)
                result.check(not during.acknowledged and all(s == OUT_OF_RESOURCES for s in during.statuses.values()),
                             f"statuses on a full disk {statuses(during)}, expected 0xA700 for each")
                result.check(not (all_jobs(sessions)), "job rows created for refused instances")
                refused = [e for e in audit(node.data_dir) if e["event"] == "instance_refused"]
                result.check(len(refused) == len(files) and all(e["reason"] == "disk_full" for e in refused),
                             f"refusal reasons {sorted({e['reason'] for e in refused})}, expected disk_full for each")
                filler.unlink()
                after = storescu(files, node.port)
                tally(result, set(files), during.acknowledged | after.acknowledged, sessions, node.data_dir, peer)
                incoming = node.data_dir / "spool" / ".incoming"
                result.check(eventually(lambda: not any(incoming.iterdir()), 10),
                             "half-written files left in spool/.incoming")
            finally:
                node.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount)])
    return result


def sender_drops_connection(workdir: Path, scale: Scale) -> Result:
    """A connection dropped in the middle of a large instance's P-DATA: no job, no file left; the node goes on."""
    result = Result("sender_drops_connection")
    files = phantoms(workdir / "in", scale.instances, 9700)
    large = phantom_dataset(generate_phantom(9799, 256), patient_id="DROP")
    large.Rows = large.Columns = 4096
    large.PixelData = bytes(4096 * 4096 * 2)  # 32 MB
    with OrthancPeer(workdir / "orthanc") as peer:
        node = NodeProcess(workdir, destinations=[peer.destination()]).start()
        sessions = node.open_database()
        incoming = node.data_dir / "spool" / ".incoming"
        try:
            ae = AE(ae_title="STORESCU")
            ae.add_requested_context(DigitalXRayImageStorageForPresentation, "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", node.port, ae_title="SMARTNODULE")
            sender = threading.Thread(target=assoc.send_c_store, args=(large,), daemon=True)
            sender.start()
            partial = wait(lambda: any(p.stat().st_size > 1 << 20 for p in incoming.iterdir()), 60,
                           "the large instance to be half received", 0.005)
            raw: socket.socket = assoc.dul.socket.socket
            raw.shutdown(socket.SHUT_RDWR)  # the cable pulled: no A-ABORT, no A-RELEASE
            raw.close()
            sender.join(timeout=30)
            result.check(bool(partial), "never saw a partial instance")
            sent = storescu(files, node.port)
            tally(result, set(files) | {str(large.SOPInstanceUID)}, sent.acknowledged, sessions, node.data_dir, peer)
            result.check(all(j.sop_instance_uid != large.SOPInstanceUID for j in all_jobs(sessions)),
                         "a job row for the dropped instance")
            result.check(eventually(lambda: not any(incoming.iterdir()), 10),
                         "half-written file left in spool/.incoming")
        except TimeoutError as exc:
            result.failures.append(str(exc))
        finally:
            node.stop()
    return result


def stop_outside_a_write(sessions: sessionmaker, process: NodeProcess) -> None:
    """SIGSTOP `process` while this side holds SQLite's write lock (the node's engine begins IMMEDIATE), so the
    stopped process is not inside a write transaction: stopped there, it would hold the lock and every other
    process would fail past the 30 s busy timeout until it resumes (CI lost worker_hangs to 'database is
    locked' that way). A hung worker holding the lock is SQLite's limit, not what this scenario tests."""
    with sessions() as session, session.begin():
        session.execute(text("SELECT 1"))  # the transaction, and with it the write lock, begins here
        process.signal(signal.SIGSTOP)


def worker_hangs(workdir: Path, scale: Scale) -> Result:
    """SIGSTOP a worker process holding a lease (lease_s 5); another takes the job; SIGCONT: no overwrite, no
    duplicate."""
    result = Result("worker_hangs")
    files = phantoms(workdir / "in", max(2, scale.instances), 9800)
    with OrthancPeer(workdir / "orthanc") as peer:
        common = dict(destinations=[peer.destination()], worker__lease_s="5", worker__count="1")
        receiver = NodeProcess(workdir, "scp", **common).start()
        env_port = {"node__port": str(receiver.port)}
        workers = [NodeProcess(workdir, "worker", **common, **env_port) for _ in range(2)]
        sessions = receiver.open_database()
        stopped: NodeProcess | None = None
        try:
            for worker in workers:
                worker.start()
            wait(lambda: sum(e.get("event") == "node_started" for e in audit(receiver.data_dir)) >= 3, 120,
                 "both workers to load the model")
            sent = storescu(files, receiver.port)
            pids = {w.process.pid: w for w in workers}

            def running_owner() -> tuple[Job, NodeProcess] | None:
                for job in all_jobs(sessions):
                    if job.state is JobState.RUNNING and job.lease_owner:
                        pid = int(job.lease_owner.split("/")[1])
                        if pid in pids:
                            return job, pids[pid]
                return None

            held, stopped = wait(running_owner, 60, "a worker holding a lease", 0.01)
            stop_outside_a_write(sessions, stopped)
            taken = wait(lambda: settled(sessions, {held.sop_instance_uid}), 120, "the other worker to finish the job")
            results_dir = Path(taken[0].results_dir)
            before = {p.name: sha256(p.read_bytes()).hexdigest() for p in results_dir.glob("*.dcm")}
            stopped.signal(signal.SIGCONT)
            refused = eventually(lambda: any(e.get("event") == "lease_lost" for e in audit(receiver.data_dir)), 120)
            result.check(refused, "the stale worker's attempt did not end in a logged lease_lost")
            after = {p.name: sha256(p.read_bytes()).hexdigest() for p in results_dir.glob("*.dcm")}
            changed = sorted(name for name in after if before.get(name) != after[name])
            result.check(not changed, f"stale worker overwrote {changed}")
            finished = tally(result, set(files), sent.acknowledged, sessions, receiver.data_dir, peer)
            job = next(j for j in finished if j.id == held.id)
            result.check(job.state is JobState.SENT, f"job {job.id} ended {job.state.value}")
        except TimeoutError as exc:
            result.failures.append(str(exc))
        finally:
            for process in (*workers, receiver):
                process.stop()
    return result


def messy_headers(workdir: Path, _scale: Scale) -> Result:
    """The messy-header corpus (tests/data/make_messy_corpus.py): every case delivered, no patient value logged."""
    result = Result("messy_headers")
    files = {case.sop_instance_uid: case.path for case in build_corpus(workdir / "in")}
    with OrthancPeer(workdir / "orthanc") as peer:
        node = NodeProcess(workdir, destinations=[peer.destination()]).start()
        try:
            sent = storescu(files, node.port)
            tally(result, set(files), sent.acknowledged, node.open_database(), node.data_dir, peer, timeout_s=600)
        finally:
            node.stop()
    logs = [p.read_text(errors="replace") for p in (*workdir.glob("run-*.log"), node.data_dir / "logs" / "audit.jsonl")]
    leaked = sorted({value for value in PATIENT_VALUES for text in logs if value in text})
    result.check(not leaked, f"{len(leaked)} patient values in the console or audit log")
    return result


# --- attacks (#16): hostile peers against a warmed-up node -----------------------------------------

RSS_GROWTH_BOUND_MB = 100.0
SERVED_WITHIN_S = 5.0


class Repeating:
    """`step()` in a background thread every `interval_s` between `with` entry and exit (and once at exit)."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def step(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            self.step()
            if self._stop.wait(self._interval_s):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


class MemoryWatch(Repeating):
    """Peak resident memory of a process above its level at the start, sampled every 10 ms (psutil)."""

    def __init__(self, pid: int) -> None:
        super().__init__(0.01)
        self._process = psutil.Process(pid)
        self.baseline = self.peak = self._process.memory_info().rss

    def step(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return round((self.peak - self.baseline) / 2**20, 1)


class AllowedSender(Repeating):
    """An allowed modality during an attack: a C-ECHO every half second, each to be answered within
    SERVED_WITHIN_S (its association, DIMSE and network timeouts)."""

    def __init__(self, port: int) -> None:
        super().__init__(0.5)
        self._port = port
        self.answers: list[bool] = []

    def step(self) -> None:
        self.answers.append(echo(self._port, SERVED_WITHIN_S))

    @property
    def served(self) -> bool:
        return bool(self.answers) and all(self.answers)


def under_attack(name: str, workdir: Path, scale: Scale, seed0: int,
                 attack: Callable[[NodeProcess, Result], set[str]],
                 before: Callable[[NodeProcess, Result], None] | None = None,
                 after: Callable[[NodeProcess, Result], None] | None = None, **overrides) -> Result:
    """Warm the node up with one processed study (and `before`), run `attack` while measuring memory and probing
    with an allowed C-ECHO, then `after` and the remaining studies; count everything, with the UIDs `attack`
    returns as acknowledged instances of its own."""
    result = Result(name)
    files = phantoms(workdir / "in", scale.instances + 1, seed0)
    warm_up = dict([next(iter(files.items()))])
    with OrthancPeer(workdir / "orthanc") as peer:
        node = NodeProcess(workdir, destinations=[peer.destination()], **overrides).start()
        sessions = node.open_database()
        try:
            first = storescu(warm_up, node.port)
            wait(lambda: settled(sessions, first.acknowledged), 120, "the warm-up study")
            if before is not None:
                before(node, result)
            with MemoryWatch(node.process.pid) as memory, AllowedSender(node.port) as sender:
                own = attack(node, result)
            result.rss_growth_mb, result.served = memory.growth_mb, sender.served
            result.check(memory.growth_mb <= RSS_GROWTH_BOUND_MB,
                         f"resident memory grew {memory.growth_mb} MB during the attack")
            result.check(sender.served, f"allowed C-ECHO not answered within {SERVED_WITHIN_S:.0f} s: "
                                        f"{sender.answers.count(False)} of {len(sender.answers)}")
            if after is not None:
                after(node, result)
            rest = {u: p for u, p in files.items() if u not in warm_up}
            after_sent = storescu(rest, node.port)
            tally(result, set(files) | own, first.acknowledged | after_sent.acknowledged | own, sessions,
                  node.data_dir, peer)
            result.check(node.process.poll() is None, "node exited")
        except TimeoutError as exc:
            result.failures.append(str(exc))
        finally:
            node.stop()
    return result


def refusals(node: NodeProcess, event: str, reason: str) -> int:
    return sum(1 for e in audit(node.data_dir) if e.get("event") == event and e.get("reason") == reason)


def pdu_length_bomb_attack(workdir: Path, scale: Scale) -> Result:
    """A peer announces a 4 GiB A-ASSOCIATE-RQ and streams zeros (up to 256 MiB): aborted after the header."""
    def attack(node: NodeProcess, result: Result) -> set[str]:
        taken = pdu_length_bomb(node.port, send_limit=256 << 20)
        result.check(taken < 32 << 20, f"the node took {taken >> 20} MiB of the PDU before ending the connection")
        result.check(eventually(lambda: refusals(node, "connection_refused", "pdu_too_large") == 1, 10),
                     "no connection_refused (pdu_too_large) in the audit log")
        return set()
    return under_attack("pdu_length_bomb", workdir, scale, 9910, attack)


def deflate_bomb(workdir: Path, scale: Scale) -> Result:
    """About 1 MB of Deflated Explicit VR LE that inflates to about 1 GiB (over node.max_instance_mb): 0xA700."""
    bomb = write_deflate_bomb(workdir / "deflate-bomb.dcm", 1 << 30)

    def attack(node: NodeProcess, result: Result) -> set[str]:
        response = store_file(node.port, bomb)
        status = None if response is None else int(response.Status)
        result.check(status == OUT_OF_RESOURCES, f"deflate bomb answered {status}, expected 0xA700")
        result.check(refusals(node, "instance_refused", "inflated_too_large") == 1, "no inflated_too_large refusal")
        spooled = sum(p.stat().st_size for p in (node.data_dir / "spool").rglob("*") if p.is_file())
        result.check(spooled < 64 << 20, f"{spooled >> 20} MiB in the spool")
        return set()
    return under_attack("deflate_bomb", workdir, scale, 9920, attack)


def pixel_bomb(workdir: Path, scale: Scale) -> Result:
    """An RLE Lossless image of 20000 x 20000 zeros (6 MB sent, 400 million pixels): refused from its header."""
    def attack(node: NodeProcess, result: Result) -> set[str]:
        response = store(node.port, rle_pixel_bomb(20000))
        status = None if response is None else int(response.Status)
        result.check(status == OUT_OF_RESOURCES, f"pixel bomb answered {status}, expected 0xA700")
        result.check(refusals(node, "instance_refused", "too_many_pixels") == 1, "no too_many_pixels refusal")
        return set()
    return under_attack("pixel_bomb", workdir, scale, 9930, attack)


class SilentFlood:
    """`count` TCP connections, each from its own loopback address, that never send a byte; one the node
    closes is opened again at once, so `count` stay open for the flood's whole length."""

    def __init__(self, port: int, count: int) -> None:
        self._port, self._stop = port, threading.Event()
        self._sockets = {f"127.0.1.{i + 1}": None for i in range(count)}
        self.closed_by_node = 0
        self._thread = threading.Thread(target=self._hold, daemon=True)

    def _open(self, source: str) -> socket.socket:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", self._port))
        return sock

    def _hold(self) -> None:
        for source in self._sockets:
            self._sockets[source] = self._open(source)
        while not self._stop.is_set():
            readable, _, _ = select.select(list(self._sockets.values()), [], [], 0.1)
            for sock in readable:  # the node closed it (a silent peer never gets data)
                source = sock.getsockname()[0]
                sock.close()
                self.closed_by_node += 1
                self._sockets[source] = self._open(source)

    def __enter__(self) -> "SilentFlood":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self._sockets.values():
            if sock is not None:
                sock.close()


def silent_connection_flood(workdir: Path, scale: Scale) -> Result:
    """50 silent TCP connections from 50 addresses, reopened as the node closes them, for longer than the
    A-ASSOCIATE-RQ time limit, plus 20 from one address (over the per-address cap): allowed C-ECHOs served."""
    def attack(node: NodeProcess, result: Result) -> set[str]:
        with SilentFlood(node.port, 50) as flood:
            crowd = [socket.create_connection(("127.0.0.1", node.port), source_address=("127.0.2.1", 0))
                     for _ in range(20)]
            time.sleep(max(scale.outage_s, 8.0))
            for sock in crowd:
                sock.close()
        result.check(flood.closed_by_node >= 50, f"the node closed {flood.closed_by_node} silent connections, "
                                                 "expected each of the 50 after the time limit")
        result.check(refusals(node, "connection_refused", "too_many_connections_from_address") >= 10,
                     "connections over the per-address cap were not refused")
        return set()
    return under_attack("silent_connection_flood", workdir, scale, 9940, attack)


def uid_traversal(workdir: Path, scale: Scale) -> Result:
    """Instances whose Study Instance UID is a path (`..`, `.`) or breaks the UID grammar: 0xC000, no file
    anywhere, no job."""
    bad = ["..", ".", "1..2", "01.2", "1." + "2" * 63]

    def attack(node: NodeProcess, result: Result) -> set[str]:
        jobs_before = len(all_jobs(node.open_database()))
        for index, uid in enumerate(bad):
            response = store(node.port, small_instance(9950 + index, StudyInstanceUID=uid))
            status = None if response is None else int(response.Status)
            result.check(status == CANNOT_UNDERSTAND, f"Study Instance UID {uid!r} answered {status}, expected 0xC000")
        spool, results = node.data_dir / "spool", node.data_dir / "results"
        stray = [p.name for p in [*node.data_dir.rglob("*.dcm"), *node.workdir.glob("*.dcm")]
                 if not p.is_relative_to(spool) and not p.is_relative_to(results)]
        result.check(not stray, f"files outside the spool: {stray}")
        result.check(len(all_jobs(node.open_database())) == jobs_before, "job rows for refused instances")
        result.check(refusals(node, "instance_refused", "invalid_uid") == len(bad), "invalid_uid refusals missing")
        return set()
    return under_attack("uid_traversal", workdir, scale, 9960, attack)


def repeat_with_changed_content(workdir: Path, scale: Scale) -> Result:
    """A study processed and delivered, then the same SOP Instance UID with another PatientName and other
    pixels (the attack: its C-STORE): the first file stays byte for byte, the new version is processed and
    delivered (its results carry the same UIDs: no duplicate in the PACS), audited as instance_replaced."""
    first = small_instance(9970, 512)
    uid = str(first.SOPInstanceUID)
    changed = small_instance(9971, 512, SOPInstanceUID=uid, StudyInstanceUID=first.StudyInstanceUID,
                             SeriesInstanceUID=first.SeriesInstanceUID, PatientName="CHANGED^NAME")
    changed.file_meta.MediaStorageSOPInstanceUID = uid
    kept: dict[str, object] = {}

    def before(node: NodeProcess, result: Result) -> None:
        result.check(int(store(node.port, first).Status) == SUCCESS, "first version not acknowledged")
        sessions = node.open_database()
        [job] = wait(lambda: settled(sessions, {uid}), 120, "the first version")
        kept["path"] = Path(job.spool_path)
        kept["digest"] = sha256(Path(job.spool_path).read_bytes()).hexdigest()

    def attack(node: NodeProcess, result: Result) -> set[str]:
        result.check(int(store(node.port, changed).Status) == SUCCESS, "second version not acknowledged")
        result.check(sha256(kept["path"].read_bytes()).hexdigest() == kept["digest"], "the first file changed")
        return {uid}

    def after(node: NodeProcess, result: Result) -> None:
        sessions = node.open_database()
        [job] = wait(lambda: (jobs := settled(sessions, {uid})) and jobs[0].version == 2 and jobs, 120,
                     "the second version")
        result.check(sha256(kept["path"].read_bytes()).hexdigest() == kept["digest"], "the first file changed")
        result.check(job.state is JobState.SENT and Path(job.spool_path).name == f"{uid}.v2.dcm",
                     f"second version ended {job.state.value} at {Path(job.spool_path).name}")
        replaced = [e for e in audit(node.data_dir) if e.get("event") == "instance_replaced"]
        result.check([e.get("version") for e in replaced] == [2], "no instance_replaced in the audit log")

    return under_attack("repeat_with_changed_content", workdir, scale, 9980, attack, before=before, after=after)


SCENARIOS: dict[str, Callable[[Path, Scale], Result]] = {f.__name__: f for f in (
    sigkill_during_burst, destination_down, database_unavailable, disk_full, sender_drops_connection, worker_hangs,
    messy_headers)}
ATTACKS: dict[str, Callable[[Path, Scale], Result]] = {
    "pdu_length_bomb": pdu_length_bomb_attack, "deflate_bomb": deflate_bomb, "pixel_bomb": pixel_bomb,
    "silent_connection_flood": silent_connection_flood, "uid_traversal": uid_traversal,
    "repeat_with_changed_content": repeat_with_changed_content}
SCENARIOS.update(ATTACKS)
COLUMNS = ("sent", "acknowledged", "processed", "delivered", "duplicates", "lost")


def run(names: list[str], scale: Scale) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="smartnodule-faults-") as scratch:
        for name in names:
            workdir = Path(scratch) / name
            workdir.mkdir()
            started = time.monotonic()
            try:
                result = SCENARIOS[name](workdir, scale)
            except Exception as exc:  # a scenario that cannot finish is a failed scenario, the suite goes on
                result = Result(name, failures=[f"{type(exc).__name__}: {exc}"])
            print(f"{name}: {time.monotonic() - started:.0f} s, {'ok' if not result.failures else result.failures}",
                  file=sys.stderr, flush=True)
            results.append(result)
    return results


def report(results: list[Result]) -> dict:
    header = f"{'scenario':28}" + "".join(f"{c:>13}" for c in COLUMNS) + f"{'rss_growth_mb':>15}{'served_5s':>11}  checks"
    print(header)
    for r in results:
        attack = (f"{r.rss_growth_mb:>15}{'yes' if r.served else 'NO':>11}" if r.served is not None
                  else f"{'-':>15}{'-':>11}")
        print(f"{r.scenario:28}" + "".join(f"{getattr(r, c):>13}" for c in COLUMNS) + attack +
              f"  {'ok' if not r.failures else '; '.join(r.failures)}")
    attacks = [r for r in results if r.served is not None]
    totals = {"scenarios": len(results), **{c: sum(getattr(r, c) for r in results) for c in COLUMNS},
              "attacks": len(attacks),
              "rss_growth_mb_max": max((r.rss_growth_mb for r in attacks), default=None),
              "attacks_served": sum(1 for r in attacks if r.served),
              "failed_checks": sum(len(r.failures) for r in results)}
    print(json.dumps(totals))
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="fewest instances, shortest outages")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    args = parser.parse_args(argv)
    totals = report(run(args.only, SHORT if args.short else LONG))
    return 1 if totals["lost"] or totals["duplicates"] or totals["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
