"""Scale-out on PostgreSQL: two receivers and three workers, separate processes sharing one database and
one spool volume; every instance is processed exactly once and its results delivered once."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from sqlalchemy import select

from node.store.db import Job, JobState, open_database
from node.orthanc_peer import OrthancPeer, free_port, orthanc_available
from tests.conftest import STORESCU, finished_jobs, require_binary, wait_for

pytestmark = pytest.mark.integration


def test_two_receivers_three_workers_process_each_instance_once(postgres_url, tmp_path, phantom_files):
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (make test installs it as root)")
    scp_ports = [free_port(), free_port()]
    processes = []
    with OrthancPeer(tmp_path / "orthanc") as orthanc:
        base_env = {**os.environ,
                    "SMARTNODULE_NODE__DATABASE_URL": postgres_url,
                    "SMARTNODULE_NODE__DATA_DIR": str(tmp_path / "shared"),
                    "SMARTNODULE_NODE__ALLOWED_CALLING_AETS": json.dumps(["STORESCU"]),
                    "SMARTNODULE_WORKER__POLL_INTERVAL_S": "0.05",
                    "SMARTNODULE_MODEL__THREADS": "1",
                    "SMARTNODULE_METRICS__ENABLED": "false",  # five roles on one machine; tests/node/test_metrics.py scrapes
                    "SMARTNODULE_DESTINATIONS": json.dumps([orthanc.destination("pacs")])}
        try:
            for port in scp_ports:
                processes.append(subprocess.Popen([sys.executable, "-m", "node.cli", "scp"], stderr=subprocess.DEVNULL,
                                                  env={**base_env, "SMARTNODULE_NODE__PORT": str(port)}))
            for _ in range(3):
                processes.append(subprocess.Popen([sys.executable, "-m", "node.cli", "worker"], stderr=subprocess.DEVNULL,
                                                  env=base_env))
            for port in scp_ports:
                wait_for(lambda: subprocess.run(["/usr/bin/echoscu", "-aet", "STORESCU", "-aec", "SMARTNODULE", "127.0.0.1", str(port)],
                                                capture_output=True).returncode == 0, 60, 0.3, "the receivers")
            halves = [phantom_files[0::2], phantom_files[1::2]]
            senders = [subprocess.Popen([require_binary(STORESCU), "-aet", "STORESCU", "-aec", "SMARTNODULE",
                                         "127.0.0.1", str(port), *map(str, files)])
                       for port, files in zip(scp_ports, halves)]
            assert [s.wait(timeout=120) for s in senders] == [0, 0]
            sessions = open_database(postgres_url)
            jobs = wait_for(lambda: finished_jobs(sessions, len(phantom_files), {JobState.SENT, JobState.FAILED,
                                                                                 JobState.FAILED_DELIVERY}),
                            300, 0.5, "every instance to be delivered")
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=60)
        assert [j.state for j in jobs] == [JobState.SENT] * len(phantom_files)
        assert all(j.attempts == 1 and j.delivery_attempts == 1 for j in jobs), "a job was processed twice"
        with sessions() as session:
            calling = set(session.scalars(select(Job.calling_aet)))
        assert calling == {"STORESCU"}
        srs = [i for i in orthanc.client.get("instances").json()
               if orthanc.client.instances.get_tags(i).get("Modality") == "SR"]
        assert len(srs) == len(phantom_files)
