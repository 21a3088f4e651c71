"""Owns fitting the out-of-distribution density (`inference.ood.FeatureDensity`) of a model card.

`python -m inference.training.ood_fit --out X.npz` fits it on training phantoms, thresholds it on
calibration phantoms and prints the card's `ood` entry.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from inference.model_card import sha256_file
from inference.ood import FeatureDensity, pooled_features
from inference.predictor import Detector
from inference.training.phantoms import generate_phantom
from inference.training.samples import HeldOut, phantom_sample, seed_of


def _features(net, split: str, n: int, start: int, input_size: int) -> np.ndarray:
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
    p = argparse.ArgumentParser(prog="python -m inference.training.ood_fit", description=main.__doc__)
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
             "command": "python -m inference.training.ood_fit " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
