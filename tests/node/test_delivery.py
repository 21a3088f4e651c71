"""Result delivery against a real Orthanc: a PACS that is down for a while gets everything once, and a
PACS that refuses the association ends FAILED_DELIVERY, visible, until `smartnodule resend` delivers."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydicom import dcmread

from node.store.db import DeliveryState, JobState
from node.orthanc_peer import OrthancPeer, orthanc_available
from tests.conftest import STORESCU, all_jobs, audit_events, finished_jobs, require_binary, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def pacs(tmp_path):
    """An Orthanc that the test may stop and start again on the same ports and storage."""
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (make test installs it as root)")
    peer = OrthancPeer(tmp_path / "orthanc")
    yield peer
    peer.stop()


def push(node, files):
    done = subprocess.run([require_binary(STORESCU), "-aet", "STORESCU", "-aec", "SMARTNODULE", "127.0.0.1",
                           str(node.settings.node.port), *map(str, files)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def sr_instances(client) -> list[str]:
    return [i for i in client.get("instances").json() if client.instances.get_tags(i).get("Modality") == "SR"]


def test_pacs_down_during_delivery_receives_everything_once_when_back(pacs, make_settings, running_node, phantom_files):
    settings = make_settings(
        destinations=[pacs.destination("pacs")],
        delivery={"backoff_initial_s": 0.5, "backoff_max_s": 2.0, "max_attempts": 30})
    node = running_node(settings)
    files = phantom_files[:3]
    push(node, files)

    def failed_twice():
        jobs = all_jobs(node.sessions)
        return jobs if len(jobs) == 3 and all(j.delivery_attempts >= 2 for j in jobs) else None

    retrying = wait_for(failed_twice, 120, 0.2, "every job to have failed delivery twice")
    assert all(j.state in (JobState.ENCODED, JobState.DELIVERING) for j in retrying)

    pacs.start()
    jobs = wait_for(lambda: finished_jobs(node.sessions, 3, {JobState.SENT, JobState.FAILED_DELIVERY}), 120,
                    message="delivery after the PACS came back")
    assert [j.state for j in jobs] == [JobState.SENT] * 3
    client = pacs.client
    assert len(sr_instances(client)) == 3
    positives = sum(bool(j.positive) for j in jobs)
    # SR + heatmap + PDF per source and a presentation state per positive one (the default objects), nothing twice
    assert len(client.get("instances").json()) == 9 + positives
    failures = [e for e in audit_events(settings) if e["event"] == "result_delivery_failed"]
    assert failures and all(e["destination"] == "pacs" for e in failures)


def test_refused_association_ends_failed_delivery_then_resend_delivers(pacs, make_settings, running_node, phantom_files):
    pacs.aet = "OTHERPACS"
    pacs.check_called_aet = True
    pacs.start()
    settings = make_settings(
        destinations=[{**pacs.destination("pacs"), "ae_title": "ORTHANC"}],  # not the AE title this PACS answers to
        delivery={"backoff_initial_s": 0.2, "backoff_max_s": 0.5, "max_attempts": 2})
    node = running_node(settings)
    push(node, phantom_files[3:4])
    [job] = wait_for(lambda: finished_jobs(node.sessions, 1, {JobState.SENT, JobState.FAILED_DELIVERY}), 120,
                     message="delivery to give up")
    assert job.state is JobState.FAILED_DELIVERY
    # Orthanc closes the connection right after its A-ASSOCIATE-RJ; pynetdicom may read the close first and
    # report an abort, so the reason names the refused association, rejected or aborted as pynetdicom saw it
    refused = f"association with ORTHANC@127.0.0.1:{pacs.dicom_port}"
    assert refused in job.reason
    assert [d.state for d in job.deliveries] == [DeliveryState.FAILED]

    env = {**os.environ, "SMARTNODULE_NODE__DATA_DIR": str(settings.node.data_dir)}
    listed = subprocess.run([sys.executable, "-m", "node.cli", "jobs", "--state", "FAILED_DELIVERY"],
                            env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and f"{job.id}\tFAILED_DELIVERY" in listed.stdout and refused in listed.stdout

    pacs.stop()
    pacs.aet = "ORTHANC"
    pacs.start()
    resent = subprocess.run([sys.executable, "-m", "node.cli", "resend", str(job.id)], env=env, capture_output=True, text=True)
    assert resent.returncode == 0, resent.stderr
    [job] = wait_for(lambda: finished_jobs(node.sessions, 1, {JobState.SENT}), 60, message="the re-sent delivery")
    sr_uid = str(dcmread(os.path.join(job.results_dir, "sr.dcm")).SOPInstanceUID)
    assert pacs.client.instances.lookup(sr_uid)
