"""The scheduled fine-tune and its gate read the images the champion was trained on, as it reads them."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from inference.model_card import load_card
from inference.predictor import DEFAULT_CARD
from inference.training.samples import ModelImages, heldout_phantom, phantom_sample, trained_generator
from scheduler.registry import gate_inputs


def test_the_card_names_the_generator_its_model_was_trained_on() -> None:
    card = load_card(DEFAULT_CARD)
    expected = "varied" if "; varied:" in card.training["generator"] else "phantom"
    assert trained_generator(card) == expected
    plain = dataclasses.replace(card, training={"generator": "inference/training/phantoms.py sha256 0123"})
    assert trained_generator(plain) == "phantom"
    assert ModelImages.of(plain, "varied").generator == "varied"


@pytest.mark.parametrize("generator, mm_per_px", [("varied", 0.85), ("phantom", None)])
def test_gate_images_follow_the_candidates_generator_and_scale(make_settings, generator, mm_per_px) -> None:
    fingerprint = "phantoms.py sha256 0123" + ("; varied: variety.py 4567" if generator == "varied" else "")
    card = dataclasses.replace(load_card(DEFAULT_CARD), input_size=256, input_mm_per_px=mm_per_px,
                               training={"generator": fingerprint})
    settings = make_settings(registry={"eval_phantoms": 4, "eval_start": 10})
    images, labels, n_phantoms = gate_inputs(settings, card, [])
    assert n_phantoms == 4 and labels.tolist() == [True, False, True, False]
    for k, image in enumerate(images):
        expected = phantom_sample(heldout_phantom("test", 10 + k, 256, generator), 256, mm_per_px)["image"][0].numpy()
        assert np.array_equal(image, expected)
    if generator == "varied":  # not the default phantoms the 1.0.0 gate read
        default = phantom_sample(heldout_phantom("test", 10, 256, "phantom"), 256, mm_per_px)["image"][0].numpy()
        assert not np.array_equal(images[0], default)
