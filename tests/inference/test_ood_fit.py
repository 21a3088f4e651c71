"""Fitting the out-of-distribution density for a card: written beside it, named in its `ood` entry, served."""
from __future__ import annotations

from pathlib import Path

import pytest

from inference.model_card import load_card
from inference.predictor import Detector
from inference.training import ood_fit


def test_fit_writes_the_density_beside_the_card_and_the_node_serves_it(card_copy: Path, capsys) -> None:
    before = load_card(card_copy)
    assert ood_fit.main(["--card", str(card_copy), "--generator", "varied", "--fit-n", "6", "--threshold-n", "4"]) == 0
    after = load_card(card_copy)
    written = card_copy.parent / f"{Path(after.weights_file).stem}.ood.npz"
    assert after.ood["file"] == written.name and written.is_file() and after.ood["sha256"] != before.ood["sha256"]
    assert after.ood["fit"].startswith("varied generator") and after.ood["threshold"] > 0
    assert after.calibration == before.calibration and after.weights_sha256 == before.weights_sha256
    det = Detector.load(card_copy, device="cpu", threads=1)
    assert det.density is not None and det.density.threshold == after.ood["threshold"]


def test_the_density_must_lie_beside_the_card(card_copy: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "sub"
    elsewhere.mkdir()
    with pytest.raises(SystemExit):
        ood_fit.main(["--card", str(card_copy), "--fit-n", "4", "--threshold-n", "4", "--out", str(elsewhere / "x.npz")])
    assert not (elsewhere / "x.npz").exists()
