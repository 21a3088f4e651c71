"""The shipped checkpoint matches its card, and a tampered copy is refused."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from inference.model_card import load_card, save_card, sha256_file, verify_weights
from inference.predictor import DEFAULT_CARD, Detector


def test_shipped_weights_match_card() -> None:
    card = load_card(DEFAULT_CARD)
    weights = verify_weights(card, DEFAULT_CARD)
    assert sha256_file(weights) == card.weights_sha256
    assert weights.stat().st_size < 25 * 2**20
    assert 0.0 < card.threshold < 1.0 and card.calibration.a > 0


def _copy(tmp_path: Path) -> tuple[Path, Path]:
    card = load_card(DEFAULT_CARD)
    shutil.copy(DEFAULT_CARD, tmp_path / "card.json")
    weights = tmp_path / card.weights_file
    shutil.copy(DEFAULT_CARD.parent / card.weights_file, weights)
    weights.chmod(0o644)
    return tmp_path / "card.json", weights


def test_corrupted_weights_are_refused(tmp_path: Path) -> None:
    card_path, weights = _copy(tmp_path)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=weights.name):
        Detector.load(card_path, device="cpu", threads=1)


def test_missing_weights_and_bad_card_are_refused(tmp_path: Path) -> None:
    card_path, weights = _copy(tmp_path)
    weights.unlink()
    with pytest.raises(ValueError, match=weights.name):
        Detector.load(card_path, device="cpu", threads=1)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_card(tmp_path / "bad.json")


def test_card_round_trip_and_validation(tmp_path: Path) -> None:
    card = load_card(DEFAULT_CARD)
    save_card(card, tmp_path / "c.json")
    assert load_card(tmp_path / "c.json") == card
    with pytest.raises(ValueError, match="threshold"):
        dataclasses.replace(card, threshold=1.5)


def test_card_names_the_current_generator_and_says_what_it_is_for() -> None:
    from inference.training.train import _generator_version

    card = load_card(DEFAULT_CARD)
    generator = "varied" if "; varied: " in card.training["generator"] else "phantom"  # the card's training images
    assert card.training["generator"] == _generator_version(generator), "a generator changed: check the card's note"
    assert "not for diagnosis" in card.intended_use.lower() and "synthetic" in card.trained_on.lower()
    assert card.known_failure_modes and card.ood["file"] and card.training["command"].startswith("smartnodule train")
