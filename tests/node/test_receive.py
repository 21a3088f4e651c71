"""node.receive: bulk socket reads and the incoming files that record a failed write instead of raising it."""
from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest
from pynetdicom import AE
from pynetdicom.association import Association

from node.receive import DISK_FULL, TOO_LARGE, BulkReadSocket, IncomingFiles


def test_bulk_read_socket_reads_a_pdu_sent_in_pieces():
    ours, peer = socket.socketpair()
    payload = os.urandom(9 * 1024 * 1024 + 7)  # past PREALLOCATE_MAX: the buffer grows twice

    def send_in_pieces() -> None:
        for start in range(0, len(payload), 65_537):
            peer.sendall(payload[start:start + 65_537])

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    sock = BulkReadSocket(Association(AE(), "acceptor"), client_socket=ours)
    assert sock.recv(6) == payload[:6]
    assert sock.recv(len(payload) - 6) == payload[6:]
    sender.join()
    ours.close()
    peer.close()


def test_bulk_read_socket_returns_what_arrived_when_the_peer_closes():
    ours, peer = socket.socketpair()
    peer.sendall(b"partial PDU")
    peer.close()
    sock = BulkReadSocket(Association(AE(), "acceptor"), client_socket=ours)
    assert sock.recv(1 << 20) == bytearray(b"partial PDU")
    ours.close()


def test_incoming_file_past_the_size_limit_keeps_nothing_and_says_so(tmp_path):
    files = IncomingFiles(tmp_path, max_bytes=1000)
    incoming = files(delete=False, mode="wb", suffix=".dcm")
    incoming.write(b"x" * 600)
    incoming.file.flush()
    assert files.failure(incoming.name) is None
    incoming.write(b"y" * 600)
    incoming.write(b"z" * 10)  # the rest of the instance is read and dropped
    assert files.failure(incoming.name) == TOO_LARGE
    assert os.path.getsize(incoming.name) == 0
    incoming.close()
    assert files.failure(incoming.name) is None  # closed files are forgotten


def test_incoming_file_on_a_full_disk_gives_the_space_back_and_says_so(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (make test runs as root in CI)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        files = IncomingFiles(mount, max_bytes=1 << 30)
        incoming = files(delete=False, mode="wb", suffix=".dcm")
        for _ in range(8):
            incoming.write(b"\0" * 65536)
        assert files.failure(incoming.name) == DISK_FULL
        assert os.path.getsize(incoming.name) == 0
        incoming.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_incoming_files_refuse_a_request_from_another_pynetdicom_version(tmp_path):
    with pytest.raises(ValueError, match="unexpected temporary file request"):
        IncomingFiles(tmp_path, 1)(delete=True, mode="wb", suffix=".dcm")


def test_incoming_files_do_not_keep_a_dropped_file_open(tmp_path):
    files = IncomingFiles(tmp_path, max_bytes=1000)
    incoming = files(delete=False, mode="wb", suffix=".dcm")
    name, fd = incoming.name, incoming.file.fileno()
    del incoming  # pynetdicom lets go of the message of an association that ended mid-transfer
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
    assert files.failure(name) is None


def test_bulk_read_socket_does_not_trust_a_pdu_length_it_has_not_received():
    ours, peer = socket.socketpair()
    peer.sendall(b"x" * 100)
    peer.close()
    sock = BulkReadSocket(Association(AE(), "acceptor"), client_socket=ours)
    assert sock.recv(1 << 40) == bytearray(b"x" * 100)  # a 1 TiB claim: no 1 TiB buffer
    ours.close()


# --- UIDs by the grammar, paths under their root (node.spool) ---------------------------------

from node.receive import A_ABORT_INVALID_PDU, inflated_size_exceeds  # noqa: E402
from node.store.spool import OutsideRoot, Spool, UnsafeUID, checked_uid, under  # noqa: E402


@pytest.mark.parametrize("uid", ["..", ".", "1..2", "01.2", "1.02", "1." + "2" * 63, ".1", "1.", "", "1.2.a", "1/2",
                                 "1.2\x00", " 1.2"])
def test_uids_outside_the_dicom_grammar_are_refused(uid):
    with pytest.raises(UnsafeUID) as refused:
        checked_uid(uid, "Study Instance UID")
    assert "Study Instance UID" in str(refused.value) and (not uid or uid not in str(refused.value))


@pytest.mark.parametrize("uid", ["0", "1.2.840.10008.1.2.1", "1.0.3", "2.25.0", "1." + "2" * 62])
def test_uids_of_the_dicom_grammar_pass(uid):
    assert checked_uid(uid, "SOP Instance UID") == uid


def test_a_path_that_resolves_outside_its_root_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(OutsideRoot):
        under(tmp_path / "root", tmp_path / "root" / "link" / "elsewhere.dcm")
    with pytest.raises(OutsideRoot):
        under(tmp_path / "root", tmp_path / "root" / ".." / "x.dcm")
    assert under(tmp_path / "root", tmp_path / "root" / "1.2" / "3.dcm") == (tmp_path / "root" / "1.2" / "3.dcm")


def test_spool_never_places_a_file_over_an_existing_one(tmp_path):
    spool = Spool(tmp_path / "spool")
    first, second = spool.incoming / "a.dcm", spool.incoming / "b.dcm"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    placed = spool.place(first, "1.2", "1.2.3")
    with pytest.raises(FileExistsError):
        spool.place(second, "1.2", "1.2.3")
    assert placed.read_bytes() == b"first" and second.exists()
    assert spool.place(second, "1.2", "1.2.3", version=2).name == "1.2.3.v2.dcm"


# --- limits before cost (node.receive) ----------------------------------------------------------

def test_bulk_read_socket_aborts_a_pdu_longer_than_the_limit_before_reading_it():
    ours, peer = socket.socketpair()
    sock = BulkReadSocket(Association(AE(), "acceptor"), client_socket=ours)
    sock.max_pdu_length = 1000 + 6
    peer.sendall(b"\x04\x00" + (1 << 32 - 1).to_bytes(4, "big") + b"\0" * 4096)
    assert len(sock.recv(6)) == 6
    with pytest.raises(OSError, match="exceeds"):
        sock.recv(1 << 32 - 1)
    peer.settimeout(5)
    assert peer.recv(100) == A_ABORT_INVALID_PDU
    ours.close()
    peer.close()


def test_a_deflate_bomb_is_measured_in_bounded_steps(tmp_path):
    from tests.hostile import write_deflate_bomb

    bomb = write_deflate_bomb(tmp_path / "bomb.dcm", 40 << 20)
    assert bomb.stat().st_size < 100 << 10
    offset = 144 + int.from_bytes(bomb.read_bytes()[140:144], "little")
    assert inflated_size_exceeds(bomb, offset, 32 << 20)
    assert not inflated_size_exceeds(bomb, offset, 48 << 20)
