"""The scheduled fine-tune and its gate read the images the champion was trained on, as it reads them."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from inference.model_card import load_card
from inference.predictor import DEFAULT_CARD
from inference.training.samples import ModelImages, heldout_phantom, phantom_sample, trained_generator
from scheduler.fine_tune_contract import AdjudicatedCase
from scheduler.registry import gate_inputs, verdict_image


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
    images, labels, n_phantoms = gate_inputs(settings, ModelImages.of(card), [])
    assert n_phantoms == 4 and labels.tolist() == [True, False, True, False]
    for k, image in enumerate(images):
        expected = phantom_sample(heldout_phantom("test", 10 + k, 256, generator), 256, mm_per_px)["image"][0].numpy()
        assert np.array_equal(image, expected)
    if generator == "varied":  # not the default phantoms the 1.0.0 gate read
        default = phantom_sample(heldout_phantom("test", 10, 256, "phantom"), 256, mm_per_px)["image"][0].numpy()
        assert not np.array_equal(images[0], default)


def test_a_verdict_image_without_spacing_is_read_at_the_scale_serving_estimates(tmp_path) -> None:
    """An expert verdict on an image of the independent family with its spacing tags removed: a physical-scale
    card's fine-tune and gate read it as its serving Detector does, at the scale its lung fields give."""
    from inference.predictor import Detector
    from inference.training import eval_family as ef

    card_path = tmp_path / "card.json"
    raw = json.loads(DEFAULT_CARD.read_text())
    raw["input_mm_per_px"] = 0.85
    card_path.write_text(json.dumps(raw))
    for name in (raw["weights_file"], raw["lung_segmentation"]["file"], raw["ood"]["file"]):
        (tmp_path / name).symlink_to(DEFAULT_CARD.parent / name)
    ds = ef.case_dataset(ef.make_case(ef.SEED_BASE + 11, 600, positive=False))
    del ds.PixelSpacing, ds.ImagerPixelSpacing
    ds.save_as(tmp_path / "verdict.dcm", enforce_file_format=True)
    case = AdjudicatedCase(job_id=1, sop_instance_uid=str(ds.SOPInstanceUID), spool_path=tmp_path / "verdict.dcm",
                           nodule_present=False, location=None, heldout=True, verdict_id=1)

    card = load_card(card_path)
    read = verdict_image(case, ModelImages.of(card, card_path=card_path))
    served = Detector.load(card_path, device="cpu", threads=1).prepare(ds)
    assert "spacing_estimated" in read.quality_flags and read.geometry == served.geometry
    assert np.array_equal(read.model_input, served.model_input)
    unestimated = verdict_image(case, ModelImages.of(card))  # without the card's files: fitted, not estimated
    assert "spacing_estimated" not in unestimated.quality_flags and unestimated.geometry != served.geometry
