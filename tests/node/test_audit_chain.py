"""The audit log's hash chain: every line linked, edits, removals and insertions found, several writer processes."""
from __future__ import annotations

import json
import subprocess
import sys

import structlog

from node.audit import AUDIT_FILE, configure_logging, verify_chain
from node.cli import main

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


def write_events(log_dir, n: int) -> list[str]:
    configure_logging(log_dir, console_level="CRITICAL")
    log = structlog.get_logger("test")
    for i in range(n):
        log.info("instance_stored", job_id=i, sop_instance_uid=f"1.2.3.{i}", note="multi\nline ü")
    configure_logging(None)  # closes the audit file
    return (log_dir / AUDIT_FILE).read_text().splitlines()


def test_every_line_is_linked_and_the_chain_verifies(tmp_path):
    lines = write_events(tmp_path, 5)
    assert len(lines) == 5
    assert all(json.loads(line)["chain"] for line in lines)
    assert verify_chain(tmp_path / AUDIT_FILE).intact
    assert main(["audit", "verify", "--file", str(tmp_path / AUDIT_FILE)]) == 0


def test_a_restarted_node_links_to_the_last_line(tmp_path):
    write_events(tmp_path, 3)
    lines = write_events(tmp_path, 2)
    assert len(lines) == 5
    check = verify_chain(tmp_path / AUDIT_FILE)
    assert (check.intact, check.records) == (True, 5)


def test_an_edited_line_breaks_the_chain_there(tmp_path, capsys):
    lines = write_events(tmp_path, 5)
    lines[2] = lines[2].replace('"job_id": 2', '"job_id": 7')
    (tmp_path / AUDIT_FILE).write_text("\n".join(lines) + "\n")
    assert verify_chain(tmp_path / AUDIT_FILE).broken_at == 3
    assert main(["audit", "verify", "--file", str(tmp_path / AUDIT_FILE)]) == 1
    assert "broken at line 3" in capsys.readouterr().err


def test_a_removed_or_inserted_line_breaks_the_chain_after_it(tmp_path):
    lines = write_events(tmp_path, 5)
    path = tmp_path / AUDIT_FILE
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    assert verify_chain(path).broken_at == 2
    path.write_text("\n".join(lines[:3] + [lines[1]] + lines[3:]) + "\n")
    assert verify_chain(path).broken_at == 4


def test_processes_appending_to_one_file_keep_one_chain(tmp_path):
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "200", str(k)]) for k in range(3)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0]
    check = verify_chain(tmp_path / AUDIT_FILE)
    assert (check.intact, check.records) == (True, 600)


def test_a_log_begun_before_the_chain_is_anchored_by_its_last_line(tmp_path):
    path = tmp_path / AUDIT_FILE
    path.write_text('{"event": "instance_stored", "job_id": 1}\n{"event": "instance_stored", "job_id": 2}\n')
    write_events(tmp_path, 2)
    check = verify_chain(path)
    assert (check.intact, check.records, check.unchained) == (True, 4, 2)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0]] + lines[2:]) + "\n")  # an unchained line removed
    assert verify_chain(path).broken_at == 2
    path.write_text("\n".join(lines + [lines[0]]) + "\n")  # an unlinked line after the chain began
    assert verify_chain(path).broken_at == 5
