"""Detector.predict: decision, Grad-CAM and location in the source geometry."""
from __future__ import annotations

import numpy as np
import pytest

from inference.training.metrics import POINTING_MARGIN_MM
from inference.training.phantoms import generate_phantom, phantom_dataset
from inference.predictor import DEFAULT_CARD, Detector, ReviewPolicy
from inference.preprocess import prepare


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.load(device="cpu", threads=2)


def test_identity_comes_from_the_shipped_card(detector: Detector) -> None:
    assert DEFAULT_CARD.is_file()
    assert detector.identity.weights_sha256 == detector.card.weights_sha256
    assert detector.input_size == detector.card.input_size == 512


def test_obvious_nodule_gradcam_peak_and_location_inside_it(detector: Detector) -> None:
    ph = generate_phantom(7_000_001, size=1024, nodule=True, gain=3.0, diameter_mm=25.0)
    pred = detector.predict(prepare(phantom_dataset(ph)))
    nod = ph.nodule
    reach = nod.radius_px + POINTING_MARGIN_MM / ph.pixel_spacing_mm
    peak = np.unravel_index(np.argmax(pred.heatmap), pred.heatmap.shape)
    assert pred.positive and pred.probability > 0.9
    assert np.hypot(peak[0] - nod.row, peak[1] - nod.col) <= reach
    assert np.hypot(pred.location.row - nod.row, pred.location.col - nod.col) <= reach
    assert pred.location.radius == pytest.approx(nod.radius_px, rel=0.5)


def test_odd_sized_image_gets_source_geometry_outputs(detector: Detector) -> None:
    ph = generate_phantom(7_000_002, size=768, nodule=True, gain=3.0, diameter_mm=20.0)
    image = prepare(phantom_dataset(ph, rows_cols=(701, 555)))
    pred = detector.predict(image)
    assert image.display.shape == (701, 555)
    assert pred.heatmap.shape == (701, 555) and pred.heatmap.dtype == np.float32
    assert 0.0 <= pred.heatmap.min() and pred.heatmap.max() <= 1.0
    assert pred.location is not None
    assert 0 <= pred.location.row < 701 and 0 <= pred.location.col < 555
    assert pred.embedding.dtype == np.float32 and pred.embedding.ndim == 1
    assert np.linalg.norm(pred.embedding) == pytest.approx(1.0, abs=1e-4)
    p, u = detector.probability(image)
    assert p == pytest.approx(pred.probability, abs=1e-5) and u == pytest.approx(pred.uncertainty, abs=1e-5)


def test_review_policy(detector: Detector) -> None:
    with pytest.raises(ValueError, match="margin"):
        ReviewPolicy(margin=-0.1)
    with pytest.raises(ValueError, match="max_uncertainty"):
        ReviewPolicy(max_uncertainty=2.0)
    always = Detector(detector.card, detector.net, detector.device, ReviewPolicy(margin=1.0))
    ph = generate_phantom(7_000_003, size=512, nodule=False)
    pred = always.predict(prepare(phantom_dataset(ph)))
    assert pred.review and pred.location is not None
    assert 0.0 <= pred.uncertainty <= 0.5


def test_wrong_input_size_is_refused(detector: Detector) -> None:
    ph = generate_phantom(7_000_004, size=512, nodule=False)
    image = prepare(phantom_dataset(ph), input_size=256)
    with pytest.raises(ValueError, match="model_input"):
        detector.predict(image)


def test_predict_records_for_processed_skipped_and_rejected_files(detector: Detector, tmp_path) -> None:
    from inference.commands import predict_file

    ph = generate_phantom(7_000_005, size=512, nodule=True, gain=3.0, diameter_mm=20.0)
    phantom_dataset(ph).save_as(tmp_path / "pa.dcm", enforce_file_format=True)
    phantom_dataset(ph, view_position="LL").save_as(tmp_path / "lateral.dcm", enforce_file_format=True)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    pa, lateral, junk = (predict_file(detector, tmp_path / n) for n in ("pa.dcm", "lateral.dcm", "junk.dcm"))
    assert pa["outcome"] == "processed" and pa["sop_instance_uid"] and 0.0 <= pa["probability"] <= 1.0
    assert set(pa["location"]) == {"row", "col", "radius"} and pa["model"]["name"] == detector.identity.name
    assert pa["review"] == bool(pa["review_reasons"]) and pa["ood_score"] > 0
    assert lateral["outcome"] == "skipped" and lateral["reason"].startswith("lateral_view")
    assert junk["outcome"] == "rejected" and junk["probability"] is None
