"""The presentation state of a positive finding, and every output of a real CR, read back by DCMTK and dciodvfy.

The source is a CR as a modality stores it: MONOCHROME1, 15 bits stored, from the
phantom generator, whose ground-truth nodule gives the known centre.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from inference.training.phantoms import generate_phantom, phantom_dataset
from inference.preprocess import prepare
from inference.types import Location
from sr_writer.encode import encode_results
from sr_writer.presentation_state import LAYER, annotation_text
from sr_writer.structured_report import ROI_TRACKING_ID
from tests.conftest import require_binary
from test_sr_writer_encode import OUTPUT, make_inputs

SIZE = 512


def encode_cr(*, body_part: bool = True):
    """(source, truth, results) of a positive CR whose prediction sits on the phantom's nodule."""
    phantom = generate_phantom(7, SIZE, nodule=True, bits_stored=15)
    source = phantom_dataset(phantom, monochrome1=True, modality="CR")
    assert (source.Modality, source.PhotometricInterpretation, source.BitsStored) == ("CR", "MONOCHROME1", 15)
    if not body_part:
        del source.BodyPartExamined
    image = prepare(source, input_size=256)
    _, prediction = make_inputs(source, positive=True)
    truth = phantom.nodule
    prediction = dataclasses.replace(prediction, location=Location(truth.row, truth.col, truth.radius_px),
                                     heatmap=np.zeros(image.display.shape, np.float32))
    return source, truth, encode_results(source, image, prediction, review=False)


@pytest.fixture(scope="module")
def cr():
    return encode_cr()


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_gsps_references_source_with_circle_and_text(cr, tmp_path):
    source, truth, results = cr
    pr = pydicom.dcmread(_save(results.gsps, tmp_path / "pr.dcm"))
    assert pr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1" and pr.Modality == "PR"
    assert pr.StudyInstanceUID == source.StudyInstanceUID and pr.SeriesNumber == 9904
    [series] = pr.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert pr.PresentationLUTShape == "INVERSE"  # MONOCHROME1 shown as the modality intended
    [annotation] = pr.GraphicAnnotationSequence
    assert annotation.GraphicLayer == LAYER
    [circle] = annotation.GraphicObjectSequence
    assert (circle.GraphicType, circle.GraphicAnnotationUnits) == ("CIRCLE", "PIXEL")
    assert circle.TrackingID == ROI_TRACKING_ID
    # PIXEL units: the centre of pixel index (r, c) is (c + 0.5, r + 0.5).
    assert list(circle.GraphicData) == pytest.approx(
        [truth.col + 0.5, truth.row + 0.5, truth.col + 0.5 + truth.radius_px, truth.row + 0.5], abs=1e-3)
    [text] = annotation.TextObjectSequence
    assert text.UnformattedTextValue == "AI: nodule 87 %" == annotation_text(make_inputs(source, positive=True)[1])
    left, top = text.BoundingBoxTopLeftHandCorner
    right, bottom = text.BoundingBoxBottomRightHandCorner
    assert 0 <= left < right <= source.Columns and 0 <= top < bottom <= source.Rows


def test_negative_has_no_presentation_state(cr):
    source = cr[0]
    image = prepare(source, input_size=256)
    _, negative = make_inputs(source, positive=False)
    negative = dataclasses.replace(negative, heatmap=np.zeros(image.display.shape, np.float32))
    results = encode_results(source, image, negative, review=False)
    assert results.gsps is None and set(results.named()) == {"sr", "heatmap", "pdf"}


def test_dcmp2pgm_renders_source_with_presentation_state(cr, tmp_path):
    """`dcmp2pgm -p pr.dcm source.dcm out.pgm`: the image as without the PR, plus the circle.

    dcmp2pgm rasterizes no graphic annotations (DCMTK leaves those to a viewer) but it
    does render the PR's activated overlays, which it writes beside the image in
    verbose mode (ovl_<layer><n>.pgm); its dump lists the vector circle and the text.
    """
    dcmp2pgm = require_binary("/usr/bin/dcmp2pgm")
    source, truth, results = cr
    src, pr = _save(source, tmp_path / "source.dcm"), _save(results.gsps, tmp_path / "pr.dcm")
    plain = subprocess.run([dcmp2pgm, str(src), "plain.pgm"], cwd=tmp_path, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    with_pr = subprocess.run([dcmp2pgm, "-v", "-p", str(pr), str(src), "with-pr.pgm"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert with_pr.returncode == 0, with_pr.stderr
    dump = with_pr.stdout + with_pr.stderr
    assert 'text 1: "AI: nodule 87 %"' in dump
    assert re.search(r"graphic 1: points=2 type=circle filled=no units=pixel", dump)
    assert "Number of activated overlays: 1" in dump

    image = cv2.imread(str(tmp_path / "with-pr.pgm"), cv2.IMREAD_UNCHANGED)
    reference = cv2.imread(str(tmp_path / "plain.pgm"), cv2.IMREAD_UNCHANGED)
    assert image.shape == reference.shape == (source.Rows, source.Columns)
    assert np.array_equal(image, reference)  # the PR keeps the image's window and grey scale (not inverted)

    [overlay_file] = sorted(tmp_path.glob("ovl_*.pgm"))
    overlay = cv2.imread(str(overlay_file), cv2.IMREAD_UNCHANGED)
    rows, cols = np.nonzero(overlay)
    assert len(rows) > 2 * np.pi * truth.radius_px * 0.8  # a closed ring ...
    distance = np.hypot(rows - truth.row, cols - truth.col)
    assert np.abs(distance - truth.radius_px).max() <= 1.5  # ... on the nodule's circle, nothing else
    angles = np.degrees(np.arctan2(rows - truth.row, cols - truth.col)) // 10
    assert len(set(angles)) == 36  # all the way round

    composite = np.where(overlay > 0, 255, image)  # what a viewer shows: the circle over the image
    assert (composite != reference).sum() > 0.5 * len(rows)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(OUTPUT / "gsps-cr.png"), composite.astype(np.uint8))


@pytest.mark.parametrize("body_part", [True, False], ids=["chest", "no-body-part"])
def test_every_output_of_a_cr_passes_dciodvfy(body_part, tmp_path):
    dciodvfy = require_binary("dciodvfy")
    _, _, results = encode_cr(body_part=body_part)
    assert set(results.named()) == {"sr", "gsps", "heatmap", "pdf"}
    for name, ds in results.named().items():
        check = subprocess.run([dciodvfy, str(_save(ds, tmp_path / f"{name}.dcm"))], capture_output=True, text=True)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], (name, errors)
    for series in (results.heatmap, results.gsps):
        # The body part tells a reader no Laterality is needed; without it, Laterality is there and empty.
        assert (series.BodyPartExamined, "Laterality" in series) == ("CHEST", False) if body_part \
            else ("BodyPartExamined" in series, series.Laterality) == (False, "")
