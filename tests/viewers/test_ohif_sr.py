"""Our SRs in OHIF v3's own SR code (`tests/viewers/ohif/load_sr.mjs`, npm packages pinned there).

The positive SR of a CR whose prediction sits on the phantom's known nodule must load
without error, map onto its source image, draw the circle on the nodule with the
probability in percent, and hydrate as an editable CircleROI; the negative SR must load
without error and draw nothing. The node script prints what OHIF made of the SR.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.sr.codedict import codes

from inference.training.phantoms import generate_phantom, phantom_dataset
from inference.preprocess import prepare
from inference.types import Location, ModelIdentity, Prediction
from sr_writer.encode import encode_results
from tests.conftest import require_binary

pytestmark = pytest.mark.integration

OHIF = Path(__file__).resolve().parent / "ohif"
STAMP = OHIF / "node_modules" / ".installed"
MODEL = ModelIdentity(name="nodule-resnet18", version="1.2.0", weights_sha256="cd" * 32)


@pytest.fixture(scope="session")
def ohif_packages() -> Path:
    """OHIF's packages, installed once with `npm ci` (what `make test` does first) unless already current."""
    npm = require_binary("npm")
    require_binary("node")
    lock = OHIF / "package-lock.json"
    if not STAMP.exists() or STAMP.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=OHIF, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        STAMP.touch()
    return OHIF


@pytest.fixture(scope="module")
def cr(tmp_path_factory):
    """A MONOCHROME1 CR phantom with a nodule, saved, with its ground truth and the prepared image."""
    phantom = generate_phantom(11, 512, nodule=True, bits_stored=15)
    source = phantom_dataset(phantom, monochrome1=True, modality="CR")
    path = tmp_path_factory.mktemp("ohif") / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    return source, path, phantom.nodule, prepare(source, input_size=256)


def load_in_ohif(folder: Path, sr, source_path: Path) -> dict:
    sr_path = folder / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    done = subprocess.run(["node", "load_sr.mjs", str(sr_path), str(source_path)], cwd=OHIF,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def predict(image, location: Location | None, probability: float) -> Prediction:
    return Prediction(probability=probability, uncertainty=0.05, positive=location is not None, review=False,
                      location=location, heatmap=np.zeros(image.display.shape, np.float32),
                      embedding=np.ones(8, np.float32) / np.sqrt(8), model=MODEL)


def test_positive_sr_draws_the_nodule_and_hydrates_a_circle_roi(ohif_packages, cr, tmp_path):
    source, source_path, truth, image = cr
    prediction = predict(image, Location(truth.row, truth.col, truth.radius_px), 0.8697)
    shown = load_in_ohif(tmp_path, encode_results(source, image, prediction, review=False).sr, source_path)
    assert shown["error"] is None, shown.get("stack")
    assert shown["notifications"] == [] and shown["isImagingMeasurementReport"]
    image_id = f"smartnodule:{source.SOPInstanceUID}"
    centre = (truth.col + 0.5, truth.row + 0.5)  # image coordinates: the centre of pixel (r, c) is (c+.5, r+.5)
    spacing = [float(v) for v in source.PixelSpacing]

    [measurement] = shown["measurements"]
    assert measurement["loaded"] and measurement["imageId"] == image_id  # opens on its source image
    assert measurement["TrackingIdentifier"].startswith("Cornerstone3DTools@^0.1.0:CircleROI:")
    [coords] = measurement["coords"]
    assert (coords["ValueType"], coords["GraphicType"]) == ("SCOORD", "CIRCLE")
    assert coords["GraphicData"] == pytest.approx([*centre, centre[0] + truth.radius_px, centre[1]], abs=1e-3)

    [drawn] = shown["drawn"]  # what the SR viewport draws
    assert drawn["toolName"] == "DICOMSRDisplay" and drawn["graphicType"] == "CIRCLE"
    assert drawn["referencedImageId"] == image_id
    points = np.array(drawn["imagePoints"])
    assert points.mean(axis=0) == pytest.approx(centre, abs=0.01)
    assert np.hypot(*(points - centre).T) == pytest.approx([truth.radius_px] * 4, abs=0.01)
    # World: the image position is the centre of the first pixel, so the nodule is at index x spacing.
    assert np.array(drawn["points"]).mean(axis=0)[:2] == pytest.approx(
        (truth.col * spacing[1], truth.row * spacing[0]), abs=0.01)
    assert drawn["textLines"] == ["Probability: 87.00 %", "Model uncertainty: 5.00 %"]
    assert not any(ch.isdigit() for line in drawn["textLines"] for ch in line.split(":")[0])  # names, not codes

    assert shown["isRehydratable"]
    [roi] = shown["hydrated"]  # the editable measurement
    assert roi["annotationType"] == "CircleROI" and roi["referencedImageId"] == image_id
    roi_centre, roi_edge = roi["imagePoints"]
    assert roi_centre == pytest.approx(centre, abs=0.01)
    assert math.dist(roi_centre, roi_edge) == pytest.approx(truth.radius_px, abs=0.01)
    assert roi["finding"] == "Nodule" and roi["findingSites"] == ["Lung"]


def test_negative_sr_loads_and_draws_nothing(ohif_packages, cr, tmp_path):
    source, source_path, _, image = cr
    shown = load_in_ohif(tmp_path, encode_results(source, image, predict(image, None, 0.08), review=True).sr,
                         source_path)
    assert shown["error"] is None, shown.get("stack")
    assert shown["notifications"] == [] and shown["isImagingMeasurementReport"]
    assert shown["referencedImages"] == [{"ReferencedSOPClassUID": source.SOPClassUID,
                                          "ReferencedSOPInstanceUID": source.SOPInstanceUID}]
    assert shown["measurements"] == [] and shown["drawn"] == [] and shown["hydrated"] == []


def test_group_without_coordinates_breaks_ohif(ohif_packages, cr, tmp_path):
    """The check can fail: the former layout (an image-level TID 1501 group, no coordinates) breaks OHIF."""
    source, source_path, _, image = cr
    sr = encode_results(source, image, predict(image, None, 0.08), review=False).sr
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="image-level result"),
        finding_type=codes.SCT.Nodule,
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=8.0, unit=codes.UCUM.Percent)])
    container = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurements,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(list(group))
    sr.ContentSequence.append(container)
    shown = load_in_ohif(tmp_path, sr, source_path)
    assert shown["error"] == "TypeError: Cannot read properties of undefined (reading 'ReferencedSOPSequence')"
