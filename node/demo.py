"""`make demo`: the node on embedded defaults, phantom chest X-rays pushed through it, the results shown, and the
review page with a demo reviewer.

With Orthanc installed, the phantoms are uploaded to a local Orthanc, which
pushes each study to the node over DICOM; the node's SR, heatmap and PDF go back
into that Orthanc. Without Orthanc, the phantoms are sent with the node's own
SCU and the results stay in the node's results folder. Progress bars (tqdm, on
standard error) follow the phantoms being made, pushed and processed. The review
page runs on 127.0.0.1 with a reviewer account made as `smartnodule user add`
makes one (a fresh random password, printed); `--keep-running` keeps everything
up until Ctrl-C (or SIGTERM), which stops it cleanly.
"""
from __future__ import annotations

import secrets
import shutil
import signal
import threading
import time
from collections.abc import Set
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select
from tqdm import tqdm

from config.settings import load_settings
from inference.training.phantoms import write_phantom_series
from node.audit import configure_logging
from node.store.db import TERMINAL, Job, JobState
from node.orthanc_peer import OrthancPeer, free_port, orthanc_available
from node.scu import send_files
from node.service import Node
from node.store.roles import Role
from review_web.commands import add_user

DEMO_DIR = Path("var/demo")
DEMO_REVIEWER = "demo"


def run_demo(count: int = 4, size: int = 2048, keep_running: bool = False, workdir: Path = DEMO_DIR) -> int:
    """Run the demo; with `keep_running`, wait for Ctrl-C or SIGTERM before stopping everything."""
    shutil.rmtree(workdir, ignore_errors=True)
    configure_logging(workdir / "node" / "logs", console_level="WARNING")
    node_port, web_port = free_port(), free_port()
    orthanc = None
    if orthanc_available():
        orthanc = OrthancPeer(workdir / "orthanc", modalities={"smartnodule": ("SMARTNODULE", "127.0.0.1", node_port)})
        orthanc.start()
        print(f"Orthanc (PACS stand-in) on {orthanc.url}, DICOM port {orthanc.dicom_port}")
    else:
        print("Orthanc is not installed: results stay in the node's results folder")
    destinations = [orthanc.destination()] if orthanc else []
    web = {"enabled": True, "host": "127.0.0.1", "port": web_port, "secret_key": secrets.token_urlsafe(48)}
    settings = load_settings(None, node={"port": node_port, "data_dir": str(workdir / "node")},
                             destinations=destinations, web=web, metrics={"port": free_port()})
    node = Node(settings)
    password = secrets.token_urlsafe(12)
    add_user(node.sessions, DEMO_REVIEWER, Role.REVIEWER, password, actor="demo")
    try:
        node.start()
        print(f"SmartNodule node {settings.node.ae_title} on 127.0.0.1:{node_port} (audit log {settings.log_dir / 'audit.jsonl'})")
        print(f"Review page on http://127.0.0.1:{web_port}/ (login: {DEMO_REVIEWER}, password: {password})", flush=True)
        files = [path for i in tqdm(range(count), desc="phantoms made", unit="image")
                 for path in write_phantom_series(workdir / "phantoms", 1, seed0=20260 + i, size=size)]
        started = time.monotonic()
        _push(files, orthanc, node_port)
        done = TERMINAL if destinations else TERMINAL | {JobState.ENCODED}
        jobs = _wait_for_jobs(node, len(files), done, timeout_s=120 + 30 * len(files),
                              what="processed and delivered" if destinations else "processed")
        print(f"\nAll {len(files)} studies finished in {time.monotonic() - started:.1f} s:\n")
        _print_table(jobs, orthanc)
        waiting = sum(1 for job in jobs if job.review_required)
        if keep_running:
            print(f"\n{waiting} of {len(jobs)} wait for review: http://127.0.0.1:{web_port}/ "
                  f"(login: {DEMO_REVIEWER}, password: {password})")
            print("Node, Orthanc and review page keep running (Ctrl-C stops them).", flush=True)
            _wait_for_stop()
        else:
            print(f"\n{waiting} of {len(jobs)} wait for review; `make demo ARGS=--keep-running` keeps the review "
                  f"page up to read them.")
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        if orthanc is not None:
            orthanc.stop()
    print("Demo stopped.")
    return 0


