"""Owns the out-of-distribution score: how far an image's features lie from the training images'.

The feature is the global average of the encoder's deepest (stride-16) map of
the original view, the same forward pass that predicts. Its density over
training phantoms is a Gaussian (mean, Ledoit-Wolf shrunk covariance); the
score is the Mahalanobis distance to it. The threshold is a high percentile of
the scores of held-out phantoms of the training family (calibration split),
so about (100 - percentile) % of familiar images go to review for this reason
and an image the encoder has never seen the like of scores far above it.

The density is a small `.npz` beside the checkpoint, named with its sha256 in
the card's `ood` entry and verified on load like the weights.
`python -m inference.training.ood_fit` fits it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.model_card import verify_file

REASON = "out_of_distribution"


def pooled_features(deep_features: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) encoder features -> (B, C) float64 global averages."""
    return deep_features.detach().float().mean(dim=(2, 3)).cpu().numpy().astype(np.float64)


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, shrunk covariance and shrinkage of samples `x` (n, d) (Ledoit and Wolf 2004)."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    mean = x.mean(axis=0)
    xc = x - mean
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    delta = ((s - mu * np.eye(d)) ** 2).sum() / d
    norms = (xc ** 2).sum(axis=1)
    beta = (norms ** 2 - 2 * np.einsum("ni,ij,nj->n", xc, s, xc) + (s ** 2).sum()).sum() / (n ** 2 * d)
    shrink = float(min(beta, delta) / delta) if delta > 0 else 1.0
    return mean, shrink * mu * np.eye(d) + (1 - shrink) * s, shrink


@dataclass(frozen=True)
class FeatureDensity:
    """A Gaussian over pooled encoder features and the threshold above which an image is unfamiliar."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float

    def __post_init__(self) -> None:
        d = self.mean.shape[0]
        if self.precision.shape != (d, d):
            raise ValueError(f"precision must be ({d}, {d}), got {self.precision.shape}")
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold!r}")

    def score(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of `features` (B, C)."""
        z = np.atleast_2d(features) - self.mean
        return np.sqrt(np.maximum(np.einsum("bi,ij,bj->b", z, self.precision, z), 0.0))

    @classmethod
    def fit(cls, features: np.ndarray, threshold: float) -> "FeatureDensity":
        mean, cov, _ = ledoit_wolf(features)
        return cls(mean, np.linalg.inv(cov), threshold)

    def save(self, path: str | Path) -> None:
        np.savez(path, mean=self.mean.astype(np.float64), precision=self.precision.astype(np.float64))


def load_density(card_path: str | Path, entry: dict) -> FeatureDensity:
    """The density named by a card's `ood` entry (file, sha256, threshold), after checking its sha256."""
    path = verify_file(card_path, entry, "ood")
    with np.load(path) as z:
        return FeatureDensity(z["mean"], z["precision"], float(entry["threshold"]))
