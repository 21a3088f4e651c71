"""Owns fitting the out-of-distribution density (`inference.ood.FeatureDensity`) of a model card.

`python -m inference.training.ood_fit --card CARD [--generator varied]` fits it on training images of the
generator the model was trained on, thresholds it on that generator's calibration split, writes it beside
the card (`<weights>.ood.npz`) and sets the card's `ood` entry (printed too).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from inference.model_card import save_card, sha256_file
from inference.ood import FeatureDensity, pooled_features
from inference.predictor import Detector
from inference.training.samples import GENERATORS, ModelImages


def _features(net, images: ModelImages, split: str, n: int) -> np.ndarray:
    """Pooled deep features of images 0..n - 1 of `split` (positives on even indices, physical gain)."""
    rows = []
    for i in range(n):
        sample = images.sample(split, i)
        with torch.inference_mode():
            rows.append(pooled_features(net(sample["image"][None]).deep_features)[0])
    return np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    """Fit the density on training phantoms, threshold it on calibration phantoms, write it and print the card entry."""
    p = argparse.ArgumentParser(prog="python -m inference.training.ood_fit", description=main.__doc__)
    p.add_argument("--card", type=Path, required=True, help="the card to fit for (its `ood` entry is rewritten)")
    p.add_argument("--fit-n", type=int, default=400, help="training-split phantoms the density is fitted on")
    p.add_argument("--threshold-n", type=int, default=200, help="calibration-split phantoms the threshold comes from")
    p.add_argument("--percentile", type=float, default=99.0)
    p.add_argument("--out", type=Path, default=None,
                   help="the .npz to write, in the card's folder (default: the weights' name with .ood.npz)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--generator", default=None, choices=GENERATORS,
                   help="the generator the model was trained on (default: the card's)")
    args = p.parse_args(argv)
    det = Detector.load(args.card, device="cpu", threads=args.threads)
    out = args.out or args.card.parent / f"{Path(det.card.weights_file).stem}.ood.npz"
    if out.resolve().parent != args.card.resolve().parent:
        p.error(f"--out must lie in the card's folder ({args.card.parent}), got {out}")
    images = ModelImages.of(det.card, args.generator)
    fit = _features(det.net, images, "train", args.fit_n)
    held = _features(det.net, images, "calibration", args.threshold_n)
    probe = FeatureDensity.fit(fit, 1.0)
    threshold = float(np.percentile(probe.score(held), args.percentile))
    FeatureDensity(probe.mean, probe.precision, threshold).save(out)
    entry = {"file": out.name, "sha256": sha256_file(out), "threshold": threshold,
             "percentile": args.percentile, "feature": "GAP of the stride-16 encoder features, original view",
             "fit": f"{images.generator} generator, train split indices [0, {args.fit_n}) at {det.input_size} px "
                    f"(positives on even)",
             "threshold_from": f"{images.generator} generator, calibration split indices [0, {args.threshold_n})",
             "fit_scores_median": float(np.median(probe.score(fit))),
             "calibration_scores_median": float(np.median(probe.score(held))),
             "command": "python -m inference.training.ood_fit " + " ".join(argv if argv is not None else sys.argv[1:])}
    save_card(dataclasses.replace(det.card, ood=entry), args.card)
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
