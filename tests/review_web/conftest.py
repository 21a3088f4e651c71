"""Review web fixtures: a node database with processed phantom cases (real result files), users, an app."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest

from config.settings import load_settings
from inference.training.phantoms import write_phantom_series
from inference.preprocess import prepare
from inference.types import Location, ModelIdentity, Prediction
from node.store.db import Delivery, DeliveryState, Job, JobState, open_database, utcnow
from node.orthanc_peer import free_port
from node.cases import rebuild_index
from retrieval.index import CaseIndex
from node.store.review import Role
from review_web.security import create_user
from review_web.server import WebServer
from sr_writer.encode import encode_results
from sr_writer.heatmap import EXPLANATION_FILE, explanation_png

PASSWORD = "correct horse battery staple"
SECRET = "s" * 48
MODEL = ModelIdentity("nodulenet", "1.2.0", "ab" * 32)
# (seed offset, probability, review required, state); the first three wait for review.
CASES = [(0, 0.55, True, JobState.SENT), (1, 0.48, True, JobState.SENT), (2, 0.62, True, JobState.SENT),
         (3, 0.05, False, JobState.SENT), (4, 0.91, False, JobState.FAILED_DELIVERY)]


@dataclass(frozen=True)
class CaseFiles:
    spool_path: Path
    results_dir: Path
    location: Location
    embedding: np.ndarray


@pytest.fixture(scope="session")
def case_files(tmp_path_factory) -> list[CaseFiles]:
    """Phantom sources and their SR/heatmap/PDF results, made once: the slow part."""
    root = tmp_path_factory.mktemp("review_cases")
    paths = write_phantom_series(root / "spool", len(CASES), seed0=7300, size=512)
    rng = np.random.default_rng(3)
    base = rng.standard_normal(32).astype(np.float32)
    made = []
    for (offset, probability, review, _), path in zip(CASES, paths):
        ds = pydicom.dcmread(path)
        image = prepare(ds)
        location = Location(row=180.0 + 20 * offset, col=150.0 + 40 * offset, radius=18.0)
        rows, cols = np.mgrid[0:ds.Rows, 0:ds.Columns]
        heatmap = np.exp(-((rows - location.row) ** 2 + (cols - location.col) ** 2) / (2 * 30.0 ** 2))
        embedding = base + 0.3 * rng.standard_normal(32).astype(np.float32)
        embedding /= np.linalg.norm(embedding)
        prediction = Prediction(probability=probability, uncertainty=0.12, positive=probability >= 0.5,
                                review=review, location=location if probability >= 0.5 else None,
                                heatmap=heatmap.astype(np.float32), embedding=embedding, model=MODEL)
        results = root / "results" / ds.SOPInstanceUID
        results.mkdir(parents=True)
        for name, dataset in zip(("sr", "heatmap", "pdf"), encode_results(ds, image, prediction, review=review).all()):
            dataset.save_as(results / f"{name}.dcm", enforce_file_format=True)
        (results / EXPLANATION_FILE).write_bytes(explanation_png(prediction.heatmap))  # as the worker keeps it
        made.append(CaseFiles(path, results, location, embedding))
    return made


@dataclass
class Node:
    settings: object
    sessions: object
    index: CaseIndex
    job_ids: list[int]
    tokens: dict[str, str]


@pytest.fixture
def node(tmp_path, case_files) -> Node:
    """A fresh database with the five cases, one user per role and a filled case index."""
    settings = load_settings(None, node={"data_dir": str(tmp_path / "node"), "port": free_port()},
                             web={"enabled": True, "port": free_port(), "secret_key": SECRET,
                                  "login_max_attempts": 3},
                             destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}])
    settings.node.data_dir.mkdir(parents=True)
    sessions = open_database(settings.database_url)
    now = utcnow()
    job_ids = []
    with sessions.begin() as session:
        for i, ((offset, probability, review, state), files) in enumerate(zip(CASES, case_files)):
            ds = pydicom.dcmread(files.spool_path, stop_before_pixels=True)
            positive = probability >= 0.5
            job = Job(sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                      study_instance_uid=ds.StudyInstanceUID, series_instance_uid=ds.SeriesInstanceUID,
                      transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, calling_aet="ORTHANC" if i % 2 else "DX_ROOM1",
                      spool_path=str(files.spool_path), size_bytes=files.spool_path.stat().st_size, modality="DX",
                      state=state, attempts=1, delivery_attempts=1,
                      received_at=now - timedelta(minutes=50 - i), encoded_at=now - timedelta(minutes=49 - i),
                      finished_at=now - timedelta(minutes=48 - i),
                      model_name=MODEL.name, model_version=MODEL.version, model_sha256=MODEL.weights_sha256,
                      probability=probability, uncertainty=0.12, positive=positive, review_required=review,
                      location_row=files.location.row if positive else None,
                      location_col=files.location.col if positive else None,
                      location_radius=files.location.radius if positive else None,
                      embedding=files.embedding.tobytes(), results_dir=str(files.results_dir))
            failed = state is JobState.FAILED_DELIVERY
            job.deliveries.append(Delivery(destination="pacs", attempts=6 if failed else 1,
                                           state=DeliveryState.FAILED if failed else DeliveryState.SENT,
                                           last_error="association rejected" if failed else None))
            session.add(job)
            session.flush()
            job_ids.append(job.id)
        session.add(Job(sop_instance_uid="1.2.3.99", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                        study_instance_uid="1.2.3.99.1", series_instance_uid="1.2.3.99.2",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", calling_aet="DX_ROOM1", spool_path="/nonexistent",
                        size_bytes=1, state=JobState.SKIPPED, reason="lateral_view: ViewPosition LL"))
        tokens = {role.value: create_user(session, role.value, role, PASSWORD) for role in Role}
        tokens["reviewer2"] = create_user(session, "reviewer2", Role.REVIEWER, PASSWORD)
    index = CaseIndex.from_settings(settings)
    rebuild_index(sessions, index)
    return Node(settings, sessions, index, job_ids, tokens)


@pytest.fixture
def queue_node(node):
    """The three review cases made an uncertain positive (newest), an out-of-distribution one and another (oldest)."""
    now = utcnow()
    with node.sessions.begin() as session:
        for job_id, reasons, age_min in zip(node.job_ids[:3], ("ap_view", "out_of_distribution", "near_threshold"),
                                            (300, 90, 5)):
            job = session.get(Job, job_id)
            job.review_reasons, job.received_at = reasons, now - timedelta(minutes=age_min)
    return node


def with_card(settings, folder: Path):
    """`settings` with a model card for the fixture's model (nodulenet 1.2.0), operating threshold 0.50."""
    card = json.loads((Path(__file__).parents[2] / "inference" / "models" / "card.json").read_text())
    card.update(name=MODEL.name, version=MODEL.version, threshold=0.5)
    path = folder / "card.json"
    path.write_text(json.dumps(card))
    return settings.model_copy(update={"model": settings.model.model_copy(update={"card": path})})


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser_page():
    """A page of a real headless Chromium (Playwright), 1360 x 960, device pixel ratio 1."""
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 960}, device_scale_factor=1)
        page.set_default_timeout(15000)
        yield page
        browser.close()


@pytest.fixture
def server(node):
    """The app served by WebServer on the node fixture's web port; yields its base URL."""
    web = WebServer(node.settings, node.sessions, node.index)
    web.start()
    yield f"http://{node.settings.web.host}:{node.settings.web.port}"
    web.stop()


def log_in(page, base: str, username: str) -> None:
    page.goto(f"{base}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
