"""Owns the out-of-distribution score: how far an image's features lie from the training images'.

The feature is the global average of the encoder's deepest (stride-16) map of
the original view, the same forward pass that predicts. Its density over
training phantoms is a Gaussian (mean, Ledoit-Wolf shrunk covariance); the
score is the Mahalanobis distance to it. The threshold is a high percentile of
the scores of held-out phantoms of the training family (calibration split),
so about (100 - percentile) % of familiar images go to review for this reason
and an image the encoder has never seen the like of scores far above it.

The density is a small `.npz` beside the checkpoint, named with its sha256 in
the card's `ood` entry and verified on load like the weights. `main` fits it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.model_card import sha256_file

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
    path = Path(card_path).parent / entry["file"]
    if not path.is_file():
        raise ValueError(f"OOD density file {str(path)!r} named by card {str(card_path)!r} does not exist")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ValueError(f"OOD density file {str(path)!r} has sha256 {digest}, card expects {entry['sha256']}")
    with np.load(path) as z:
        return FeatureDensity(z["mean"], z["precision"], float(entry["threshold"]))


def _features(net, split: str, n: int, start: int, input_size: int) -> np.ndarray:
    from inference.samples import HeldOut, phantom_sample, seed_of
    from inference.phantoms import generate_phantom

    rows = []
    for i in range(start, start + n):
        if split == "train":  # training images as the network saw them: positives on even seeds
            sample = phantom_sample(generate_phantom(seed_of("train", i), size=input_size, nodule=i % 2 == 0), input_size)
        else:
            sample = HeldOut(split, 2, input_size, i)[0]
        with torch.inference_mode():
            rows.append(pooled_features(net(sample["image"][None]).deep_features)[0])
    return np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    """Fit the density on training phantoms, threshold it on calibration phantoms, write it and print the card entry."""
    from inference.predictor import Detector

    p = argparse.ArgumentParser(prog="python -m inference.ood", description=main.__doc__)
    p.add_argument("--card", type=Path, default=None)
    p.add_argument("--fit-n", type=int, default=400, help="training-split phantoms the density is fitted on")
    p.add_argument("--threshold-n", type=int, default=200, help="calibration-split phantoms the threshold comes from")
    p.add_argument("--percentile", type=float, default=99.0)
    p.add_argument("--out", type=Path, required=True, help="the .npz to write (beside the card)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    det = Detector.load(args.card, device="cpu", threads=args.threads)
    fit = _features(det.net, "train", args.fit_n, 0, det.input_size)
    held = _features(det.net, "calibration", args.threshold_n, 0, det.input_size)
    probe = FeatureDensity.fit(fit, 1.0)
    threshold = float(np.percentile(probe.score(held), args.percentile))
    FeatureDensity(probe.mean, probe.precision, threshold).save(args.out)
    entry = {"file": args.out.name, "sha256": sha256_file(args.out), "threshold": threshold,
             "percentile": args.percentile, "feature": "GAP of the stride-16 encoder features, original view",
             "fit": f"train split indices [0, {args.fit_n}) at {det.input_size} px (positives on even)",
             "threshold_from": f"calibration split indices [0, {args.threshold_n})",
             "fit_scores_median": float(np.median(probe.score(fit))),
             "calibration_scores_median": float(np.median(probe.score(held))),
             "command": "python -m inference.ood " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
