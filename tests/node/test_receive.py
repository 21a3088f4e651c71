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
