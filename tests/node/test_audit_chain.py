"""The audit log's keyed chain: every line linked with an HMAC whose key lies outside the data folder; edits,
removals, insertions, stripped or recomputed links and a cut-off tail found; several writer processes; records
forwarded to a syslog server over TCP and TLS."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socketserver
import ssl
import subprocess
import sys
import threading

import pytest
import structlog

from config.settings import AuditSettings
from node.audit import (AUDIT_FILE, CHECKPOINT_SUFFIX, AuditKeyError, configure_logging, key_path,
                        load_or_create_key, verify_chain)
from node.cli import main
from tests.conftest import require_binary, wait_for

WRITER = """
import sys
from pathlib import Path
import structlog
from node.audit import configure_logging
configure_logging(Path(sys.argv[1]), console_level="CRITICAL")
log = structlog.get_logger("writer")
for i in range(int(sys.argv[2])):
    log.info("instance_stored", writer=sys.argv[3], n=i)
"""


@pytest.fixture
def log_dir(tmp_path):
    """A data folder's logs; its key is made beside the data folder, as a node does."""
    folder = tmp_path / "data" / "logs"
    yield folder
    configure_logging(None)


def key_of(log_dir) -> bytes:
    data_dir = log_dir.parent
    return load_or_create_key(key_path(AuditSettings(), data_dir), data_dir)


def write_events(log_dir, n: int, **audit) -> list[str]:
    configure_logging(log_dir, console_level="CRITICAL", audit_settings=AuditSettings(**audit))
    log = structlog.get_logger("test")
    for i in range(n):
        log.info("instance_stored", job_id=i, sop_instance_uid=f"1.2.3.{i}", note="multi\nline ü")
    configure_logging(None)  # closes the audit file (and writes its checkpoint)
    return (log_dir / AUDIT_FILE).read_text().splitlines()


def rewrite(log_dir, lines: list[str]) -> None:
    (log_dir / AUDIT_FILE).write_text("".join(line + "\n" for line in lines))


def verify(log_dir, **kwargs):
    return verify_chain(log_dir / AUDIT_FILE, key_of(log_dir), **kwargs)


def cli_verify(log_dir, *extra: str) -> int:
    key = key_path(AuditSettings(), log_dir.parent)
    return main(["audit", "verify", "--file", str(log_dir / AUDIT_FILE), "--key-file", str(key), *extra])


def test_every_line_is_linked_and_the_chain_verifies(log_dir, capsys):
    lines = write_events(log_dir, 5)
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3, 4, 5]
    check = verify(log_dir)
    assert (check.intact, check.records, check.checkpoint) == (True, 5, 5)
    assert cli_verify(log_dir) == 0 and "chain intact, checkpoint at record 5" in capsys.readouterr().out


def test_the_key_is_made_0600_outside_the_data_folder(log_dir, tmp_path):
    write_events(log_dir, 1)
    key_file = tmp_path / "data.audit-key"
    assert key_file.is_file() and key_file.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(key_file, log_dir.parent) == key_of(log_dir)
    with pytest.raises(AuditKeyError, match="inside the data folder"):
        configure_logging(log_dir, audit_settings=AuditSettings(key_file=log_dir.parent / "audit.key"))
    key_file.chmod(0o644)
    with pytest.raises(AuditKeyError, match="may be read by others"):
        configure_logging(log_dir)


def test_a_restarted_node_links_to_the_last_line(log_dir):
    write_events(log_dir, 3)
    lines = write_events(log_dir, 2)
    assert len(lines) == 5
    check = verify(log_dir)
    assert (check.intact, check.records) == (True, 5)


def test_an_edited_line_breaks_the_chain_there(log_dir, capsys):
    lines = write_events(log_dir, 5)
    lines[2] = lines[2].replace('"job_id": 2', '"job_id": 7')
    rewrite(log_dir, lines)
    assert verify(log_dir).broken_at == 3
    assert cli_verify(log_dir) == 1
    assert "broken at line 3" in capsys.readouterr().err


def test_a_removed_or_inserted_line_breaks_the_chain_after_it(log_dir):
    lines = write_events(log_dir, 5)
    rewrite(log_dir, lines[:1] + lines[2:])
    assert verify(log_dir).broken_at == 2
    rewrite(log_dir, lines[:3] + [lines[1]] + lines[3:])
    assert verify(log_dir).broken_at == 4


def _relink(lines: list[str], link) -> list[str]:
    """The lines with records 2 and 3 removed and every link recomputed by `link(previous, signed)`."""
    previous, out = "0" * 64, []
    for seq, line in enumerate(lines[:1] + lines[3:], start=1):
        body = re.sub(r', "seq": \d+, "chain": "[0-9a-f]{64}"}$', "", line)
        signed = f'{body}, "seq": {seq}}}'
        previous = link(previous, signed)
        out.append(f'{signed[:-1]}, "chain": "{previous}"}}')
    return out


def test_links_recomputed_without_the_key_are_found(log_dir, capsys):
    import hmac

    lines = write_events(log_dir, 6)
    rewrite(log_dir, _relink(lines, lambda previous, body: hashlib.sha256((previous + body).encode()).hexdigest()))
    assert verify(log_dir).broken_at == 1
    wrong_key = b"k" * 32
    rewrite(log_dir, _relink(lines, lambda p, body: hmac.new(wrong_key, (p + body).encode(), "sha256").hexdigest()))
    assert verify(log_dir).broken_at == 1
    assert cli_verify(log_dir) == 1 and "made without the key" in capsys.readouterr().err


