"""`make demo`: the node on embedded defaults, phantom chest X-rays pushed through it, the results shown.

With Orthanc installed, the phantoms are uploaded to a local Orthanc, which
pushes each study to the node over DICOM; the node's SR, heatmap and PDF go back
into that Orthanc. Without Orthanc, the phantoms are sent with the node's own
SCU and the results stay in the node's results folder.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from config.settings import load_settings
from inference.training.phantoms import write_phantom_series
from node.audit import configure_logging
from node.store.db import TERMINAL, Job, JobState
from node.orthanc_peer import OrthancPeer, free_port, orthanc_available
from node.scu import send_files
from node.service import Node

DEMO_DIR = Path("var/demo")


def run_demo(count: int = 4, size: int = 2048, keep_running: bool = False, workdir: Path = DEMO_DIR) -> int:
    shutil.rmtree(workdir, ignore_errors=True)
    configure_logging(workdir / "node" / "logs", console_level="WARNING")
    node_port = free_port()
    orthanc = None
    if orthanc_available():
        orthanc = OrthancPeer(workdir / "orthanc", modalities={"smartnodule": ("SMARTNODULE", "127.0.0.1", node_port)})
        orthanc.start()
        print(f"Orthanc (PACS stand-in) on {orthanc.url}, DICOM port {orthanc.dicom_port}")
    else:
        print("Orthanc is not installed: results stay in the node's results folder")
    destinations = [orthanc.destination()] if orthanc else []
    settings = load_settings(None, node={"port": node_port, "data_dir": str(workdir / "node")}, destinations=destinations)
    node = Node(settings)
    try:
        node.start()
        print(f"SmartNodule node {settings.node.ae_title} on 127.0.0.1:{node_port} (audit log {settings.log_dir / 'audit.jsonl'})")
        print(f"Generating {count} phantom chest X-rays ({size}x{size}) ...")
        files = write_phantom_series(workdir / "phantoms", count, seed0=20260, size=size)
        started = time.monotonic()
        _push(files, orthanc, node_port)
        done = TERMINAL if destinations else TERMINAL | {JobState.ENCODED}
        jobs = _wait_for_jobs(node, len(files), done, timeout_s=120 + 30 * len(files))
        print(f"\nAll {len(files)} studies finished in {time.monotonic() - started:.1f} s:\n")
        _print_table(jobs, orthanc)
        if keep_running:
            print("\nNode keeps running (Ctrl-C stops it).")
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        if orthanc is not None:
            orthanc.stop()
    return 0


def _push(files: list[Path], orthanc: OrthancPeer | None, node_port: int) -> None:
    if orthanc is None:
        send_files(files, host="127.0.0.1", port=node_port, called_aet="SMARTNODULE", calling_aet="SMARTNODULE_SCU")
        return
    client = orthanc.client
    studies = {study for path in files for study in [_study_of(client.upload_file(str(path)), client)]}
    for study_id in studies:
        client.modalities.send(target_modality="smartnodule", resources_ids=[study_id])
    print(f"Orthanc pushed {len(studies)} studies to the node over C-STORE")


def _study_of(instance_ids: list[str], client) -> str:
    return client.instances.get_parent_study_id(instance_ids[0])


def _wait_for_jobs(node: Node, expected: int, done: set[JobState], timeout_s: float) -> list[Job]:
    deadline = time.monotonic() + timeout_s
    while True:
        with node.sessions() as session:
            jobs = list(session.scalars(select(Job).order_by(Job.id)))
        if len(jobs) >= expected and all(job.state in done for job in jobs):
            return jobs
        if time.monotonic() > deadline:
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
    sr_path = Path(job.results_dir) / "sr.dcm"
    if orthanc is None or job.state is not JobState.SENT:
        return str(sr_path.parent)
    client = orthanc.client
    found = [client.instances.lookup(str(dcmread(Path(job.results_dir) / f"{kind}.dcm", stop_before_pixels=True).SOPInstanceUID))
             for kind in ("sr", "heatmap", "pdf")]
    study = client.instances.get_parent_study_id(found[0]) if found[0] else None
    return f"Orthanc {orthanc.url}/app/explorer.html#study?uuid={study} (SR, heatmap, PDF)" if all(found) else "not found in Orthanc"
