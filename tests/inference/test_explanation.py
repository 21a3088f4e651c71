"""The explanation is evidence from the backbone, not a copy of the detection heatmap, and it depends on the
learned weights (model-randomisation sanity test, Adebayo et al. 2018)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.gradcam import explained_forward
from inference.model import build_network, tta_views
from inference.training.phantoms import generate_phantom, phantom_dataset
from inference.predictor import Detector
from inference.preprocess import prepare


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x), float)
        r[order] = np.arange(len(x), dtype=float)
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return (sums / counts)[inverse]
    ra, rb = ranks(np.ravel(a)), ranks(np.ravel(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_spearman_on_known_orders() -> None:
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 2.0, 3.0])) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.load(device="cpu", threads=2)


@pytest.fixture(scope="module")
def image():
    return prepare(phantom_dataset(generate_phantom(7_100_001, size=512, nodule=True, gain=2.0, diameter_mm=20.0)))


def test_map_changes_when_the_weights_are_randomised(detector: Detector, image) -> None:
    trained = detector.predict(image).heatmap
    torch.manual_seed(1234)
    random_net = build_network(detector.card.architecture).eval()
    randomised = Detector(detector.card, random_net, detector.device, detector.review).predict(image).heatmap
    assert trained.shape == randomised.shape
    rho = spearman(trained[::4, ::4], randomised[::4, ::4])
    assert rho < 0.5, f"rank correlation of the trained and the randomised map is {rho:.3f}"


def test_explanation_is_not_the_detection_heatmap(detector: Detector, image) -> None:
    x = tta_views(torch.from_numpy(image.model_input)[None, None])
    _, _, _, detection = explained_forward(detector.net, x, 1, "head")  # the head's map equals the detection heatmap
    explanation = detector.predict(image).heatmap
    head = np.clip(image.placement.map_to_source(detection[0].numpy()), 0, 1)
    assert np.abs(head - explanation).max() > 0.2


@pytest.mark.parametrize("target", ["head", "encoder8"])
def test_the_partial_rerun_gives_the_full_backward_pass_map(detector: Detector, image, target: str) -> None:
    from inference.gradcam import gradcam
    from inference.model import image_score

    x = tta_views(torch.from_numpy(image.model_input)[None, None])
    out, scores, idx, cam = explained_forward(detector.net, x, 1, target, "hirescam")
    with torch.enable_grad():
        full = detector.net(x.clone().requires_grad_(True))
        full_scores, full_idx = image_score(full.maps)
        reference = gradcam(full, full_scores[:1], target, "hirescam")
    assert torch.allclose(scores, full_scores.detach(), atol=1e-4) and torch.equal(idx, full_idx)
    # batch 1 against batch 2 convolutions differ in the last bits, which flips a few pixels at the lung
    # field's edge (a logit threshold); the map itself agrees
    diff = (cam - reference).abs()
    assert int(cam.flatten().argmax()) == int(reference.flatten().argmax())
    assert float(diff.mean()) < 1e-3 and float((diff > 1e-2).float().mean()) < 0.02


@pytest.mark.parametrize("peak_rc", [(128, 128), (3, 2), (250, 7), (90, 255), (255, 255)])
def test_the_crop_around_the_peak_gives_the_full_gradient(detector: Detector, image, peak_rc) -> None:
    """The explanation's backward pass on a crop equals the whole network's, wherever the peak lies."""
    from inference.gradcam import _crop_grads8
    from inference.model import HEATMAP

    x = torch.from_numpy(image.model_input)[None, None]
    with torch.no_grad():
        plain = detector.net(x)
    w = plain.maps.shape[-1]
    peak = peak_rc[0] * w + peak_rc[1]
    cropped = _crop_grads8(detector.net, plain, 0, peak)
    f8 = plain.mid_features.detach().requires_grad_(True)
    with torch.enable_grad():
        full = detector.net.from_stride8(plain.fine_features[0], plain.fine_features[1], f8)
        (reference,) = torch.autograd.grad(full.maps[0, HEATMAP].flatten()[peak], f8)
    assert float(reference.abs().max()) > 0
    assert torch.allclose(cropped, reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))


@pytest.mark.parametrize("target", ["head", "encoder8", "decoder", "encoder"])
def test_every_target_explains_exactly_the_first_n_images(detector: Detector, image, target: str) -> None:
    """Two images in two TTA views each, the two images explained: two maps, whatever the target (the scorer's contract)."""
    one = torch.from_numpy(image.model_input)[None, None]
    x = tta_views(torch.cat([one, one.flip(-1)]))
    out, scores, idx, cam = explained_forward(detector.net, x, 2, target, "hirescam")
    assert x.shape[0] == 4 and scores.shape == (4,) and idx.shape == (4,)
    assert cam.shape == (2, *out.maps.shape[-2:])
    assert torch.allclose(cam.flatten(1).amax(dim=1), torch.ones(2))
