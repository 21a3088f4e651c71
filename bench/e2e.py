"""End-to-end latency: from the start of DCMTK `storescu` to the SR found in a real Orthanc.

Starts a local Orthanc and the node (`smartnodule run`, a separate process, model
warm), sends N single-image 2048x2048 phantom studies one after another and
polls Orthanc's REST API for each study's SR. Prints a table with the stage
split recorded on each job row, then one JSON line.

    .venv/bin/python -m bench.e2e --n 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from bench.common import free_port, load1, model_card, node_env, phantoms, print_table, rss_mb, send, start_node, \
    stop_process, wait_listening
from node.store.db import Job, open_database
from node.orthanc_peer import OrthancPeer


def sr_in_orthanc(client, study_uid: str) -> bool:
    study = client.studies.lookup(study_uid)
    if not study:
        return False
    return any(client.get(f"series/{s}").json()["MainDicomTags"].get("Modality") == "SR"
               for s in client.studies.get_series_ids(study))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    files = phantoms(args.n, args.size, seed0=777000)
    node_port = free_port()
    with OrthancPeer(work / "orthanc") as orthanc:
        node = start_node("run", node_env(
            node_port, work / "node", model__card=str(model_card()[0]), worker__poll_interval_s="0.02",
            destinations=[orthanc.destination()]))
        try:
            wait_listening(node_port, process=node)
            client = orthanc.client
            latencies = []
            for path in files:
                study_uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
                start = time.perf_counter()
                send(node_port, [path])
                while not sr_in_orthanc(client, study_uid):
                    if time.perf_counter() - start > 120:
                        raise RuntimeError(f"no SR in Orthanc for {path.name} after 120 s")
                    time.sleep(0.02)
                latencies.append(time.perf_counter() - start)
            peak_rss = rss_mb(node.pid)
        finally:
            stop_process(node, 60)
    sessions = open_database(f"sqlite:///{work / 'node' / 'smartnodule.db'}")
    with sessions() as session:
        stages = [json.loads(j.stage_seconds) for j in session.scalars(select(Job).order_by(Job.id))]
    print_table(["#", "e2e s", *stages[0]], [[i, f"{latency:.2f}", *(f"{v:.3f}" for v in split.values())]
                                             for i, (latency, split) in enumerate(zip(latencies, stages))])
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    print(json.dumps({"bench": "e2e", "median_s": round(statistics.median(latencies), 3), "p95_s": round(p95, 3),
                      "n": len(latencies), "size": args.size, "node_rss_mb": round(peak_rss),
                      "load1": load1()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
