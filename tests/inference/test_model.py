"""The network, its metrics, and the shipped checkpoint's skill against a random network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.training.metrics import auc, ece, fit_platt, platt, youden_threshold
from inference.model import NoduleNet, build_network, embed, image_score, lung_region, tta_views
from inference.training.phantoms import generate_phantom
from inference.predictor import Detector
from inference.training.samples import phantom_model_input
from inference.training.samples import seed_of

torch.set_num_threads(2)


def test_auc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert auc(s, y) == pytest.approx(np.mean(pairs))
    assert np.isnan(auc(s, np.ones(60, bool)))


def test_platt_threshold_and_ece() -> None:
    rng = np.random.default_rng(1)
    s = rng.normal(size=4000)
    y = rng.random(4000) < 1 / (1 + np.exp(-(2.0 * s - 0.5)))
    a, b = fit_platt(s, y)
    assert a == pytest.approx(2.0, abs=0.25) and b == pytest.approx(-0.5, abs=0.2)
    assert ece(platt(s, a, b), y) < 0.03
    assert 0.2 < youden_threshold(platt(s, a, b), y) < 0.8


def test_network_shapes_embedding_and_lung_fallback() -> None:
    net = NoduleNet().eval()
    with torch.inference_mode():
        out = net(tta_views(torch.rand(1, 1, 128, 128)))
    assert out.maps.shape == (2, 3, 64, 64)
    e = embed(out.deep_features)
    assert e.dtype == torch.float32 and torch.allclose(e.norm(dim=1), torch.ones(2))
    maps = torch.full((1, 3, 8, 8), -5.0)
    assert lung_region(maps).all()  # no lung predicted: score the whole image
    maps[0, 0, 2, 3] = 4.0
    score, idx = image_score(maps)
    assert float(score) == 4.0 and int(idx) == 2 * 8 + 3


def _scores(net: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([image_score(net(images[i : i + 8]).maps)[0] for i in range(0, len(images), 8)]).numpy()


@pytest.mark.slow  # the model over dozens of images
def test_shipped_model_beats_a_random_network() -> None:
    """20 held-out phantoms (seeds no training used), nodules 10-30 mm at gain 2."""
    det = Detector.load(device="cpu", threads=2)
    rng = np.random.default_rng(7)
    images, labels = [], []
    for i in range(20):
        positive = i % 2 == 0
        p = generate_phantom(seed_of("test", 900_000 + i), size=det.input_size, nodule=positive, gain=2.0,
                             diameter_mm=float(rng.uniform(10, 30)) if positive else None)
        images.append(phantom_model_input(p, det.input_size)[0])
        labels.append(positive)
    x, y = torch.from_numpy(np.stack(images))[:, None], np.array(labels)
    torch.manual_seed(0)
    random_net = build_network(det.card.architecture).eval()
    trained, random = auc(_scores(det.net, x), y), auc(_scores(random_net, x), y)
    print(f"AUC shipped {trained:.3f}, random init {random:.3f}")
    assert trained >= 0.9
    assert random < 0.8
