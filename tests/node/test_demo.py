"""`smartnodule demo --keep-running` (what `make demo ARGS=--keep-running` runs): phantoms through the node and a
local Orthanc, progress bars, the review page with a demo reviewer whose login works, and Ctrl-C stops everything.

The command runs as a user runs it, in a fresh interpreter in an empty folder; the address and the login are read
from what it prints.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration  # Orthanc, where installed; a real association to the node either way

ROOT = Path(__file__).resolve().parents[2]
REVIEW = re.compile(r"^Review page on (http://127\.0\.0\.1:(\d+)/) \(login: (\S+), password: (\S+)\)$")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _read_until(stream, last: str) -> list[str]:
    lines = []
    for line in stream:
        lines.append(line.rstrip("\n"))
        if line.startswith(last):
            return lines
    raise AssertionError("the demo ended early:\n" + "\n".join(lines))


def test_the_demo_serves_the_review_page_with_a_working_login_and_stops_on_ctrl_c(tmp_path):
    environment = {k: v for k, v in os.environ.items() if not k.upper().startswith("SMARTNODULE_")}
    demo = subprocess.Popen([sys.executable, "-m", "node.cli", "demo", "--count", "2", "--size", "512", "--keep-running"],
                            cwd=tmp_path, env={**environment, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        printed = _read_until(demo.stdout, "Node, Orthanc and review page keep running")
        address, port, username, password = next(REVIEW.match(line).groups() for line in printed if REVIEW.match(line))
        waiting = next(line for line in printed if " wait for review: " in line)
        assert waiting.endswith(f"{address} (login: {username}, password: {password})")
        table = printed[printed.index(next(line for line in printed if line.startswith("accession"))):]
        assert sum(1 for line in table if re.match(r"^A0\d{5} ", line)) == 2

        browser = requests.Session()
        form = browser.get(address + "login", timeout=30).text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
        queue = browser.post(address + "login", data={"username": username, "password": password, "csrf_token": csrf},
                             timeout=60)
        assert queue.status_code == 200 and queue.url == address + "queue"
        reviews = int(waiting.split()[0])
        assert len(re.findall(r'href="/cases/\d+"', queue.text)) >= reviews
        wrong = requests.Session()
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', wrong.get(address + "login", timeout=30).text).group(1)
        assert wrong.post(address + "login", data={"username": username, "password": "not the password",
                                                   "csrf_token": csrf}, timeout=60).status_code == 401

        demo.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, err
    assert out.splitlines()[-1] == "Demo stopped." and "Traceback" not in err
    assert re.search(r"phantoms made: 100%\|.*\| 2/2", err)  # the progress bars, on standard error
    assert re.search(r"processed( and delivered)?: 100%\|.*\| 2/2", err)
    assert not _listening(int(port))
