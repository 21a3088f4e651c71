"""Hostile traffic against a running node (#16): limits before cost, UIDs that are not paths, repeats that never
overwrite, who may talk. Real pynetdicom and DCMTK peers on loopback; raw sockets where a peer misbehaves."""
from __future__ import annotations

import subprocess
from hashlib import sha256
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from node.store.db import JobState
from tests.conftest import ECHOSCU, all_jobs, audit_events, finished_jobs, require_binary, wait_for
from tests.hostile import (closed_by_peer, echo, pdu_length_bomb, rle_pixel_bomb, silent_connections, small_instance,
                           store, store_file, write_deflate_bomb)

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver(make_settings, running_node):
    """A node that receives only (no workers), so job rows stay RECEIVED for inspection."""
    return lambda **sections: running_node(make_settings(**sections), workers=0, deliver=False)


def events(node, name: str) -> list[dict]:
    return [e for e in audit_events(node.settings) if e["event"] == name]


def spooled_files(node) -> list[Path]:
    return sorted(p for p in node.spool.root.rglob("*.dcm") if ".incoming" not in p.parts)


# --- UIDs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("study_uid", ["..", ".", "1..2", "01.2", "1." + "2" * 63])
def test_an_instance_whose_uid_is_not_a_dicom_uid_is_refused_and_lands_nowhere(receiver, study_uid, tmp_path):
    node = receiver()
    response = store(node.settings.node.port, small_instance(9911, StudyInstanceUID=study_uid))
    assert response.Status == 0xC000 and response.ErrorComment == "invalid UID: Study Instance UID"
    assert all_jobs(node.sessions) == [] and spooled_files(node) == []
    assert not list(tmp_path.glob("*.dcm")) and not list(node.settings.node.data_dir.glob("*.dcm"))
    [refused] = events(node, "instance_refused")
    assert refused["reason"] == "invalid_uid" and study_uid not in refused["error"]


# --- repeats -----------------------------------------------------------------------------------

def test_a_repeat_with_the_same_content_changes_nothing(receiver):
    node = receiver()
    ds = small_instance(9912)
    assert store(node.settings.node.port, ds).Status == 0x0000
    [job] = all_jobs(node.sessions)
    before = (Path(job.spool_path).read_bytes(), Path(job.spool_path).stat().st_mtime_ns)
    assert store(node.settings.node.port, ds).Status == 0x0000
    [again] = all_jobs(node.sessions)
    assert (again.version, again.spool_path, again.content_sha256) == (1, job.spool_path, job.content_sha256)
    assert (Path(job.spool_path).read_bytes(), Path(job.spool_path).stat().st_mtime_ns) == before
    assert len(spooled_files(node)) == 1 and len(events(node, "instance_repeated")) == 1


def test_a_repeat_with_other_content_keeps_the_first_file_and_is_processed_as_a_new_version(
        make_settings, running_node):
    node = running_node(make_settings())
    port = node.settings.node.port
    first = small_instance(9913, 512)
    assert store(port, first).Status == 0x0000
    [job] = wait_for(lambda: finished_jobs(node.sessions, 1), 120, message="the first version to be processed")
    first_path, first_bytes = Path(job.spool_path), Path(job.spool_path).read_bytes()
    first_results = job.results_dir
    changed = small_instance(9914, 512, SOPInstanceUID=first.SOPInstanceUID, StudyInstanceUID=first.StudyInstanceUID,
                             SeriesInstanceUID=first.SeriesInstanceUID, PatientName="CHANGED^NAME")
    changed.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    assert changed.PixelData != first.PixelData
    assert store(port, changed).Status == 0x0000

    assert first_path.read_bytes() == first_bytes  # the first file stays byte for byte
    [job] = wait_for(lambda: (jobs := finished_jobs(node.sessions, 1)) and jobs[0].version == 2 and jobs, 120,
                     message="the second version to be processed")
    assert job.state is JobState.ENCODED, job.reason
    assert Path(job.spool_path).name == f"{first.SOPInstanceUID}.v2.dcm"
    assert dcmread(job.spool_path).PatientName == "CHANGED^NAME"
    assert job.content_sha256 == sha256(Path(job.spool_path).read_bytes()).hexdigest()
    assert job.results_dir != first_results and Path(job.results_dir).name.startswith("v2-attempt-")
    [replaced] = events(node, "instance_replaced")
    assert replaced["job_id"] == job.id and replaced["version"] == 2
    assert "CHANGED" not in (node.settings.log_dir / "audit.jsonl").read_text()


# --- limits before cost ------------------------------------------------------------------------

