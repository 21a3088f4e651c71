"""Owns the inference subcommands of the `smartnodule` CLI: predict, train, eval.

`node/cli.py` calls `register(subparsers)`; each subcommand sets `func`,
which takes the parsed namespace and returns the exit status.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from inference.training import options


def register(subparsers) -> None:
    """Add `predict`, `train` and `eval` to an argparse subparsers object (without importing torch)."""
    p = subparsers.add_parser("predict", help="run the model on DICOM files (no network, no database)")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="DICOM files")
    p.add_argument("--json", action="store_true", help="one JSON object per file")
    p.add_argument("--config", type=Path, default=None, help="settings file ([model] section: card, device, threads, review)")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("train", help="train the nodule model on synthetic phantoms")
    options.train(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="evaluate a model card on held-out phantoms")
    options.evaluate(p)
    p.set_defaults(func=cmd_eval)


def predict_file(detector, path: Path) -> dict:
    """The `predict --json` record of one file: processed, skipped (not applicable) or rejected (unreadable)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from inference.types import NotApplicable, Unreadable

    record: dict = {"file": str(path), "sop_instance_uid": None, "outcome": "processed", "reason": None,
                    "probability": None, "uncertainty": None, "review": None, "location": None,
                    "model": {"name": detector.identity.name, "version": detector.identity.version}}
    try:
        ds = pydicom.dcmread(path)
        record["sop_instance_uid"] = str(ds.get("SOPInstanceUID", "")) or None
        image = detector.prepare(ds)
    except NotApplicable as exc:
        return record | {"outcome": "skipped", "reason": exc.reason}
    except Unreadable as exc:
        return record | {"outcome": "rejected", "reason": exc.reason}
    except (InvalidDicomError, OSError) as exc:
        return record | {"outcome": "rejected", "reason": f"not a readable DICOM file: {exc}"}
    pred = detector.predict(image)
    loc = pred.location
    return record | {
        "probability": round(pred.probability, 6),
        "uncertainty": round(pred.uncertainty, 6),
        "positive": pred.positive,
        "review": pred.review,
        "review_reasons": list(pred.review_reasons),
        "ood_score": None if pred.ood_score is None else round(pred.ood_score, 2),
        "location": None if loc is None else {"row": round(loc.row, 1), "col": round(loc.col, 1), "radius": round(loc.radius, 1)},
    }


def cmd_predict(args: argparse.Namespace) -> int:
    from config.settings import load_settings
    from inference.predictor import Detector

    detector = Detector.from_settings(load_settings(args.config).model)
    status = 0
    for path in args.files:
        r = predict_file(detector, path)
        if r["outcome"] == "rejected":
            status = 1
        if args.json:
            print(json.dumps(r), flush=True)
        elif r["outcome"] == "processed":
            where = "" if r["location"] is None else f" at row {r['location']['row']}, col {r['location']['col']}"
            flag = f" REVIEW ({', '.join(r['review_reasons'])})" if r["review"] else ""
            print(f"{path}: p={r['probability']:.3f} ±{r['uncertainty']:.3f} "
                  f"{'POSITIVE' if r['positive'] else 'negative'}{flag}{where}", flush=True)
        else:
            print(f"{path}: {r['outcome']}: {r['reason']}", flush=True)
    return status


def cmd_train(args: argparse.Namespace) -> int:
    from inference.training import train

    return train.run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from inference.training import evaluate

    return evaluate.run(args)
