"""Fault suite: real node processes (`smartnodule run|scp|worker`), a real Orthanc as destination, storescu as sender.

`python -m tests.faults.suite [--short] [--only NAME ...]` runs each scenario,
prints a table (scenario, sent, acknowledged, processed, delivered, duplicates,
lost, checks) and, as its last line, one JSON object of the totals. It exits
non-zero when an acknowledged instance is lost, a result is duplicated, or a
scenario's own check fails. --short: fewest instances, shortest outages.
"""
from __future__ import annotations

import argparse
import json
import os
import re
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

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker

from inference.phantoms import generate_phantom, phantom_dataset, write_phantom_series
from node.db import TERMINAL, Job, JobState, open_database
from node.orthanc_peer import OrthancPeer, free_port, stop_process
from node.scp import OUT_OF_RESOURCES, SUCCESS
from tests.conftest import POSTGRES_ADMIN_URL, STORESCU, all_jobs, poll
from tests.data.make_messy_corpus import PATIENT_VALUES, build_corpus

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


def echo(port: int, timeout_s: float = 2.0) -> bool:
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate("127.0.0.1", port, ae_title="SMARTNODULE")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == SUCCESS


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
    result.check(all(encoded[j.id] <= 1 for j in finished),
                 f"processed more than once: {[j.id for j in finished if encoded[j.id] > 1]}")
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
            stopped.signal(signal.SIGSTOP)
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


SCENARIOS: dict[str, Callable[[Path, Scale], Result]] = {f.__name__: f for f in (
    sigkill_during_burst, destination_down, database_unavailable, disk_full, sender_drops_connection, worker_hangs,
    messy_headers)}
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
    header = f"{'scenario':26}" + "".join(f"{c:>13}" for c in COLUMNS) + "  checks"
    print(header)
    for r in results:
        print(f"{r.scenario:26}" + "".join(f"{getattr(r, c):>13}" for c in COLUMNS) +
              f"  {'ok' if not r.failures else '; '.join(r.failures)}")
    totals = {"scenarios": len(results), **{c: sum(getattr(r, c) for r in results) for c in COLUMNS},
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
