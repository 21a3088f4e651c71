"""The heatmap secondary capture as a radiologist sees it: nodule visible, colour bar, legend, side markers.

Each test reads the SC back with pydicom (the pixels a PACS shows) and writes a PNG
under test-output/sr_writer/ for a look.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from sr_writer.encode import encode_results
from sr_writer.heatmap import (CONTOUR_LEVELS, EXPLANATION_MAX_SIDE, MIN_RING_RADIUS, explanation_layer,
                               explanation_png, level_colour, read_explanation_png, side_markers)
from tests.sr_writer.test_sr_writer_encode import OUTPUT, make_inputs, make_source

NODULE_GREY = 230
SIZE = 512  # the SC's smallest long side: drawn at the source's own scale


def _with_nodule(image, location):
    """The display image with a bright disc (the nodule) at `location`."""
    display = image.display.copy()
    cv2.circle(display, (round(location.col), round(location.row)), round(location.radius), NODULE_GREY, -1)
    return dataclasses.replace(image, display=display)


def _sc_pixels(tmp_path: Path, orientation, name: str, *, positive: bool = True) -> tuple:
    """(SC pixels read back, display image) for a SIZE px source with PatientOrientation `orientation`."""
    source = make_source(SIZE)
    if orientation is None:
        del source.PatientOrientation
    else:
        source.PatientOrientation = orientation
    image, prediction = make_inputs(source, positive=positive)
    image = _with_nodule(image, prediction.location)
    prediction = dataclasses.replace(prediction, threshold=0.61)
    sc = encode_results(source, image, prediction, review=False).heatmap
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    pixels = pydicom.dcmread(tmp_path / "sc.dcm").pixel_array
    OUTPUT.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(OUTPUT / f"{name}.png"), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    return pixels, image.display, prediction.location


def test_nodule_stays_visible_under_the_contours(tmp_path):
    pixels, display, location = _sc_pixels(tmp_path, ["L", "F"], "heatmap-nodule-visible")
    assert pixels.shape[1] == SIZE
    overlay = pixels[:SIZE]
    row, col, radius = round(location.row), round(location.col), round(location.radius)
    # Inside the finding's circle the SC shows the source's own grey levels, untinted.
    yy, xx = np.mgrid[:SIZE, :SIZE]
    inside = (yy - row) ** 2 + (xx - col) ** 2 <= (radius - 3) ** 2
    assert np.array_equal(overlay[inside], np.repeat(display[inside][:, None], 3, axis=1))
    assert list(overlay[row, col]) == [NODULE_GREY] * 3
    # ... while the explanation is there around it: pixels in the colours of the levels outside the circle
    # (this map's 0.9 contour lies inside the circle, so it is not drawn).
    for level in CONTOUR_LEVELS[:2]:
        assert np.any(np.all(np.abs(overlay.astype(int) - level_colour(level)) <= 30, axis=2)), level


def test_a_small_hot_spot_is_ringed_not_covered():
    """A Grad-CAM peak a few pixels wide (as the detection map gives) becomes a ring around the spot."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    heat = np.exp(-((yy - 300) ** 2 + (xx - 120) ** 2) / (2 * 2.0 ** 2)).astype(np.float32)
    layer = explanation_layer(heat, None, source_shape=(SIZE, SIZE), size=(SIZE, SIZE))
    drawn = layer[..., 3] > 0
    rows, cols = np.nonzero(drawn)
    distance = np.hypot(rows - 300, cols - 120)
    assert rows.size and distance.min() > 4  # the spot itself (the 0.5 level lies 2.4 px out) stays clear
    assert distance.max() <= (MIN_RING_RADIUS + 1) * 2 + 1  # a ring of MIN_RING_RADIUS line widths (2 px here)
    assert np.all(np.abs(layer[drawn][:, :3].astype(int) - level_colour(CONTOUR_LEVELS[-1])).max(axis=1) <= 60)