def test_stripped_links_are_refused_even_with_the_legacy_flag(log_dir, capsys):
    lines = write_events(log_dir, 5)
    rewrite(log_dir, [re.sub(r', "seq": \d+, "chain": "[0-9a-f]{64}"}$', "}", line) for line in lines])
    assert verify(log_dir).broken_at == 1
    assert cli_verify(log_dir) == 1 and "--accept-legacy-prefix" in capsys.readouterr().err
    check = verify(log_dir, accept_legacy_prefix=True)  # the checkpoint still says 5 keyed records
    assert not check.intact and "cut off" in check.problem


def test_a_legacy_prefix_is_accepted_only_when_asked_and_only_at_the_head(log_dir, capsys):
    log_dir.mkdir(parents=True)
    old = ['{"event": "instance_stored", "job_id": 1}',
           '{"event": "instance_stored", "job_id": 2, "chain": "' + "a" * 64 + '"}']
    rewrite(log_dir, old)
    lines = write_events(log_dir, 2)
    assert verify(log_dir).broken_at == 1
    check = verify(log_dir, accept_legacy_prefix=True)
    assert (check.intact, check.records, check.legacy) == (True, 4, 2)
    assert cli_verify(log_dir, "--accept-legacy-prefix") == 0
    assert "2 written before the keyed chain, not verified" in capsys.readouterr().out
    rewrite(log_dir, lines + [old[0]])  # an unkeyed line after the keyed chain began
    assert verify(log_dir, accept_legacy_prefix=True).broken_at == 5
    rewrite(log_dir, [old[0]] + lines[2:])  # the line the keyed chain anchors on was changed
    assert verify(log_dir, accept_legacy_prefix=True).broken_at == 2


def test_a_tail_cut_off_after_a_checkpoint_is_found(log_dir):
    lines = write_events(log_dir, 10, checkpoint_every=4)
    checkpoint = log_dir / (AUDIT_FILE + CHECKPOINT_SUFFIX)
    assert json.loads(checkpoint.read_text())["seq"] == 10
    rewrite(log_dir, lines[:7])
    check = verify(log_dir)
    assert not check.intact and "ends at record 7 but was checkpointed at record 10" in check.problem
    rewrite(log_dir, lines)
    forged = json.loads(checkpoint.read_text())
    checkpoint.write_text(json.dumps({**forged, "seq": 7, "head": json.loads(lines[6])["chain"]}))
    assert "not signed by the key" in verify(log_dir).problem
    checkpoint.unlink()
    assert "is missing" in verify(log_dir).problem


def test_checkpoints_are_written_while_the_node_runs(log_dir):
    configure_logging(log_dir, console_level="CRITICAL", audit_settings=AuditSettings(checkpoint_every=3))
    log = structlog.get_logger("test")
    checkpoint = log_dir / (AUDIT_FILE + CHECKPOINT_SUFFIX)
    seen = []
    for i in range(7):
        log.info("instance_stored", job_id=i)
        seen.append(json.loads(checkpoint.read_text())["seq"])
    assert seen == [1, 1, 3, 3, 3, 6, 6]
    old = checkpoint.stat().st_mtime - AuditSettings().checkpoint_interval_s
    os.utime(checkpoint, (old, old))  # a minute without a checkpoint: the next record writes one
    log.info("instance_stored", job_id=7)
    assert json.loads(checkpoint.read_text())["seq"] == 8


def test_processes_appending_to_one_file_keep_one_chain(log_dir):
    key_of(log_dir)  # made once before the writers start, as the first role of a deployment does
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(log_dir), "200", str(k)]) for k in range(3)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    check = verify(log_dir)
    assert (check.intact, check.records) == (True, 600)


class _Receiver(socketserver.ThreadingTCPServer):
    """A syslog server for the test: reads octet-counted RFC 5424 frames (RFC 6587) into `messages`."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.messages: list[bytes] = []
        self.context = context
        super().__init__(("127.0.0.1", 0), _Frames)


class _Frames(socketserver.StreamRequestHandler):
    def setup(self) -> None:
        if self.server.context is not None:
            self.request = self.server.context.wrap_socket(self.request, server_side=True)
        super().setup()

    def handle(self) -> None:
        while True:
            length = b""
            while (byte := self.rfile.read(1)) not in (b" ", b""):
                length += byte
            if not length:
                return
            self.server.messages.append(self.rfile.read(int(length)))


def _receive(log_dir, receiver: _Receiver, url: str, **audit) -> list[bytes]:
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        lines = write_events(log_dir, 3, syslog=url, **audit)
        wait_for(lambda: len(receiver.messages) >= 3, 30, message="three syslog messages")
    finally:
        receiver.shutdown()
        receiver.server_close()
    assert len(receiver.messages) == len(lines) == 3
    for message, line in zip(receiver.messages, lines):
        header, _, text = message.partition(b" - \xef\xbb\xbf")
        assert re.fullmatch(rb"<110>1 \S+Z \S+ smartnodule \d+ instance_stored", header), header
        assert text.decode() == line  # the chained line itself: the copy verifies like the file
    return receiver.messages


def test_records_are_forwarded_to_syslog_over_tcp(log_dir):
    receiver = _Receiver()
    _receive(log_dir, receiver, f"tcp://127.0.0.1:{receiver.server_address[1]}")


@pytest.mark.integration
def test_records_are_forwarded_to_syslog_over_tls(log_dir, tmp_path):
    openssl = require_binary("/usr/bin/openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=syslog",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", "syslog.key", "-out", "syslog.pem"],
                   cwd=tmp_path, check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "syslog.pem", tmp_path / "syslog.key")
    receiver = _Receiver(context)
    _receive(log_dir, receiver, f"tls://127.0.0.1:{receiver.server_address[1]}",
             syslog_ca_file=tmp_path / "syslog.pem")
