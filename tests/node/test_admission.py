"""Admission control and secure transport against DCMTK: hosts per source, a nearly full spool disk,
DICOM TLS with client certificates, and results returned to the calling AE."""
from __future__ import annotations

import subprocess

import pytest
from pydicom import dcmread

from node.store.db import JobState
from node.orthanc_peer import free_port
from tests.conftest import ECHOSCU, STORESCU, audit_events, finished_jobs, require_binary, wait_for

pytestmark = pytest.mark.integration
STORESCP = "/usr/bin/storescp"


def storescu(port: int, *files, options=()):
    return subprocess.run([require_binary(STORESCU), *options, "-aet", "STORESCU", "-aec", "SMARTNODULE",
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True, text=True)


def refused(settings) -> list[str]:
    return [e["reason"] for e in audit_events(settings) if e["event"] == "association_refused"]


def test_sender_from_a_host_not_listed_for_its_ae_title_is_rejected(make_settings, running_node, phantom_files):
    settings = make_settings(sources=[{"ae_title": "STORESCU", "hosts": ["192.0.2.10"]}])
    running_node(settings, workers=0, deliver=False)
    done = storescu(settings.node.port, phantom_files[0])
    assert done.returncode != 0 and "Association Rejected" in done.stdout + done.stderr
    assert refused(settings) == ["host_not_allowed"]


def test_associations_are_refused_while_the_spool_disk_is_nearly_full(make_settings, running_node, phantom_files):
    settings = make_settings(node={"min_free_disk_mb": 1e12})  # more than any disk has free
    running_node(settings, workers=0, deliver=False)
    done = storescu(settings.node.port, phantom_files[0])
    assert done.returncode != 0 and "Association Rejected" in done.stdout + done.stderr
    assert "Local Limit Exceeded" in done.stdout + done.stderr
    assert refused(settings) == ["disk_nearly_full"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate and a client certificate made with openssl."""
    folder = tmp_path_factory.mktemp("pki")
    openssl = require_binary("/usr/bin/openssl")

    def run(*args):
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=SmartNodule test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    for name in ("server", "client", "loopback"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        (folder / f"{name}.ext").write_text("subjectAltName = IP:127.0.0.1\n" if name == "loopback" else "")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")
    return folder


def test_tls_listener_requires_a_client_certificate(make_settings, running_node, phantom_files, pki):
    settings = make_settings(tls={"enabled": True, "certificate": str(pki / "server.pem"),
                                  "private_key": str(pki / "server.key"), "ca_certificates": str(pki / "ca.pem"),
                                  "require_client_certificate": True})
    node = running_node(settings, workers=0, deliver=False)
    port = settings.node.port
    with_certificate = storescu(port, phantom_files[0], options=(
        "+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")))
    assert with_certificate.returncode == 0, with_certificate.stdout + with_certificate.stderr
    anonymous = storescu(port, phantom_files[1], options=("+tla", "+cf", str(pki / "ca.pem")))
    assert anonymous.returncode != 0
    plain = subprocess.run([require_binary(ECHOSCU), "-aet", "STORESCU", "127.0.0.1", str(port)], capture_output=True)
    assert plain.returncode != 0
    assert len(finished_jobs(node.sessions, 1, {JobState.RECEIVED})) == 1


def test_results_return_to_the_calling_ae_at_its_source_port(make_settings, running_node, phantom_files, tmp_path):
    modality_port = free_port()
    received = tmp_path / "modality"
    received.mkdir()
    modality = subprocess.Popen([require_binary(STORESCP), "-aet", "STORESCU", "-od", str(received), str(modality_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        settings = make_settings(sources=[{"ae_title": "STORESCU", "hosts": ["127.0.0.1"], "port": modality_port}],
                                 node={"allowed_calling_aets": ["STORESCU"]}, delivery={"return_to_calling_ae": True})
        node = running_node(settings)
        assert storescu(settings.node.port, phantom_files[0]).returncode == 0
        [job] = wait_for(lambda: finished_jobs(node.sessions, 1, {JobState.SENT, JobState.FAILED_DELIVERY}), 120,
                         message="the results to return")
        assert job.state is JobState.SENT, job.reason
        assert job.calling_host == "127.0.0.1"
        modalities = sorted(dcmread(p, stop_before_pixels=True).Modality for p in received.iterdir())
        assert modalities == (["DOC", "OT", "PR", "SR"] if job.positive else ["DOC", "OT", "SR"])  # GSPS: positives
    finally:
        modality.terminate()
        modality.wait()


@pytest.fixture
def tls_storescp(pki, tmp_path):
    """DCMTK's storescp speaking DICOM TLS with a certificate of our test CA; yields a starter by certificate name."""
    processes = []

    def start(certificate: str) -> int:
        port = free_port()
        folder = tmp_path / certificate
        folder.mkdir()
        processes.append(subprocess.Popen(
            [require_binary(STORESCP), "+tls", str(pki / f"{certificate}.key"), str(pki / f"{certificate}.pem"),
             "+cf", str(pki / "ca.pem"), "-od", str(folder), str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: _listening(port), 30, message="storescp to listen")
        return port

    yield start
    for process in processes:
        process.terminate()
        process.wait()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_outgoing_tls_checks_the_peer_host_name_against_our_ca(make_settings, pki, tls_storescp, phantom_files):
    from node.scu import AssociationFailed, send_files
    from node.tls import client_context

    settings = make_settings(tls={"ca_certificates": str(pki / "ca.pem"), "certificate": str(pki / "client.pem"),
                                  "private_key": str(pki / "client.key")})
    context = client_context(settings.tls)
    named = tls_storescp("loopback")  # subjectAltName IP:127.0.0.1
    [result] = send_files([phantom_files[0]], host="127.0.0.1", port=named, called_aet="STORESCP", tls=context)
    assert result.stored
    unnamed = tls_storescp("server")  # CN=server only: not the host we connect to
    with pytest.raises(AssociationFailed):
        send_files([phantom_files[0]], host="127.0.0.1", port=unnamed, called_aet="STORESCP", tls=context)


def test_outgoing_tls_needs_a_ca_bundle(make_settings):
    from config.settings import SettingsError

    with pytest.raises(SettingsError, match="tls.ca_certificates is required"):
        make_settings(destinations=[{"name": "pacs", "ae_title": "PACS", "host": "pacs.example", "port": 2762,
                                     "tls": True}])


def test_a_settings_file_without_a_node_section_fails_closed(tmp_path):
    from config.settings import SettingsError, load_settings

    config = tmp_path / "node.toml"
    config.write_text("[worker]\ncount = 1\n")
    with pytest.raises(SettingsError, match="node.allowed_calling_aets"):
        load_settings(config)
