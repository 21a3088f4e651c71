"""The Storage SCP against real DCMTK tools and a pynetdicom peer: status, spool file, job row, audit."""
from __future__ import annotations

import subprocess

import pytest
from pydicom import dcmread

from node.scu import send_files
from node.store.db import Job, JobState
from tests.conftest import ECHOSCU, STORESCU, all_jobs, audit_events, require_binary

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver(make_settings, running_node):
    """A node that receives only (no workers), so job rows stay RECEIVED for inspection."""
    return lambda **sections: running_node(make_settings(**sections), workers=0, deliver=False)


def jobs(node) -> list[Job]:
    return all_jobs(node.sessions)


def test_echoscu_is_answered(receiver):
    node = receiver()
    done = subprocess.run([require_binary(ECHOSCU), "-aet", "ECHOSCU", "-aec", "SMARTNODULE",
                           "127.0.0.1", str(node.settings.node.port)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert any(e["event"] == "echo_answered" and e["calling_aet"] == "ECHOSCU" for e in audit_events(node.settings))


def test_the_benchmarks_see_the_node_listening(receiver):
    """`make bench` (not run by CI) waits for each receiver with a C-ECHO; the node refuses a called AE title
    other than its own, so the benchmarks must call it by its name."""
    from bench.common import wait_listening

    node = receiver()
    wait_listening(node.settings.node.port, timeout_s=20)
    assert any(e["event"] == "echo_answered" and e["calling_aet"] == "STORESCU" for e in audit_events(node.settings))


def test_storescu_instance_is_spooled_and_committed_before_success(receiver, phantom_files):
    node = receiver()
    source = phantom_files[0]
    done = subprocess.run([require_binary(STORESCU), "-aet", "STORESCU", "-aec", "SMARTNODULE",
                           "127.0.0.1", str(node.settings.node.port), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    [job] = jobs(node)
    original = dcmread(source)
    assert job.state is JobState.RECEIVED
    assert job.sop_instance_uid == original.SOPInstanceUID
    assert job.calling_aet == "STORESCU"
    spooled = dcmread(job.spool_path)
    assert spooled.PixelData == original.PixelData
    assert spooled.StudyInstanceUID == original.StudyInstanceUID
    assert not any(node.spool.incoming.iterdir()), "temporary file left behind"

    events = audit_events(node.settings)
    stored = [e for e in events if e["event"] == "instance_stored"]
    assert stored and stored[0]["job_id"] == job.id and stored[0]["calling_aet"] == "STORESCU"
    assert {"association_accepted", "association_released"} <= {e["event"] for e in events}
    log_text = (node.settings.log_dir / "audit.jsonl").read_text()
    assert str(original.PatientName) not in log_text and str(original.PatientID) not in log_text


def test_repeat_of_an_instance_creates_no_second_job(receiver, phantom_files):
    node = receiver()
    for _ in range(2):
        done = subprocess.run([STORESCU, "-aet", "STORESCU", "-aec", "SMARTNODULE", "127.0.0.1",
                               str(node.settings.node.port), str(phantom_files[1])], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert len(jobs(node)) == 1
    assert [e["event"] for e in audit_events(node.settings) if e["event"].startswith("instance_")] == \
        ["instance_stored", "instance_repeated"]


def test_calling_ae_not_allowed_is_rejected_at_association(receiver, phantom_files):
    node = receiver()
    done = subprocess.run([require_binary(STORESCU), "-aet", "INTRUDER", "-aec", "SMARTNODULE", "127.0.0.1",
                           str(node.settings.node.port), str(phantom_files[0])], capture_output=True, text=True)
    assert done.returncode != 0
    assert "Association Rejected" in done.stdout + done.stderr
    assert jobs(node) == []
    assert any(e["event"] == "association_rejected" and e["calling_aet"] == "INTRUDER"
               for e in audit_events(node.settings))


def test_instance_over_the_size_limit_is_refused_out_of_resources(receiver, phantom_files):
    node = receiver(node={"max_instance_mb": 0.01})
    [result] = send_files([phantom_files[0]], host="127.0.0.1", port=node.settings.node.port,
                          called_aet="SMARTNODULE", calling_aet="SMARTNODULE_SCU")
    assert result.status == 0xA700
    assert "larger than" in result.comment
    assert jobs(node) == []
