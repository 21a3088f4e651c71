"""Owns refitting a card's calibration on the node's own scores (`python -m inference.training.calibrate`).

Training fits Platt scaling on the network's scores over its own lung head, from
generated arrays. The node scores differently: from DICOM, after
`inference.preprocess.prepare`, inside the lung-field segmentation the card ships
(`inference.lung_seg`). This refits the card's Platt scaling and threshold on
exactly those scores (`Detector.view_scores`) of held-out calibration-split
images of the generator the model was trained on, written as DICOM. The test
split and the evaluation family stay untouched, so `smartnodule eval` still
measures the calibration on images it was not fitted on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from inference.model_card import Calibration, save_card
from inference.predictor import Detector
from inference.training import progress
from inference.training.metrics import auc, ece, fit_calibration, json_safe, platt
from inference.training.eval_report import heldout_dataset
from inference.training.samples import GENERATORS, trained_generator
from inference.types import NotApplicable, Unreadable

METHOD = ("platt on the mean TTA image score as the node computes it (DICOM, prepare, max heatmap logit inside "
          "the lung-field segmentation), fitted on held-out calibration-split images")


def serving_scores(detector: Detector, generator: str, n: int, size: int,
                   progress_mode: str = "never") -> tuple[np.ndarray, np.ndarray, int]:
    """View scores (read, views), labels and the number skipped of calibration-split images 0..n-1 read
    through the node's path (an image the node would skip, e.g. too small, is left out as the node leaves it)."""
    scores, labels, skipped = [], [], 0
    for i in progress.bar(progress_mode, range(n), total=n, desc=f"calibration ({generator})", unit="img"):
        phantom, ds = heldout_dataset("calibration", i, size, generator)
        try:
            image = detector.prepare(ds)
        except (NotApplicable, Unreadable):
            skipped += 1
            continue
        scores.append(detector.view_scores(image).double().cpu().numpy())
        labels.append(int(phantom.nodule is not None))
    if len(set(labels)) < 2:
        raise ValueError(f"calibration needs images with and without a finding; read {len(labels)}, skipped {skipped}")
    return np.stack(scores), np.array(labels), skipped


def main(argv: list[str] | None = None) -> int:
    """Refit the card's Platt scaling and threshold on the node's scores and rewrite the card in place."""
    p = argparse.ArgumentParser(prog="python -m inference.training.calibrate", description=main.__doc__)
    p.add_argument("--card", type=Path, required=True, help="the card to recalibrate (rewritten in place)")
    p.add_argument("--generator", default=None, choices=GENERATORS,
                   help="the generator the model was trained on (default: the card's)")
    p.add_argument("--n", type=int, default=400, help="calibration-split images, half with a finding (default: %(default)s)")
    p.add_argument("--size", type=int, default=None, help="their long side in pixels (default: the model's input size)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    progress.add_option(p)
    args = p.parse_args(argv)
    if args.n < 4:
        p.error(f"--n must be at least 4, got {args.n}")
    det = Detector.load(args.card, device="cpu", threads=args.threads)
    generator = args.generator or trained_generator(det.card)
    scores, labels, skipped = serving_scores(det, generator, args.n, args.size or det.input_size, args.progress)
    mean = scores.mean(axis=1)
    before = platt(mean, det.card.calibration.a, det.card.calibration.b)
    a, b, threshold = fit_calibration(mean, labels)
    after = platt(mean, a, b)
    record = {"generator": generator, "n": args.n, "skipped": skipped, "size": args.size or det.input_size,
              "seeds": "calibration split indices [0, n), findings on even indices", "auc": auc(mean, labels),
              "ece_with_training_calibration": ece(before, labels), "ece_refitted_in_sample": ece(after, labels),
              "training_calibration": dataclasses.asdict(det.card.calibration),
              "training_threshold": det.card.threshold,
              "command": "python -m inference.training.calibrate " + " ".join(argv if argv is not None else sys.argv[1:])}
    card = dataclasses.replace(det.card, calibration=Calibration(METHOD, a, b), threshold=threshold,
                               training={**det.card.training, "serving_calibration": json_safe(record)})
    save_card(card, args.card)
    print(json.dumps(json_safe({"a": a, "b": b, "threshold": threshold, **record}), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
