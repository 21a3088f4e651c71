"""No patient data in any log, console output, database column or audit line; the audit log is appended to and
its hash chain intact.

Every patient and study attribute of a set of instances carries a marker unique to the instance and the
attribute, as a valid value and (in other instances) as an invalid one that the header reading repairs or
leaves out. They go through a node process (`smartnodule run`) to Orthanc: two delivered, one REJECTED
(pixels cut), one SKIPPED (lateral view), one FAILED (its results folder blocked by a file: a disk fault),
one refused as unparseable (0xC000, the header cut inside Patient ID). Then the node's console output (its
stdout and stderr), every file it wrote outside the spool and results folders (which hold DICOM by design),
every column of every table of its database and the audit log are searched for every marker.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from sqlalchemy import inspect, text

from config.settings import AuditSettings
from inference.training.phantoms import generate_phantom, phantom_dataset
from node.audit import key_path, read_key, verify_chain
from node.store.db import TERMINAL, JobState
from tests.conftest import STORESCU, require_binary, wait_for
from tests.data.make_messy_corpus import put_raw
from tests.faults.suite import NodeProcess, settled
from tests.hostile import store_file
from tests.node.test_end_to_end import orthanc  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

# Patient (Patient, Patient Study modules), study (General Study) and equipment attributes, one marker each.
MARKED = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
          "OtherPatientIDs", "OtherPatientNames", "PatientComments", "EthnicGroup", "PatientMotherBirthName",
          "PatientAddress", "PatientTelephoneNumbers", "MilitaryRank", "MedicalAlerts", "Allergies",
          "CountryOfResidence", "ResponsiblePerson", "PatientAge", "PatientSize", "PatientWeight", "Occupation",
          "AdditionalPatientHistory", "AdmissionID", "AdmittingDiagnosesDescription",
          "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
          "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingPhysician", "OperatorsName",
          "PerformingPhysicianName", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
          "StationName", "SeriesDescription")
ROLES = ("valid", "invalid", "rejected", "skipped", "failed", "unparseable")


def marker(instance: int, index: int) -> str:
    return f"QZ{instance}{index:02d}X"


def marked_value(keyword: str, vr: str, instance: int, index: int, valid: bool) -> tuple[bytes, list[str]]:
    """The value written and the strings that must not appear anywhere (for a date, time or number its digits)."""
    m = marker(instance, index)
    if valid and vr == "DA":
        value = f"19{10 + instance}{index % 12 + 1:02d}{index % 28 + 1:02d}"
        return value.encode(), [value, f"{value[:4]}-{value[4:6]}-{value[6:]}"]
    if valid and vr == "TM":
        value = f"{index % 24:02d}1729.48{instance}7"
        return value.encode(), [value, f"{value[:2]}:{value[2:4]}:{value[4:]}"]
    if valid and vr == "DS":
        value = f"{4000 + 10 * instance + index}.27"
        return value.encode(), [value]
    if valid and vr in ("CS", "AS"):  # no room for a marker in a valid code or age
        return (b"F" if vr == "CS" else b"057Y"), []
    if valid:
        value = {"PN": f"{m}A^{m}B", "LT": f"{m} comments", "ST": f"{m} street"}.get(vr, m)
        return value.encode(), [m]
    invalid = {"DA": f"{m}-57", "TM": f"{m}:12", "DS": f"{m},5", "AS": m, "CS": m.lower(),
               "PN": f"{m}^A^B^C^D^E^F=G=H=I", "SH": m + "Y" * 16}.get(vr, m + "Y" * 70)
    return invalid.encode(), [m]


def marked_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """One DX phantom per role with every MARKED attribute set; the files by role and every marker."""
    folder.mkdir(parents=True, exist_ok=True)
    files, secrets = {}, []
    for instance, role in enumerate(ROLES):
        ds = phantom_dataset(generate_phantom(9900 + instance, 512), patient_id=marker(instance, 1),
                             view_position="LL" if role == "skipped" else "PA")
        for index, keyword in enumerate(MARKED):
            vr = dictionary_VR(keyword)
            value, hidden = marked_value(keyword, vr, instance, index, valid=role in ("valid", "unparseable"))
            put_raw(ds, keyword, vr, value)
            secrets += hidden
        if role == "rejected":
            ds.PixelData = ds.PixelData[:1000]
        files[role] = folder / f"{role}.dcm"
        ds.save_as(files[role], enforce_file_format=True)
    data = files["unparseable"].read_bytes()
    files["unparseable"].write_bytes(data[:data.index(marker(ROLES.index("unparseable"), 1).encode()) + 4])
    return files, secrets


def database_dump(sessions) -> str:
    """Every column of every row of every table, as text."""
    engine = sessions.kw["bind"]
    with engine.connect() as connection:
        return "\n".join(repr(tuple(row)) for table in inspect(engine).get_table_names()
                         for row in connection.execute(text(f'SELECT * FROM "{table}"')))


def written_files(node: NodeProcess) -> dict[Path, str]:
    """The text of every file the node wrote, its console log included, but not the DICOM spool and results."""
    stores = (node.data_dir / "spool", node.data_dir / "results")
    return {path: path.read_bytes().decode("utf-8", "replace") for path in node.workdir.rglob("*")
            if path.is_file() and not any(store in path.parents for store in stores)}


def test_no_patient_data_in_logs_console_database_or_audit(
        orthanc, tmp_path):  # noqa: F811  (fixture imported above)
    files, secrets = marked_files(tmp_path / "in")
    workdir = tmp_path / "run"
    workdir.mkdir()
    node = NodeProcess(workdir, node__port=orthanc.node_port, destinations=[orthanc.destination()],
                       node__allowed_calling_aets=["STORESCU", "SMARTNODULE_SCU"], worker__max_attempts=2)
    failed_uid = str(pydicom.dcmread(files["failed"], stop_before_pixels=True).SOPInstanceUID)
    (node.data_dir / "results").mkdir(parents=True)
    (node.data_dir / "results" / failed_uid).write_bytes(b"")  # a file where the job's results folder goes
    node.start()
    try:
        stored = [files[role] for role in ROLES[:-1]]
        done = subprocess.run([require_binary(STORESCU), "-nh", "-aet", "STORESCU", "-aec", "SMARTNODULE",
                               "127.0.0.1", str(node.port), *map(str, stored)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert store_file(node.port, files["unparseable"]).Status == 0xC000
        sessions = node.open_database()
        uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): role
                for role, p in files.items() if role != "unparseable"}
        jobs = wait_for(lambda: settled(sessions, set(uids)), 300, 0.5, "every marked instance to finish")
        states = {uids[j.sop_instance_uid]: j.state for j in jobs}
        assert states == {"valid": JobState.SENT, "invalid": JobState.SENT, "rejected": JobState.REJECTED,
                          "skipped": JobState.SKIPPED, "failed": JobState.FAILED}, [(j.state, j.reason) for j in jobs]
        assert all(state in TERMINAL for state in states.values())
    finally:
        node.stop()

    audit_path = node.data_dir / "logs" / "audit.jsonl"
    first_run = audit_path.read_text()
    node.start()  # a restart configures logging again, on the same file
    node.stop()
    second_run = audit_path.read_text()
    assert second_run.startswith(first_run) and len(second_run) > len(first_run), "earlier audit lines were lost"
    assert verify_chain(audit_path, read_key(key_path(AuditSettings(), node.data_dir))).intact

    places = {str(path.relative_to(workdir)): content for path, content in written_files(node).items()}
    places["database"] = database_dump(node.open_database())
    console = [name for name in places if name.startswith("run-")]
    assert console and any("instance_stored" in places[name] for name in console), "the console was not captured"
    assert any("job_failed" in places[name] for name in console) and "source_header_repaired" in second_run
    found = {where: sorted({s for s in secrets if s.lower() in content.lower()}) for where, content in places.items()}
    found = {where: hits for where, hits in found.items() if hits}
    print(f"patient markers: {len(secrets)} planted, {sum(map(len, found.values()))} found in "
          f"{len(places)} places ({', '.join(sorted(places))})")
    assert found == {}, f"patient data outside DICOM: {found}"
