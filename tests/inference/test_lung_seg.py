"""The lung-field segmentation: findings never outside the grown field, the shipped network on a known
phantom, and a non-chest image becoming a review reason."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from inference.lung_seg import BELOW_PX, DILATION_PX, NOT_FRONTAL, REASON, SEG_SIZE, LungNet, grow, side_by_side
from inference.model import HEATMAP, OUT_CHANNELS, image_score, restricted
from inference.predictor import Detector, ReviewPolicy
from inference.training import eval_family as ef
from inference.training.lung_seg_eval import dice, source_mask
from inference.training.phantoms import generate_phantom, phantom_dataset
from inference.types import REVIEW_REASON_CODES


def test_the_field_grows_by_the_dilation_and_further_down() -> None:
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 20, 30] = True
    region = grow(mask)[0]
    rows, cols = np.nonzero(region.numpy())
    assert (rows.min(), rows.max()) == (20 - DILATION_PX, 20 + DILATION_PX + BELOW_PX)
    assert (cols.min(), cols.max()) == (30 - DILATION_PX, 30 + DILATION_PX)


def test_no_peak_and_no_score_outside_the_region() -> None:
    rng = np.random.default_rng(3)
    maps = torch.from_numpy(rng.normal(0, 1, (4, OUT_CHANNELS, 32, 32)).astype(np.float32))
    region = torch.zeros(4, 16, 16, dtype=torch.bool)  # half resolution: resized to the maps
    region[:, 4:10, 3:7] = True
    maps[:, HEATMAP, 0, 0] = 50.0  # the strongest response lies outside the lungs
    maps[:, HEATMAP, 30, 30] = 40.0
    score, idx = image_score(maps, region)
    big = torch.zeros(4, 32, 32, dtype=torch.bool)
    big[:, 8:20, 6:14] = True
    for b in range(4):
        r, c = divmod(int(idx[b]), 32)
        assert big[b, r, c]
        assert float(score[b]) == pytest.approx(float(maps[b, HEATMAP][big[b]].max()))
    assert torch.isinf(restricted(maps, region)[~big]).all()


def test_the_explanation_is_zero_outside_the_region() -> None:
    from inference.gradcam import explained_forward
    from inference.model import build_network, tta_views

    torch.manual_seed(0)
    net = build_network({"backbone": "resnet10t", "width": 16, "fine_width": 8}).eval()
    x = tta_views(torch.rand(1, 1, 128, 128))
    region = torch.zeros(2, 64, 64, dtype=torch.bool)
    region[:, 10:40, 5:30] = True
    _, _, idx, cam = explained_forward(net, x, 1, "encoder8", "hirescam", region)
    assert region[0].flatten()[int(idx[0])]
    assert float(cam[0][~region[0]].abs().max()) == 0.0 and float(cam.max()) > 0


def test_the_reason_has_a_code_and_is_given_when_the_lungs_are_not_found() -> None:
    assert REASON in REVIEW_REASON_CODES
    assert ReviewPolicy().reasons(0.01, 0.6, 0.0, False, (), lungs_found=False) == (REASON,)
    assert ReviewPolicy().reasons(0.01, 0.6, 0.0, False, ()) == ()


def test_a_random_network_keeps_the_input_size() -> None:
    assert LungNet()(torch.zeros(2, 1, SEG_SIZE, SEG_SIZE)).shape == (2, 1, SEG_SIZE, SEG_SIZE)


@pytest.fixture(scope="module")
def detector() -> Detector:
    det = Detector.load(device="cpu", threads=2)
    assert det.lungs is not None, "the shipped card names a lung segmentation"
    return det


def test_the_shipped_network_finds_the_lungs_of_a_known_phantom(detector: Detector) -> None:
    phantom = generate_phantom(2_000_017, size=512)  # a held-out test seed of the training generator
    image = detector.prepare(phantom_dataset(phantom))
    found = source_mask(detector.lungs, image)
    assert dice(found, phantom.lung_field) > 0.8
    field = detector.lungs.field(image.model_input)
    assert field.plausible and field.frontal
    assert not {REASON, NOT_FRONTAL} & set(detector.predict(image).review_reasons)


def _blobs(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((64, 64), bool)
    for top, left, height, width in boxes:
        mask[top:top + height, left:left + width] = True
    return mask


def test_two_lungs_side_by_side_make_a_frontal_field() -> None:
    assert side_by_side(_blobs((10, 8, 40, 18), (12, 36, 38, 20)))
    assert not side_by_side(_blobs((10, 8, 40, 48)))  # one region: lungs superimposed, as in a lateral view
    assert not side_by_side(_blobs((4, 10, 18, 44), (36, 10, 20, 44)))  # stacked: a chest rotated by 90 degrees
    assert not side_by_side(_blobs((10, 8, 40, 18), (12, 36, 8, 6)))  # the second part is a speck
    assert not side_by_side(_blobs((10, 8, 40, 30), (12, 30, 38, 20)))  # overlapping left to right


def _turned(mask: np.ndarray, degrees: float) -> np.ndarray:
    rows, cols = mask.shape
    matrix = cv2.getRotationMatrix2D(((cols - 1) / 2, (rows - 1) / 2), degrees, 1.0)
    return cv2.warpAffine(mask.astype(np.uint8), matrix, (cols, rows), flags=cv2.INTER_NEAREST) > 0


def test_a_tilted_chest_is_still_frontal_and_one_on_its_side_is_not() -> None:
    lungs = np.zeros((96, 96), bool)
    lungs[20:76, 18:44] = lungs[22:76, 52:78] = True  # 8 px apart; tilted 20 degrees their bounding boxes overlap
    for degrees in (-20, 20):
        _, _, stats, _ = cv2.connectedComponentsWithStats(_turned(lungs, degrees).astype(np.uint8))
        left, right = sorted(stats[1:3], key=lambda s: s[cv2.CC_STAT_LEFT])
        assert left[cv2.CC_STAT_LEFT] + left[cv2.CC_STAT_WIDTH] > right[cv2.CC_STAT_LEFT]
        assert side_by_side(_turned(lungs, degrees))
    assert not side_by_side(_turned(lungs, 90))


def test_a_chest_turned_on_its_side_is_not_read_as_frontal(detector: Detector) -> None:
    assert NOT_FRONTAL in REVIEW_REASON_CODES
    case = ef.make_case(ef.SEED_BASE + 7, 512, positive=False)  # the independent family: not our generator
    upright = ef.case_dataset(case)
    turned = ef.case_dataset(dataclasses.replace(case, pixels=np.ascontiguousarray(np.rot90(case.pixels)),
                                                 lung_mask=np.ascontiguousarray(np.rot90(case.lung_mask))))
    assert detector.lungs.field(detector.prepare(upright).model_input).frontal
    field = detector.lungs.field(detector.prepare(turned).model_input)
    assert not (field.plausible and field.frontal)
    reasons = detector.predict(detector.prepare(turned)).review_reasons
    assert (NOT_FRONTAL if field.plausible else REASON) in reasons
    assert ReviewPolicy().reasons(0.01, 0.6, 0.0, False, (), frontal=False) == (NOT_FRONTAL,)
    assert ReviewPolicy().reasons(0.01, 0.6, 0.0, False, (), lungs_found=False, frontal=False) == (REASON,)


def test_an_abdomen_labelled_chest_has_no_lung_fields_and_goes_to_review(detector: Detector) -> None:
    case = ef.make_abdomen(ef.SEED_BASE + 500_003, 512)
    image = detector.prepare(ef.case_dataset(case, body_part="CHEST"))
    field = detector.lungs.field(image.model_input)
    assert not field.plausible
    prediction = detector.predict(image)
    assert prediction.review and REASON in prediction.review_reasons
