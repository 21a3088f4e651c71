"""The walking skeleton end to end, against real peers: Orthanc pushes a study, the node's SR, heatmap
and PDF come back into the same study; DCMTK sends compressed files; a SIGKILL loses nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
from node.scu import send_files
from node.store.db import JobState, open_database
from node.orthanc_peer import OrthancPeer, free_port, orthanc_available
from tests.conftest import STORESCU, TEST_OUTPUT, all_jobs, audit_events, finished_jobs, require_binary, wait_for

pytestmark = pytest.mark.integration
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def orthanc(tmp_path):
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (make test installs it as root)")
    node_port = free_port()
    with OrthancPeer(tmp_path / "orthanc", modalities={"smartnodule": ("SMARTNODULE", "127.0.0.1", node_port)}) as peer:
        peer.node_port = node_port
        yield peer


def test_orthanc_study_comes_back_with_sr_heatmap_and_pdf(orthanc, make_settings, running_node, phantom_files):
    settings = make_settings(node={"port": orthanc.node_port}, destinations=[orthanc.destination()])
    node = running_node(settings)
    client = orthanc.client
    source = dcmread(phantom_files[0])
    [instance_id] = client.upload_file(str(phantom_files[0]))
    study_id = client.instances.get_parent_study_id(instance_id)

    client.modalities.send(target_modality="smartnodule", resources_ids=[study_id])  # REST /modalities/{id}/store

    [job] = wait_for(lambda: finished_jobs(node.sessions, 1, {JobState.SENT, JobState.FAILED_DELIVERY,
                                                              JobState.FAILED, JobState.REJECTED}), 120,
                     message="the job to be delivered")
    assert job.state is JobState.SENT, job.reason
    assert job.calling_aet == "ORTHANC" and job.model_version
    kinds = ("sr", "heatmap", "pdf", "gsps") if job.positive else ("sr", "heatmap", "pdf")
    results = {kind: dcmread(os.path.join(job.results_dir, f"{kind}.dcm")) for kind in kinds}
    for kind, dataset in results.items():
        found = client.instances.lookup(str(dataset.SOPInstanceUID))
        assert found, f"{kind} is not in Orthanc"
        assert client.instances.get_parent_study_id(found) == study_id, f"{kind} is not in the source study"
        assert dataset.StudyInstanceUID == source.StudyInstanceUID
        assert dataset.SeriesInstanceUID != source.SeriesInstanceUID
    assert len(client.studies.get_series_ids(study_id)) == 1 + len(kinds)  # source + SR + heatmap + PDF (+ GSPS)

    sr = hd.sr.Comprehensive3DSR.from_dataset(results["sr"])
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    report_title = sr.ConceptNameCodeSequence[0]
    assert (report_title.CodeValue, report_title.CodingSchemeDesignator) == ("126000", "DCM")  # Imaging Measurement Report
    rendered = subprocess.run([require_binary("/usr/bin/dsr2html"), os.path.join(job.results_dir, "sr.dcm")],
                              capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    assert "Imaging Measurement Report" in rendered.stdout
    TEST_OUTPUT.mkdir(exist_ok=True)
    (TEST_OUTPUT / "end_to_end_sr.html").write_text(rendered.stdout)

    events = [e for e in audit_events(settings) if e.get("job_id") == job.id]
    assert {"instance_stored", "job_encoded", "result_delivered", "job_delivery_finished"} <= {e["event"] for e in events}
    assert all(e["sop_instance_uid"] == job.sop_instance_uid for e in events)


def compressed_copy(source, folder, transfer_syntax: str):
    """A JPEG lossless (DCMTK dcmcjpeg) or JPEG 2000 lossless (pydicom + pylibjpeg) copy of `source`."""
    target = folder / f"{transfer_syntax}.dcm"
    if transfer_syntax == "jpeg-lossless":
        done = subprocess.run([require_binary("/usr/bin/dcmcjpeg"), "+e1", str(source), str(target)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    else:
        ds = dcmread(source)
        ds.compress(JPEG2000Lossless)
        ds.save_as(target, enforce_file_format=True)
    return target


@pytest.mark.parametrize("transfer_syntax, storescu_flag, uid", [
    ("jpeg-lossless", "-xs", "1.2.840.10008.1.2.4.70"),
    ("jpeg2000-lossless", "-xv", "1.2.840.10008.1.2.4.90"),
])
def test_storescu_compressed_instance_is_accepted_and_processed(
        make_settings, running_node, phantom_files, tmp_path, transfer_syntax, storescu_flag, uid):
    node = running_node(make_settings())
    path = compressed_copy(phantom_files[2], tmp_path, transfer_syntax)
    done = subprocess.run([require_binary(STORESCU), storescu_flag, "-aet", "STORESCU", "-aec", "SMARTNODULE",
                           "127.0.0.1", str(node.settings.node.port), str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    [job] = wait_for(lambda: finished_jobs(node.sessions, 1), 120, message="processing")
    assert job.transfer_syntax_uid == uid
    assert job.state is JobState.ENCODED, job.reason  # no destinations configured: results stay in the node
    assert 0.0 <= job.probability <= 1.0
    assert dcmread(os.path.join(job.results_dir, "sr.dcm")).StudyInstanceUID == dcmread(path).StudyInstanceUID


def test_dataset_without_pixel_data_is_acknowledged_then_skipped(make_settings, running_node, tmp_path):
    node = running_node(make_settings())
    ds = Dataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "DX", "NO^PIXELS", "NP1"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "no_pixels.dcm", enforce_file_format=True)
    [result] = send_files([tmp_path / "no_pixels.dcm"], host="127.0.0.1", port=node.settings.node.port,
                          called_aet="SMARTNODULE", calling_aet="SMARTNODULE_SCU")
    assert result.status == 0x0000
    [job] = wait_for(lambda: finished_jobs(node.sessions, 1), 60, message="the job to finish")
    assert job.state is JobState.SKIPPED
    assert "pixel" in job.reason.lower()


def test_sigkill_after_acknowledgement_loses_nothing_and_duplicates_nothing(orthanc, make_settings, phantom_files, tmp_path):
    settings = make_settings(node={"port": orthanc.node_port}, destinations=[orthanc.destination()])
    env = {**os.environ,
           "SMARTNODULE_NODE__PORT": str(settings.node.port),
           "SMARTNODULE_NODE__DATA_DIR": str(settings.node.data_dir),
           "SMARTNODULE_NODE__ALLOWED_CALLING_AETS": json.dumps(["STORESCU"]),
           "SMARTNODULE_DESTINATIONS": json.dumps([orthanc.destination()]),
           "SMARTNODULE_DELIVERY__BACKOFF_INITIAL_S": "0.2",
           "SMARTNODULE_WORKER__POLL_INTERVAL_S": "0.05",
           "SMARTNODULE_METRICS__PORT": str(free_port())}  # the shipped file serves metrics; not on a shared port
    command = [sys.executable, "-m", "node.cli", "run"]

    def start_node():
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: subprocess.run(["/usr/bin/echoscu", "-aet", "STORESCU", "-aec", "SMARTNODULE", "127.0.0.1",
                                         str(settings.node.port)],
                                        capture_output=True).returncode == 0, 90, 0.3, "the node to listen")
        return process

    first = start_node()
    done = subprocess.run([require_binary(STORESCU), "-aet", "STORESCU", "-aec", "SMARTNODULE", "127.0.0.1",
                           str(settings.node.port), *map(str, phantom_files)], capture_output=True, text=True)
    first.send_signal(signal.SIGKILL)  # right after the last acknowledgement, mid-pipeline
    first.wait()
    assert done.returncode == 0, done.stderr
    sessions = open_database(settings.database_url)
    acknowledged = all_jobs(sessions)
    assert len(acknowledged) == len(phantom_files)
    assert any(j.state in (JobState.RECEIVED, JobState.RUNNING) for j in acknowledged), "kill came too late to test"

    second = start_node()
    try:
        jobs = wait_for(lambda: finished_jobs(sessions, len(phantom_files), {JobState.SENT, JobState.FAILED,
                                                                             JobState.FAILED_DELIVERY}),
                        300, 0.5, "every acknowledged instance to be delivered")
    finally:
        second.terminate()
        second.wait(timeout=60)
    assert [j.state for j in jobs] == [JobState.SENT] * len(phantom_files)
    client = orthanc.client
    for job in jobs:
        sr_uid = str(dcmread(os.path.join(job.results_dir, "sr.dcm")).SOPInstanceUID)
        assert client.instances.lookup(sr_uid), f"SR of job {job.id} is not in Orthanc"
    sr_instances = [i for i in client.get("instances").json()
                    if client.instances.get_tags(i).get("Modality") == "SR"]
    assert len(sr_instances) == len(phantom_files), "one SR per source instance, no duplicates"
