"""No patient name, ID or birth date in the audit log or the application log; the audit log is appended to and its hash chain intact.

Phantoms with a distinctive identity go through a running node to Orthanc (one
delivered, one REJECTED, one SKIPPED, one refused as unparseable: 0xC000), then both
logs are searched for every part of that identity.
"""
from __future__ import annotations

import subprocess

import pytest
from pydicom.uid import generate_uid

from inference.phantoms import generate_phantom, phantom_dataset
from node.audit import verify_chain
from node.db import TERMINAL
from tests.conftest import STORESCU, finished_jobs, require_binary, wait_for
from tests.node.test_bad_input import chunked_sender, file_meta, send_pynetdicom  # noqa: F401  (fixture)
from tests.node.test_end_to_end import orthanc  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration
NAME, PATIENT_ID, BIRTH_DATE = "QUIXOTEFINCH^ZENOBIA^MARGARETH", "PIDQX73914", "19370412"
SECRETS = (NAME, *NAME.split("^"), PATIENT_ID, BIRTH_DATE, "1937-04-12", "12.04.1937")


def identified_files(folder, count: int) -> list:
    """`count` DX phantoms of one identified patient: the first whole, then truncated pixels, then lateral."""
    paths = []
    for index in range(count):
        ds = phantom_dataset(generate_phantom(9900 + index, 512), patient_name=NAME, patient_id=PATIENT_ID,
                             view_position="LL" if index == 2 else "PA")
        ds.PatientBirthDate = BIRTH_DATE
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if index == 1:
            ds.PixelData = ds.PixelData[:1000]
        paths.append(folder / f"identified_{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def store(paths, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([require_binary(STORESCU), "-nh", "-aet", "STORESCU", "-aec", "SMARTNODULE", "127.0.0.1",
                           str(port), *map(str, paths)], capture_output=True, text=True)


def test_logs_hold_no_patient_data_and_audit_log_is_appended(  # noqa: F811  (fixtures imported above)
        orthanc, make_settings, running_node, tmp_path, capsys, chunked_sender):
    settings = make_settings(node={"port": orthanc.node_port}, destinations=[orthanc.destination()])
    node = running_node(settings)
    paths = identified_files(tmp_path, 3)
    unparseable = tmp_path / "unparseable.dcm"  # the header cut inside Patient's Name
    data = paths[0].read_bytes()
    unparseable.write_bytes(data[:data.index(PATIENT_ID.encode()) + 4])
    assert store(paths, settings.node.port).returncode == 0
    assert send_pynetdicom(unparseable, settings.node.port, file_meta(unparseable)) == 0xC000
    jobs = wait_for(lambda: finished_jobs(node.sessions, 3, TERMINAL), 180,
                    message="delivery, rejection and skip")
    assert sorted(j.state.value for j in jobs) == ["REJECTED", "SENT", "SKIPPED"], [(j.state, j.reason) for j in jobs]
    node.stop()

    audit_path = settings.log_dir / "audit.jsonl"
    first_run = audit_path.read_text()
    running_node(settings, workers=0)  # a restart configures logging again, on the same file
    second_run = audit_path.read_text()
    assert second_run.startswith(first_run) and len(second_run) > len(first_run), "earlier audit lines were lost"
    assert verify_chain(audit_path).intact

    console = capsys.readouterr()
    assert "instance_stored" in console.err, "the application log was not captured"
    for where, text in (("audit log", second_run), ("application log", console.err + console.out)):
        found = [secret for secret in SECRETS if secret.lower() in text.lower()]
        assert not found, f"{where} holds patient data: {found}"