def _wait_for_stop() -> None:
    """Until SIGINT (Ctrl-C) or SIGTERM; their handlers are replaced for the wait only."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _push(files: list[Path], orthanc: OrthancPeer | None, node_port: int) -> None:
    if orthanc is None:
        for path in tqdm(files, desc="sent to the node", unit="image"):
            send_files([path], host="127.0.0.1", port=node_port, called_aet="SMARTNODULE", calling_aet="SMARTNODULE_SCU")
        return
    client = orthanc.client
    studies = {_study_of(client.upload_file(str(path)), client)
               for path in tqdm(files, desc="uploaded to Orthanc", unit="image")}
    for study_id in tqdm(sorted(studies), desc="Orthanc C-STORE to the node", unit="study"):
        client.modalities.send(target_modality="smartnodule", resources_ids=[study_id])


def _study_of(instance_ids: list[str], client) -> str:
    return client.instances.get_parent_study_id(instance_ids[0])


def _wait_for_jobs(node: Node, expected: int, done: Set[JobState], timeout_s: float, what: str) -> list[Job]:
    deadline = time.monotonic() + timeout_s
    with tqdm(total=expected, desc=what, unit="study") as progress:
        while True:
            with node.sessions() as session:
                jobs = list(session.scalars(select(Job).order_by(Job.id)))
            finished = sum(1 for job in jobs if job.state in done)
            if min(finished, expected) > progress.n:
                progress.update(min(finished, expected) - progress.n)
            if (len(jobs) >= expected and finished == len(jobs)) or time.monotonic() > deadline:
                return jobs
            time.sleep(0.25)


def _print_table(jobs: list[Job], orthanc: OrthancPeer | None) -> None:
    header = (f"{'accession':<10} {'truth (phantom)':<22} {'state':<8} {'P(nodule)':>9} {'±':>5}  "
              f"{'decision':<9} {'review':<6}  results")
    print(header)
    print("-" * len(header))
    sources = {job.id: dcmread(job.spool_path, stop_before_pixels=True) for job in jobs}
    for job in sorted(jobs, key=lambda j: str(sources[j.id].get("AccessionNumber", ""))):
        source = sources[job.id]
        truth = str(source.get("ImageComments", "")).replace("synthetic phantom: ", "").split(" at ")[0]
        accession = str(source.get("AccessionNumber", ""))
        if job.probability is None:
            print(f"{accession:<10} {truth:<22} {job.state.value:<8} {job.reason or ''}")
            continue
        decision = "NODULE" if job.positive else "no nodule"
        print(f"{accession:<10} {truth:<22} {job.state.value:<8} {job.probability:>9.3f} {job.uncertainty:>5.3f}  "
              f"{decision:<9} {'yes' if job.review_required else 'no':<6}  {_where(job, orthanc)}")


def _where(job: Job, orthanc: OrthancPeer | None) -> str:
    if job.results_dir is None:  # not processed: nothing to point at
        return ""
    sr_path = Path(job.results_dir) / "sr.dcm"
    if orthanc is None or job.state is not JobState.SENT:
        return str(sr_path.parent)
    client = orthanc.client
    found = [client.instances.lookup(str(dcmread(Path(job.results_dir) / f"{kind}.dcm", stop_before_pixels=True).SOPInstanceUID))
             for kind in ("sr", "heatmap", "pdf")]
    study = client.instances.get_parent_study_id(found[0]) if found[0] else None
    return f"Orthanc {orthanc.url}/app/explorer.html#study?uuid={study} (SR, heatmap, PDF)" if all(found) else "not found in Orthanc"
