"""The demo's and tests' Orthanc starts again on fresh ports when a picked port was taken meanwhile."""
from __future__ import annotations

import socket

import pytest

from node.orthanc_peer import OrthancPeer, orthanc_available

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not orthanc_available(), reason="Orthanc is needed (make test installs it as root)")]


def test_a_taken_port_is_replaced_by_a_free_one(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        peer = OrthancPeer(tmp_path / "orthanc", dicom_port=taken)
        with peer:
            assert peer.dicom_port != taken
            assert peer.client.get_system()["DicomPort"] == peer.dicom_port