def test_a_pdu_length_bomb_before_the_association_is_aborted_without_buffering(receiver):
    node = receiver()
    taken = pdu_length_bomb(node.settings.node.port, send_limit=512 << 20)
    assert taken < 32 << 20  # what the kernel's socket buffers hold, not the claim
    [refused] = [e for e in events(node, "connection_refused") if e["reason"] == "pdu_too_large"]
    assert refused["pdu_length"] == 0xFFFFFFF0
    assert echo(node.settings.node.port, 10)


def test_a_pdu_length_bomb_inside_an_association_is_aborted(receiver):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = receiver()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.node.port, ae_title="SMARTNODULE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    assoc.dul.socket.socket = None  # pynetdicom stops reading it; the raw socket is ours now
    taken = pdu_length_bomb(0, pdu_type=0x04, send_limit=512 << 20, sock=raw)
    assert taken < 32 << 20
    [refused] = events(node, "pdu_refused")
    assert refused["reason"] == "pdu_too_large" and refused["calling_aet"] == "STORESCU"
    wait_for(lambda: events(node, "association_aborted"), 30, message="the association to end as aborted")


def test_a_deflate_bomb_is_refused_before_it_is_inflated(receiver, tmp_path):
    node = receiver(node={"max_instance_mb": 1})
    bomb = write_deflate_bomb(tmp_path / "bomb.dcm", 24 << 20)
    assert bomb.stat().st_size < 100 << 10
    response = store_file(node.settings.node.port, bomb)
    assert response.Status == 0xA700 and "inflated" in response.ErrorComment
    assert all_jobs(node.sessions) == [] and spooled_files(node) == []
    assert [e["reason"] for e in events(node, "instance_refused")] == ["inflated_too_large"]


def test_a_deflated_instance_within_the_limits_is_stored(receiver, tmp_path):
    node = receiver(node={"max_instance_mb": 1})
    fine = write_deflate_bomb(tmp_path / "fine.dcm", 512 << 10)
    response = store_file(node.settings.node.port, fine)
    assert response.Status == 0x0000
    [job] = all_jobs(node.sessions)
    assert job.transfer_syntax_uid == DeflatedExplicitVRLittleEndian


def test_an_image_with_more_pixels_than_the_limit_is_refused_from_its_header(receiver):
    node = receiver(node={"max_pixels": 16_000_000})
    bomb = rle_pixel_bomb(5000)  # 25 million pixels in about 400 KB of RLE
    response = store(node.settings.node.port, bomb)
    assert response.Status == 0xA700 and "pixels" in response.ErrorComment
    [refused] = events(node, "instance_refused")
    assert (refused["reason"], refused["pixels"]) == ("too_many_pixels", 25_000_000)
    assert all_jobs(node.sessions) == []


def test_silent_connections_hold_no_association_slot(receiver):
    node = receiver(node={"max_associations": 2, "association_request_timeout_s": 60,
                          "max_connections_per_address": 100})
    with silent_connections(node.settings.node.port, 50):
        assert echo(node.settings.node.port, 5)  # served with a 5 s association and DIMSE timeout
        assert echo(node.settings.node.port, 5)


def test_a_connection_that_sends_no_association_request_is_closed_after_the_limit(receiver):
    node = receiver(node={"association_request_timeout_s": 0.5})
    with silent_connections(node.settings.node.port, 1) as [silent]:
        assert closed_by_peer(silent, 30)
    [refused] = events(node, "connection_refused")
    assert refused["reason"] == "association_request_timeout" and refused["peer"] == "127.0.0.2"


def test_connections_over_the_per_address_cap_are_closed_and_other_addresses_served(receiver):
    node = receiver(node={"max_connections_per_address": 3, "association_request_timeout_s": 60})
    port = node.settings.node.port
    with silent_connections(port, 3), silent_connections(port, 1) as [fourth]:
        assert closed_by_peer(fourth, 30)
        assert echo(port, 5)  # from 127.0.0.1
    refused = [e for e in events(node, "connection_refused") if e["reason"] == "too_many_connections_from_address"]
    assert [e["peer"] for e in refused] == ["127.0.0.2"]


# --- who may talk ------------------------------------------------------------------------------

def test_a_called_ae_title_other_than_ours_is_rejected(receiver):
    node = receiver()
    done = subprocess.run([require_binary(ECHOSCU), "-aet", "ECHOSCU", "-aec", "SOMEONE_ELSE", "127.0.0.1",
                           str(node.settings.node.port)], capture_output=True, text=True)
    assert done.returncode != 0
    assert "Called AE Title Not Recognized" in done.stdout + done.stderr
    assert [e["reason"] for e in events(node, "association_refused")] == ["called_ae_not_recognized"]


def test_any_called_ae_title_is_accepted_when_the_check_is_off(receiver):
    node = receiver(node={"require_called_ae_title": False})
    assert echo(node.settings.node.port, 10, called_aet="SOMEONE_ELSE")