def test_colour_bar_and_legend_band(tmp_path):
    pixels, _, _ = _sc_pixels(tmp_path, ["L", "F"], "heatmap-legend")
    band = pixels[SIZE:]
    assert band.shape[0] > 60 and band.std() > 20  # text and the bar, not an empty band
    # The colour bar: a row that runs from yellow (low) to red (high) across the band.
    red, green, blue = (band[..., i].astype(int) for i in range(3))
    bar_rows = [r for r in range(band.shape[0])
                if np.all(red[r, 10:-10] > 200) and np.all(blue[r, 10:-10] < 60)
                and green[r, 12] > 200 and green[r, -12] < 60]
    assert bar_rows, "no row of the legend runs from yellow to red"
    r = bar_rows[len(bar_rows) // 2]
    assert np.all(np.diff(green[r, 10:-10]) <= 1)  # green falls monotonically: low to high
    # The disclaimer line is the only yellow text: below the bar.
    warning = np.all(np.abs(band.astype(int) - (255, 220, 0)) <= 40, axis=2)
    assert warning[max(bar_rows) + 1:].sum() > 50


@pytest.mark.parametrize("orientation, left, right", [(["L", "F"], "R", "L"), (["R", "F"], "L", "R"),
                                                      (["P", "FR"], "A", "P")])
def test_side_markers_follow_patient_orientation(orientation, left, right):
    markers = side_markers(orientation)
    assert (markers["left"], markers["right"]) == (left, right)
    assert markers["bottom"] == orientation[1]


def test_side_markers_absent_without_orientation():
    assert side_markers(None) == {} and side_markers(["L"]) == {} and side_markers(["X", "F"]) == {}


def test_burned_in_markers_swap_with_orientation(tmp_path):
    """The glyph at the left edge of a PA (L\\F) image is the one at the right edge of an R\\F image."""
    pa, _, _ = _sc_pixels(tmp_path, ["L", "F"], "heatmap-orientation-LF")
    flipped, _, _ = _sc_pixels(tmp_path, ["R", "F"], "heatmap-orientation-RF")
    none, _, _ = _sc_pixels(tmp_path, None, "heatmap-orientation-none")

    def glyph(pixels: np.ndarray, side: str) -> np.ndarray:
        strip = pixels[SIZE // 3:2 * SIZE // 3, :SIZE // 8] if side == "left" \
            else pixels[SIZE // 3:2 * SIZE // 3, -SIZE // 8:]
        white = np.all(strip == 255, axis=2)
        rows, cols = np.nonzero(white)
        assert rows.size, f"no marker at the {side} edge"
        return white[rows.min():rows.max() + 1, cols.min():cols.max() + 1]

    assert np.array_equal(glyph(pa, "left"), glyph(flipped, "right"))  # "R"
    assert np.array_equal(glyph(pa, "right"), glyph(flipped, "left"))  # "L"
    assert not np.array_equal(glyph(pa, "left"), glyph(pa, "right"))
    assert not np.any(np.all(none[SIZE // 3:2 * SIZE // 3, :SIZE // 8] == 255, axis=2))
    assert none.shape[0] > pa.shape[0]  # the legend says the sides are not marked


def test_review_page_layer_is_the_sc_layer():
    """The stored 8-bit map drawn by `explanation_layer` matches the layer drawn from the full map."""
    source = make_source(2048)
    image, prediction = make_inputs(source, positive=True)
    stored = read_explanation_png(explanation_png(prediction.heatmap))
    assert max(stored.shape) == EXPLANATION_MAX_SIDE
    size = (1024, 1024)
    direct = explanation_layer(prediction.heatmap, prediction.location, source_shape=(2048, 2048), size=size)
    web = explanation_layer(stored, prediction.location, source_shape=(2048, 2048), size=size)
    drawn_direct, drawn_web = direct[..., 3] > 0, web[..., 3] > 0
    overlap = (drawn_direct & drawn_web).sum() / (drawn_direct | drawn_web).sum()
    assert drawn_direct.sum() > 1000 and overlap > 0.6
    assert np.count_nonzero(direct[..., 3]) / direct[..., 3].size < 0.05  # lines, not a wash
