"""Owns measuring the lung-field segmentation and what restricting findings to it changes.

Segmentation: Dice of the shipped `inference.lung_seg` network against the true lung
masks of the independent evaluation family (`eval_family.EvalCase.lung_mask`: the whole
lung, behind the heart included) and of the training family's held-out test phantoms
(`Phantom.lung_field`), each image read as the node reads it (DICOM, `prepare`, the
model input downsampled to the segmentation size) and the mask mapped back to the
source pixels; the share of images whose field counts as plausible (area, undecided
share: `inference.lung_seg`); and the share of non-chest images (`eval_family.make_abdomen`, labelled CHEST) whose field does not.

Detection, with `--detector`: the same independent images read by the card's detector
twice, once as before (score and peak inside the network's own lung channel) and once
restricted to the segmented field; for each, the share of detection peaks outside the
true lung mask, AUC, pointing (detection peak and explanation peak) and mean
probability on negatives (`eval_report.figures`).

    nice -n 19 python -m inference.training.lung_seg_eval --n 200 --size 512 --detector --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from inference.lung_seg import LungSegmenter, seg_input
from inference.predictor import DEFAULT_CARD, Detector
from inference.training import eval_family as ef
from inference.training import eval_report as er
from inference.training.evaluate import json_safe
from inference.training.phantoms import phantom_dataset
from inference.training.samples import heldout_phantom
from inference.types import Location, PreparedImage


def source_mask(segmenter: LungSegmenter, image: PreparedImage) -> np.ndarray:
    """The segmented lung field of a prepared image, in its source geometry (bool)."""
    x = torch.from_numpy(seg_input(image.model_input))[None, None]
    logits = segmenter.logits(x)[0].cpu().numpy()
    return image.placement.at(logits.shape[0]).map_to_source(logits) > 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, float)
    return {"n": len(v), "mean": float(v.mean()), "median": float(np.median(v)), "p05": float(np.percentile(v, 5)),
            "min": float(v.min()), "share_ge_0.90": float((v >= 0.9).mean())}


def segmentation_figures(detector: Detector, n: int, size: int) -> dict:
    """Dice and plausible-area shares of the detector's segmentation on both families (images prepared
    as the detector reads them), implausible share on abdomen images."""
    segmenter = detector.lungs
    if segmenter is None:
        raise ValueError("the detector ships no lung segmentation")
    sources = {
        "independent": lambda i: (ef.make_case(ef.SEED_BASE + i, size, positive=i % 2 == 0), None),
        "training held-out": lambda i: (None, heldout_phantom("test", i, size)),
    }
    out: dict = {}
    for name, make in sources.items():
        dices, plausible, frontal = [], [], []
        for i in range(n):
            case, ph = make(i)
            ds, truth = (ef.case_dataset(case), case.lung_mask) if case is not None else (phantom_dataset(ph), ph.lung_field)
            image = detector.prepare(ds)
            dices.append(dice(source_mask(segmenter, image), truth))
            field = segmenter.field(image.model_input)
            plausible.append(field.plausible)
            frontal.append(field.plausible and field.frontal)
        out[name] = {"dice": _summary(dices), "plausible_share": float(np.mean(plausible)),
                     "frontal_share": float(np.mean(frontal))}
    flagged = [not segmenter.field(detector.prepare(ef.case_dataset(ef.make_abdomen(ef.SEED_BASE + 500_000 + i, size),
                                                                     body_part="CHEST")).model_input).plausible
               for i in range(max(1, n // 10))]
    out["abdomen labelled CHEST"] = {"implausible_share": float(np.mean(flagged)), "n": len(flagged)}
    return out


class _Recorder:
    """A detector whose `read` also keeps the last detection peak (for `eval_report.read_image`)."""

    def __init__(self, detector: Detector) -> None:
        self.detector, self.input_size = detector, detector.input_size
        self.last: Location | None = None

    def read(self, image):
        prediction, self.last = self.detector.read(image)
        return prediction, self.last


def detection_figures(detector: Detector, n: int, size: int) -> dict:
    """Before (network's own lung channel) and after (segmented field) on the independent family."""
    variants = {"before: network's lung channel": _Recorder(replace_lungs(detector, None)),
                "after: lung segmentation": _Recorder(detector)}
    reads: dict[str, list] = {k: [] for k in variants}
    outside: dict[str, list[bool]] = {k: [] for k in variants}
    for i in range(n):
        case = ef.make_case(ef.SEED_BASE + i, size, positive=i % 2 == 0)
        image = detector.prepare(ef.case_dataset(case))
        truth = er.case_truth(case)
        for name, rec in variants.items():
            reads[name].append(er.read_image(rec, image, truth))
            spot = rec.last
            assert spot is not None
            r, c = int(round(spot.row)), int(round(spot.col))
            outside[name].append(not case.lung_mask[min(r, case.lung_mask.shape[0] - 1), min(c, case.lung_mask.shape[1] - 1)])
    figs = {}
    for name in variants:
        f = er.figures(reads[name])
        f["peaks_outside_lungs"] = float(np.mean(outside[name]))
        f["lung_fields_not_found_share"] = float(np.mean(["lung_fields_not_found" in r.reasons for r in reads[name]]))
        figs[name] = f
    return figs


def replace_lungs(detector: Detector, lungs: LungSegmenter | None) -> Detector:
    """The same detector with another (or no) lung segmentation."""
    return Detector(replace(detector.card, lung_segmentation={}), detector.net, detector.device, detector.review,
                    detector.density, lungs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference.training.lung_seg_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--card", type=Path, default=DEFAULT_CARD)
    p.add_argument("--n", type=int, default=200, help="images per family (abdomen: n / 10)")
    p.add_argument("--size", type=int, default=512, help="long side of the generated images (px)")
    p.add_argument("--detector", action="store_true", help="also the detection figures before and after")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.n < 2 or args.size < 320 or args.threads < 1:
        print("error: --n must be >= 2, --size >= 320 (the node reads no smaller side than 256), --threads >= 1",
              file=sys.stderr)
        return 2
    det = Detector.load(args.card, device="cpu", threads=args.threads)
    if det.lungs is None:
        print(f"error: --card {str(args.card)!r} ships no lung_segmentation", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    figs: dict = {"n": args.n, "size": args.size, "segmentation": segmentation_figures(det, args.n, args.size)}
    print(f"== lung-field segmentation, {args.n} images per family at {args.size} px (Dice against each family's "
          f"own lung masks, the lung behind the heart included)")
    for name, f in figs["segmentation"].items():
        if "dice" in f:
            d = f["dice"]
            print(f"{name:>20}: Dice mean {d['mean']:.3f}, median {d['median']:.3f}, 5th percentile {d['p05']:.3f}, "
                  f"min {d['min']:.3f}, share >= 0.90 {d['share_ge_0.90']:.3f}; field plausible {f['plausible_share']:.3f}, "
                  f"plausible and frontal (two lungs side by side) {f['frontal_share']:.3f}")
        else:
            print(f"{name:>20}: lung fields not found (implausible area or undecided) {f['implausible_share']:.3f} of {f['n']}")
    if args.detector:
        figs["detection"] = detection_figures(det, args.n, args.size)
        print(f"\n== detection on the independent family, {args.n} images at {args.size} px, before and after")
        print(er.side_by_side(figs["detection"]))
        for name, f in figs["detection"].items():
            print(f"{name}: detection peaks outside the true lung mask {f['peaks_outside_lungs']:.3f}, "
                  f"lung_fields_not_found {f['lung_fields_not_found_share']:.3f}")
    figs["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(json_safe(figs), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
