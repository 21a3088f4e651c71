"""The out-of-distribution score: the density's maths, its artifact's integrity, and that it rises on images
the model was not made for (a non-chest labelled as chest, an inverted or rotated chest)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from inference.training import eval_family as ef
from inference.training.eval_report import rotate, training_case
from inference.model_card import load_card
from inference.ood import FeatureDensity, ledoit_wolf, load_density
from inference.predictor import DEFAULT_CARD, Detector


def test_ledoit_wolf_recovers_a_covariance_and_shrinks_when_samples_are_few() -> None:
    rng = np.random.default_rng(0)
    scales = np.array([1.0, 2.0, 3.0, 4.0])
    x = rng.standard_normal((4000, 4)) * scales + 5.0
    mean, cov, shrink = ledoit_wolf(x)
    assert np.allclose(mean, 5.0, atol=0.1) and np.allclose(np.diag(cov), scales ** 2, rtol=0.1)
    assert shrink < 0.05
    few = rng.standard_normal((5, 30))
    _, cov, shrink = ledoit_wolf(few)
    assert shrink > 0.1 and np.linalg.matrix_rank(cov) == 30  # invertible although n < d


def test_mahalanobis_with_identity_precision_is_euclidean_and_scales_with_variance() -> None:
    d = FeatureDensity(np.zeros(3), np.eye(3), 1.0)
    assert d.score(np.array([[3.0, 4.0, 0.0]]))[0] == pytest.approx(5.0)
    wide = FeatureDensity.fit(np.random.default_rng(1).standard_normal((500, 2)) * [1.0, 10.0], 1.0)
    along_narrow, along_wide = wide.score(np.array([[3.0, 0.0], [0.0, 3.0]]))
    assert along_narrow > 5 * along_wide
    with pytest.raises(ValueError, match="threshold"):
        FeatureDensity(np.zeros(3), np.eye(3), 0.0)


def test_the_card_names_the_density_and_a_tampered_copy_is_refused(tmp_path) -> None:
    card = load_card(DEFAULT_CARD)
    assert card.ood and card.ood["threshold"] > 0
    density = load_density(DEFAULT_CARD, card.ood)
    assert density.precision.shape == (density.mean.shape[0], density.mean.shape[0])
    copy = tmp_path / card.ood["file"]
    shutil.copy(DEFAULT_CARD.parent / card.ood["file"], copy)
    copy.write_bytes(copy.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="sha256"):
        load_density(tmp_path / "card.json", card.ood)
    raw = json.loads(DEFAULT_CARD.read_text())
    raw["ood"] = {"file": "x.npz"}
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="ood"):
        load_card(tmp_path / "bad.json")


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.load(device="cpu", threads=2)


def _score(detector: Detector, case: ef.EvalCase, body_part: str = "CHEST") -> float:
    return detector.predict(detector.prepare(ef.case_dataset(case, body_part=body_part))).ood_score


@pytest.mark.slow  # the model over dozens of images
def test_ood_score_is_higher_off_chest_and_on_inverted_or_rotated_chests(detector: Detector) -> None:
    familiar = [_score(detector, training_case(900_001 + 2 * i, 512)) for i in range(3)]
    chest = training_case(900_011, 512)
    strange = {
        "abdomen labelled chest": _score(detector, ef.make_abdomen(ef.SEED_BASE + 900_000, 512)),
        "inverted chest": _score(detector, ef.with_pixels(chest, 1.0 - ef.display_of(chest))),
        "upside-down chest": _score(detector, rotate(chest, 180.0)),
    }
    for name, score in strange.items():
        assert score > max(familiar), f"{name}: {score:.1f} vs familiar chests {familiar}"
