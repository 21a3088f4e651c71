"""The viewer's pixel routes and the review queue's columns, priority and sorting, through FastAPI's TestClient."""
from __future__ import annotations

import json
import re

import numpy as np
import pydicom
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from inference.ood import REASON
from inference.training.phantoms import generate_phantom, phantom_dataset
from inference.types import REVIEW_REASON_CODES
from node.store.db import Job
from review_web import images, queue
from review_web.app import create_app
from tests.review_web.conftest import PASSWORD, csrf_of, with_card


def logged_in(settings, node, username: str = "reviewer") -> TestClient:
    client = TestClient(create_app(settings, node.sessions, node.index), base_url="http://127.0.0.1")
    csrf = csrf_of(client.get("/login").text)
    assert client.post("/login", data={"username": username, "password": PASSWORD, "csrf_token": csrf},
                       follow_redirects=False).status_code == 303
    return client


def test_pixels_are_the_modality_values_at_full_resolution_behind_the_login(node, case_files):
    job_id = node.job_ids[0]
    anonymous = TestClient(create_app(node.settings, node.sessions, node.index), base_url="http://127.0.0.1")
    for path in ("pixels.json", "pixels.raw"):
        response = anonymous.get(f"/cases/{job_id}/{path}", follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login"
    client = logged_in(node.settings, node)
    meta = client.get(f"/cases/{job_id}/pixels.json").json()
    with capture_logs() as events:
        raw = client.get(f"/cases/{job_id}/pixels.raw")
    ds = pydicom.dcmread(case_files[0].spool_path)
    assert (meta["rows"], meta["cols"], meta["reduction"], meta["bits_stored"]) == (512, 512, 1, 12)
    assert raw.headers["content-type"] == "application/octet-stream" and raw.headers["cache-control"] == "no-store"
    values = np.frombuffer(raw.content, "<u2").reshape(512, 512) * meta["slope"] + meta["offset"]
    assert np.array_equal(values, ds.pixel_array)  # rescale 1/0: the stored values, all 12 bits
    assert meta["dicom_window"] == [float(ds.WindowCenter), float(ds.WindowWidth)] and meta["invert"] is False
    audit = [e for e in events if e["event"] == "patient_data_viewed"]
    assert [(e["what"], e["job_id"], e["username"]) for e in audit] == [("pixels", job_id, "reviewer")]
    assert "PHANTOM" not in json.dumps(meta) + repr(events)


def test_monochrome1_rescale_and_reduction(tmp_path):
    ds = phantom_dataset(generate_phantom(7402, 512, nodule=False, bits_stored=12), monochrome1=True)
    ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
    pixels = images.viewer_pixels(ds, max_pixels=512 * 512)
    expected = ds.pixel_array * 0.5 - 1024
    values = np.frombuffer(pixels.data, "<u2").reshape(512, 512) * pixels.slope + pixels.offset
    assert pixels.invert and pixels.reduction == 1
    assert np.abs(values - expected).max() <= pixels.slope / 2 + 1e-6 < 0.25  # half-steps of the rescale kept
    # Presets follow the displayed brightness: MONOCHROME1 stores the dark lungs as high values.
    assert pixels.presets["lung"][0] > pixels.presets["bone"][0]
    assert pixels.dicom_window == (float(ds.WindowCenter), float(ds.WindowWidth))

    reduced = images.viewer_pixels(ds, max_pixels=300 * 300)  # 512 x 512 is over: halved
    assert (reduced.reduction, reduced.rows, reduced.cols, reduced.source_rows) == (2, 256, 256, 512)
    assert len(reduced.data) == 256 * 256 * 2


def test_the_pixel_cache_keeps_the_last_images_only(node):
    cache = images.PixelCache(size=1, max_pixels=4096 * 4096)
    with node.sessions() as session:
        first, second = session.get(Job, node.job_ids[0]), session.get(Job, node.job_ids[1])
    kept = cache.get(first)
    assert cache.get(first) is kept
    cache.get(second)
    assert cache.get(first) is not kept and cache.get(first).data == kept.data


def test_priority_puts_uncertain_positives_first_then_out_of_distribution():
    assert REASON == queue.OOD_REASON and queue.UNCERTAIN_REASONS <= set(REVIEW_REASON_CODES)
    cases = [Job(positive=False, review_reasons="near_threshold"), Job(positive=True, review_reasons="ap_view"),
             Job(positive=False, review_reasons="ap_view,out_of_distribution"),
             Job(positive=True, review_reasons="out_of_distribution,uncertain")]
    assert [queue.priority(job) for job in cases] == [2, 2, 1, 0]


def rows_of(html: str) -> list[int]:
    return [int(job) for job in re.findall(r'<tr data-job="(\d+)">', html)]


def test_queue_shows_accession_age_priority_and_sorts(queue_node):
    node, (oldest, ood, uncertain_positive) = queue_node, queue_node.job_ids[:3]
    client = logged_in(node.settings, node)
    page = client.get("/queue").text
    assert rows_of(page) == [uncertain_positive, ood, oldest]  # by priority, not by age
    assert "A007300" in page and "A007302" in page  # accession numbers of the phantoms' headers
    assert "5 min" in page and "90 min" in page and "5.0 h" in page
    assert "uncertain positive" in page and "out of distribution" in page
    assert "threshold unknown" in page  # the default card is another model than the fixture's nodulenet 1.2.0
    assert rows_of(client.get("/queue?sort=age&order=desc").text) == [oldest, ood, uncertain_positive]
    assert rows_of(client.get("/queue?sort=probability").text) == [ood, oldest, uncertain_positive]
    assert rows_of(client.get("/queue?sort=accession&order=desc").text) == [uncertain_positive, ood, oldest]
    assert client.get("/queue?sort=patient").status_code == 422


def test_the_operating_threshold_stands_beside_the_probability(queue_node, tmp_path):
    node = queue_node
    client = logged_in(with_card(node.settings, tmp_path), node)
    page = client.get("/queue").text
    assert re.search(r"0\.62\s*<span class=\"threshold\">\(≥ 0\.50\)", page)
    assert re.search(r"0\.48\s*<span class=\"threshold\">\(&lt; 0\.50\)", page)
    case = client.get(f"/cases/{node.job_ids[2]}").text
    assert "0.62 (nodule; threshold 0.50)" in case and "uncertain positive" in case
