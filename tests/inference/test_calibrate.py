"""Recalibration on the node's own scores: the card's Platt scaling and threshold are refitted on what
`Detector` computes from DICOM, and the node then gives exactly those probabilities."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from inference.model_card import load_card
from inference.predictor import Detector
from inference.training import calibrate
from inference.training.phantoms import phantom_dataset
from inference.training.samples import heldout_phantom


def test_refit_rewrites_the_card_and_the_node_reads_with_it(card_copy: Path, capsys) -> None:
    before = load_card(card_copy)
    assert calibrate.main(["--card", str(card_copy), "--generator", "varied", "--n", "8", "--size", "320",
                           "--threads", "1"]) == 0
    after = load_card(card_copy)
    record = after.training["serving_calibration"]
    assert after.calibration.method == calibrate.METHOD and record["n"] == 8 and record["generator"] == "varied"
    assert record["training_calibration"]["a"] == before.calibration.a and 0 < after.threshold < 1
    assert (after.calibration.a, after.calibration.b) != (before.calibration.a, before.calibration.b)
    assert after.weights_sha256 == before.weights_sha256 and after.ood == before.ood  # only the calibration changed

    det = Detector.load(card_copy, device="cpu", threads=1)
    phantom = heldout_phantom("calibration", 0, 320, "varied")
    image = det.prepare(phantom_dataset(phantom, monochrome1=phantom.monochrome1))
    mean = float(det.view_scores(image).double().mean())
    p, _ = det.probability(image)
    assert math.isclose(p, 1 / (1 + math.exp(-(after.calibration.a * mean + after.calibration.b))), rel_tol=1e-9)
    assert math.isclose(det.predict(image).probability, p, rel_tol=1e-6)  # the explained read agrees


def test_too_few_images_or_one_class_is_refused(card_copy: Path) -> None:
    with pytest.raises(SystemExit):
        calibrate.main(["--card", str(card_copy), "--n", "2"])
    det = Detector.load(card_copy, device="cpu", threads=1)
    with pytest.raises(ValueError, match="with and without a finding"):
        calibrate.serving_scores(det, "phantom", 1, 320)
    scores, labels, skipped = calibrate.serving_scores(det, "phantom", 4, 320)
    assert scores.shape == (4, 2) and list(labels) == [1, 0, 1, 0] and skipped == 0 and np.isfinite(scores).all()
