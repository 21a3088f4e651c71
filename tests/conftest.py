"""Shared fixtures: settings on free loopback ports, phantom DICOM files, a running node, real peers."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from config.settings import load_settings
from node.orthanc_peer import free_port

os.environ.setdefault("TCP_NODELAY", "1")  # DCMTK tools and Orthanc: no Nagle stall
TEST_OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def require_binary(path: str) -> str:
    if not shutil.which(path):
        pytest.skip(f"{path} is not installed (make test installs it as root)")
    return path


@pytest.fixture
def make_settings(tmp_path):
    """Settings for a node in `tmp_path` on a free port; keyword sections override the defaults."""

    def factory(**sections):
        node = {"data_dir": str(tmp_path / "node"), "port": free_port(),
                "allowed_calling_aets": ["STORESCU", "ECHOSCU", "ORTHANC", "SMARTNODULE_SCU", "FINDSCU"],
                **sections.pop("node", {})}
        worker = {"poll_interval_s": 0.05, **sections.pop("worker", {})}
        delivery = {"backoff_initial_s": 0.2, "backoff_max_s": 2.0, **sections.pop("delivery", {})}
        return load_settings(None, node=node, worker=worker, delivery=delivery,
                             destinations=sections.pop("destinations", []), **sections)

    return factory


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six small phantom studies (512 px), three with a nodule, written once per session."""
    from inference.phantoms import write_phantom_series

    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_series(folder, 6, seed0=9100, size=512)
    return folder


@pytest.fixture(scope="session")
def phantom_files(phantom_dir) -> list[Path]:
    return sorted(phantom_dir.rglob("*.dcm"))


def audit_events(settings) -> list[dict]:
    path = settings.log_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {message}")
