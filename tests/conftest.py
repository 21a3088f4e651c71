"""Shared fixtures: settings on free loopback ports, phantom DICOM files, a running node, real peers."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from config.settings import load_settings
from node.store.db import TERMINAL, Job, JobState
from node.orthanc_peer import free_port

os.environ.setdefault("TCP_NODELAY", "1")  # DCMTK tools and Orthanc: no Nagle stall
TEST_OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


# Fixtures that start or reach a real peer (a node with its DICOM listener, PostgreSQL, Orthanc, Chromium). A test
# that needs one, directly or through another fixture, must carry the integration mark.
PEER_FIXTURES = frozenset({"running_node", "postgres_server", "postgres_url", "orthanc", "pacs", "tls_storescp",
                           "browser_page"})


def _peer_refused(what: str):
    def refuse(*_args, **_kwargs):
        pytest.fail(f"this test {what}: mark it @pytest.mark.integration (or module-level pytestmark)", pytrace=False)
    return refuse


@pytest.fixture(autouse=True)
def _peers_only_in_integration_tests(request, monkeypatch):
    """`pytest -m "not integration"` is the fast, peer-free subset: a test without the mark fails when it needs a
    peer fixture, opens a DICOM association or listener (pynetdicom), or starts Orthanc."""
    if request.node.get_closest_marker("integration") is not None:
        return
    used = sorted(PEER_FIXTURES.intersection(request.fixturenames))
    if used:
        _peer_refused(f"uses the peer fixture(s) {', '.join(used)}")()
    from pynetdicom import AE

    from node.orthanc_peer import OrthancPeer

    monkeypatch.setattr(AE, "associate", _peer_refused("opens a DICOM association"))
    monkeypatch.setattr(AE, "start_server", _peer_refused("starts a DICOM listener"))
    monkeypatch.setattr(OrthancPeer, "start", _peer_refused("starts Orthanc"))


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
        metrics = {"enabled": False, **sections.pop("metrics", {})}  # tests that scrape choose a free port
        return load_settings(None, node=node, worker=worker, delivery=delivery, metrics=metrics,
                             destinations=sections.pop("destinations", []), **sections)

    return factory


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six small phantom studies (512 px), three with a nodule, written once per session."""
    from inference.training.phantoms import write_phantom_series

    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_series(folder, 6, seed0=9100, size=512)
    return folder


@pytest.fixture(scope="session")
def phantom_files(phantom_dir) -> list[Path]:
    return sorted(phantom_dir.rglob("*.dcm"))


FINISHED = TERMINAL | {JobState.ENCODED}  # tests without a destination stop at ENCODED


def all_jobs(sessions) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def finished_jobs(sessions, count: int, states=FINISHED) -> list[Job] | None:
    """All jobs, once there are `count` and every one is in `states`; else None."""
    jobs = all_jobs(sessions)
    return jobs if len(jobs) >= count and all(j.state in states for j in jobs) else None


@pytest.fixture
def running_node():
    """Start in-process nodes (model loaded, workers running); all are stopped after the test."""
    from node.audit import configure_logging
    from node.service import Node

    nodes = []

    def start(settings, **kwargs):
        configure_logging(settings.log_dir)
        node = Node(settings, **kwargs)
        node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def audit_events(settings) -> list[dict]:
    path = settings.log_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def poll(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    """Call `predicate` until it returns a truthy value (returned); TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1, message: str = "condition"):
    """`poll` inside a test: a time-out fails the test."""
    try:
        return poll(predicate, timeout_s, message, interval_s)
    except TimeoutError as exc:
        pytest.fail(str(exc))


POSTGRES_ADMIN_URL = os.environ.get("SMARTNODULE_TEST_POSTGRES_URL",
                                    "postgresql+psycopg://postgres:postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of the PostgreSQL that `make test` ensures on 127.0.0.1:5432."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    engine = create_engine(POSTGRES_ADMIN_URL)
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
    except OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL.split('@')[-1]} (make test starts one): {exc.orig}")
    finally:
        engine.dispose()
    return POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_url(request, postgres_server):
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import uuid

    if request.node.get_closest_marker("integration") is None:  # reached through getfixturevalue: not in fixturenames
        _peer_refused("uses PostgreSQL")()

    from sqlalchemy import create_engine, text

    name = f"smartnodule_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield postgres_server.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
