"""The case viewer in a real headless Chromium: window/level on 16-bit data, native-pixel zoom, overlay opacity, keys.

The case's source is replaced by a 2048 x 2048, 12-bit phantom with two burned patches at its centre:
- FINE: columns alternating between two values one pixel apart, visible only at native resolution;
- CLIPPED: 8-pixel stripes 30 levels apart, both above the top of the header's window, so the default
  window (and any 8-bit image made with it, like image.png) shows them as one flat white.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from inference.training.phantoms import generate_phantom, phantom_dataset
from node.store.db import Job
from node.store.review import current_reads
from review_web.server import WebServer
from tests.conftest import TEST_OUTPUT
from tests.review_web.conftest import log_in, with_card

pytestmark = pytest.mark.integration

SHOTS = TEST_OUTPUT / "review-viewer"
SIZE = 2048
FINE = (slice(1000, 1048), slice(900, 1000))  # rows, cols
CLIPPED = (slice(1000, 1048), slice(1100, 1200))
FINE_VALUES = (1000, 3000)
CLIPPED_VALUES = (4040, 4070)  # above the header window's top (< 4030 for this seed, checked below)


@pytest.fixture
def case(node, tmp_path) -> int:
    """The first review case, its source swapped for the burned 2048 x 2048 phantom; returns its job id."""
    phantom = generate_phantom(7400, SIZE, nodule=False, bits_stored=12)
    pixels = phantom.pixels
    cols = np.arange(FINE[1].start, FINE[1].stop)
    pixels[FINE] = np.where(cols % 2 == 0, FINE_VALUES[0], FINE_VALUES[1]).astype(np.uint16)
    cols = np.arange(CLIPPED[1].start, CLIPPED[1].stop)
    pixels[CLIPPED] = np.where((cols // 8) % 2 == 0, CLIPPED_VALUES[0], CLIPPED_VALUES[1]).astype(np.uint16)
    ds = phantom_dataset(phantom, accession="ACC-VIEW-1")
    assert float(ds.WindowCenter) + float(ds.WindowWidth) / 2 < CLIPPED_VALUES[0]  # the patch is clipped
    path = tmp_path / "burned.dcm"
    ds.save_as(path, enforce_file_format=True)
    job_id = node.job_ids[0]
    with node.sessions.begin() as session:
        job = session.get(Job, job_id)
        job.spool_path = str(path)
        job.location_row, job.location_col, job.location_radius = 1100.0, 700.0, 60.0
    return job_id


def canvas(page) -> np.ndarray:
    """The viewer canvas as the browser paints it, grey levels (rows, cols)."""
    return np.asarray(Image.open(io.BytesIO(page.locator("#view").screenshot())).convert("L"), dtype=np.float32)


def at_native(shot: np.ndarray, rows: slice, cols: slice, margin: int = 4) -> np.ndarray:
    """The screen pixels of image region (rows, cols) at 1:1 zoom centred on the image centre, less a margin."""
    top, left = shot.shape[0] // 2 - SIZE // 2, shot.shape[1] // 2 - SIZE // 2
    return shot[top + rows.start + margin:top + rows.stop - margin, left + cols.start + margin:left + cols.stop - margin]


def halved(region: tuple[slice, slice], margin: int = 2) -> tuple[slice, ...]:
    """`region` in the half-size image, less a margin."""
    return tuple(slice(part.start // 2 + margin, part.stop // 2 - margin) for part in region)


def open_case(page, server, job_id) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    log_in(page, server, "reviewer")
    page.wait_for_url(f"{server}/queue")
    page.goto(f"{server}/cases/{job_id}")
    page.wait_for_selector("#stage[data-ready='1']")


def test_window_level_zoom_overlay_and_keys_on_16_bit_data(browser_page, server, node, case):
    page = browser_page
    open_case(page, server, case)
    assert "2048 × 2048, 12-bit" in page.inner_text("#viewer-status")
    assert page.evaluate("document.getElementById('view').width") == page.locator("#view").bounding_box()["width"]
    page.screenshot(path=SHOTS / "01-case-fit.png")

    # Overlay: opacity 0 and 100 % paint different pixels; the toggle (key O) hides it.
    page.fill("#overlay-opacity", "0")
    without = canvas(page)
    page.fill("#overlay-opacity", "100")
    with_overlay = canvas(page)
    changed = np.abs(with_overlay - without) > 8  # the explanation's contour lines and the finding's circle
    assert changed.mean() > 0.002, changed.mean()
    page.keyboard.press("o")
    assert not page.is_checked("#overlay-on")
    assert np.abs(canvas(page) - without).max() == 0
    page.keyboard.press("o")
    page.screenshot(path=SHOTS / "02-overlay-full-opacity.png")
    page.fill("#overlay-opacity", "0")

    # 1:1: one source pixel per screen pixel, the alternating columns as they are.
    page.click("#native")
    assert "zoom 100 %" in page.inner_text("#viewer-status")
    native = canvas(page)
    page.screenshot(path=SHOTS / "03-native-1to1-default-window.png")
    fine = at_native(native, *FINE)
    next_column = np.abs(np.diff(fine, axis=1)).mean()
    two_columns = np.abs(fine[:, 2:] - fine[:, :-2]).mean()
    assert next_column > 80 and two_columns < 3, (next_column, two_columns)

    # Default window: the stripes above the window's top are one flat white.
    clipped = at_native(native, *CLIPPED)
    assert clipped.min() >= 250 and clipped.std() < 1, (clipped.min(), clipped.std())
    # The 8-bit, 1024-pixel PNG the page used to show (windowed with CSS) has lost both patches: the columns are
    # averaged to one grey, the stripes clipped to one white; no brightness or contrast filter brings them back.
    png = page.request.get(f"{server}/cases/{case}/image.png")
    old = cv2.imdecode(np.frombuffer(png.body(), np.uint8), cv2.IMREAD_GRAYSCALE).astype(np.float32)
    assert old.shape == (SIZE // 2, SIZE // 2)
    assert old[halved(FINE)].std() < 1 and old[halved(CLIPPED)].std() < 1, (old[halved(FINE)].std(), old[halved(CLIPPED)].std())

    # A narrow window on the clipped values shows the stripes: structure only the 16-bit data holds.
    page.fill("#wl-centre", "4055")
    page.fill("#wl-width", "60")
    page.dispatch_event("#wl-width", "change")
    narrow = canvas(page)
    page.screenshot(path=SHOTS / "04-native-1to1-narrow-window-16bit.png")
    stripes = at_native(narrow, *CLIPPED, margin=0)[4:-4, 4:-4]
    profile = stripes.mean(axis=0)
    assert profile.max() - profile.min() > 100 and stripes.std() > 40, (profile.min(), profile.max())
    columns = np.arange(CLIPPED[1].start + 4, CLIPPED[1].stop - 4)
    match = max(np.corrcoef(profile, ((columns + shift) // 8) % 2)[0, 1] for shift in (-1, 0, 1))  # centre rounding
    assert match > 0.95, match

    # Drag = window/level; R resets to the header's window.
    box = page.locator("#view").bounding_box()
    page.mouse.move(box["x"] + 200, box["y"] + 200)
    page.mouse.down()
    page.mouse.move(box["x"] + 400, box["y"] + 150, steps=5)
    page.mouse.up()
    assert float(page.input_value("#wl-width")) > 160 and float(page.input_value("#wl-centre")) > 4055  # right, up
    assert np.abs(canvas(page) - narrow).max() > 30
    page.keyboard.press("r")
    assert float(page.input_value("#wl-centre")) == pytest.approx(float(page.evaluate(
        "fetch(location.pathname + '/pixels.json').then(r => r.json()).then(m => m.dicom_window[0])")))
    assert np.abs(canvas(page) - native).max() == 0

    page.click("[data-preset=lung]")
    page.screenshot(path=SHOTS / "05-native-1to1-lung-preset.png")
    page.keyboard.press("r")

    # Wheel zooms in about the cursor; F fits again.
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -300)
    assert "zoom 115 %" in page.inner_text("#viewer-status")
    page.keyboard.press("f")
    assert np.abs(canvas(page) - without).max() == 0

    # N records "nodule present" and goes back to the queue.
    page.keyboard.press("n")
    page.wait_for_url(f"{server}/queue")
    with node.sessions() as session:
        reads = current_reads(session, [case])[case]
    assert [(read.reviewer, read.nodule_present) for read in reads] == [("reviewer", True)]


def test_monochrome1_shows_as_its_monochrome2_twin(browser_page, server, node, tmp_path):
    """The same phantom stored MONOCHROME1 (inverted values, matching window) looks the same on screen."""
    page = browser_page
    phantom = generate_phantom(7401, 1024, nodule=False, bits_stored=12)
    shots = []
    for monochrome1 in (False, True):
        path = tmp_path / f"mono{int(monochrome1) + 1}.dcm"
        phantom_dataset(phantom, monochrome1=monochrome1).save_as(path, enforce_file_format=True)
        with node.sessions.begin() as session:
            session.get(Job, node.job_ids[1]).spool_path = str(path)
        if not shots:
            open_case(page, server, node.job_ids[1])
        else:
            page.goto(f"{server}/cases/{node.job_ids[1]}")
            page.wait_for_selector("#stage[data-ready='1']")
        assert page.is_checked("#invert") is monochrome1
        page.fill("#overlay-opacity", "0")
        shots.append(canvas(page))
    page.screenshot(path=SHOTS / "06-monochrome1.png")
    assert np.abs(shots[0] - shots[1]).mean() < 1.5
    assert shots[1].std() > 20


def test_the_queue_reads_most_urgent_first_and_sorts_by_column(browser_page, queue_node, tmp_path):
    page, node = browser_page, queue_node
    oldest, ood, uncertain_positive = node.job_ids[:3]
    web = WebServer(with_card(node.settings, tmp_path), node.sessions, node.index)
    web.start()
    try:
        base = f"http://{node.settings.web.host}:{node.settings.web.port}"
        SHOTS.mkdir(parents=True, exist_ok=True)
        log_in(page, base, "reviewer")
        page.wait_for_url(f"{base}/queue")
        assert job_order(page) == [uncertain_positive, ood, oldest]
        assert page.inner_text(f"tr[data-job='{uncertain_positive}'] .probability") == "0.62 (≥ 0.50)"
        assert page.inner_text(f"tr[data-job='{oldest}'] .accession") == "A007300"
        page.screenshot(path=SHOTS / "07-queue-by-priority.png")
        page.click("th >> text=Age")
        assert job_order(page) == [uncertain_positive, ood, oldest]  # youngest first
        page.click("th >> text=Age")
        assert job_order(page) == [oldest, ood, uncertain_positive]
        assert page.get_attribute("th.sorted a", "aria-sort") == "descending"
        page.screenshot(path=SHOTS / "08-queue-oldest-first.png")
    finally:
        web.stop()


def job_order(page) -> list[int]:
    return [int(job) for job in page.eval_on_selector_all("#queue tbody tr", "rows => rows.map(r => r.dataset.job)")]
