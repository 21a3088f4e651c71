"""The arguments of `smartnodule train` and `smartnodule eval`, apart from the code they run.

Nothing here imports torch, so building the CLI's parser (for `check-config`,
`jobs`, ...) does not load it; `inference/commands.py` imports the training
modules only when one of these commands runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from inference.training import progress
from inference.types import DEVICES

# `smartnodule eval`'s image families (inference.training.eval_report.family_cases)
FAMILIES = ("training", "varied", "independent")


def _families(text: str) -> tuple[str, ...]:
    """`--families`: known families, comma-separated, at least one."""
    names = tuple(n for n in text.split(",") if n)
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown families {unknown}; known: {', '.join(FAMILIES)}" if unknown
                                         else "name at least one family")
    return names


def _positive_mm(text: str) -> float:
    """`--mm-per-px`: a physical scale in (0, 10) mm per model pixel."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value < 10.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 10) mm, got {value}")
    return value


def _kinds(text: str) -> str:
    """`--hold-out`: known kinds of the varied generator, comma-separated (imported only when the option is given)."""
    from inference.training.variety import check_kinds

    try:
        check_kinds((k for k in text.split(",") if k), "kinds")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for weights, card and log")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when available (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget of the training loop")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers generating phantoms")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads in the main process")
    p.add_argument("--batch", type=int, default=32, help="images per optimiser step (default: %(default)s)")
    p.add_argument("--input-size", type=int, default=512, help="the model's square input in pixels (default: %(default)s)")
    p.add_argument("--mm-per-px", type=_positive_mm, default=None, metavar="MM",
                   help="physical scale of the model input: images are resampled from their pixel spacing to MM "
                        "millimetres per model pixel (default: fitted, the longer side fills the input)")
    p.add_argument("--curriculum", default="scratch", choices=("scratch", "fine-tune"),
                   help="nodule gain over the time budget: scratch 3 -> 1 with large nodules first; fine-tune "
                        "1.5 -> 1 at the generator's own sizes (default: %(default)s)")
    p.add_argument("--crop", type=int, default=None, metavar="PX",
                   help="train on PX x PX windows of the images (a multiple of 32; most positives' windows hold the "
                        "finding, the others lie on the lungs): cheaper steps; calibration and test read whole images")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--replay", type=int, default=None, help="replay steps per fresh batch (default 4 on cuda, 0 on cpu)")
    p.add_argument("--buffer", type=int, default=2048, help="replay buffer capacity (samples)")
    p.add_argument("--calib-n", type=int, default=1000, help="held-out phantoms for calibration (default: %(default)s)")
    p.add_argument("--test-n", type=int, default=1000, help="held-out phantoms for the card's test figures (default: %(default)s)")
    p.add_argument("--backbone", default="resnet10t", help="timm architecture name (default: %(default)s)")
    p.add_argument("--name", default="smartnodule-nodule", help="model name in the card and the SR (default: %(default)s)")
    p.add_argument("--version", default="1.0.0", help="model version in the card and the SR (default: %(default)s)")
    p.add_argument("--log-every", type=float, default=15.0, help="seconds between progress lines")
    p.add_argument("--data", type=Path, default=None, help="train on a labelled folder (NODE21 layout) instead of phantoms")
    p.add_argument("--labels", type=Path, default=None, help="its CSV (default: the only .csv in --data)")
    p.add_argument("--init", type=Path, default=None, help="model card whose weights training starts from")
    p.add_argument("--generator", default="phantom", choices=("phantom", "varied"),
                   help="training images: the default phantoms, or the varied generator (inference.training.variety)")
    p.add_argument("--hold-out", type=_kinds, default="", metavar="KINDS",
                   help="comma-separated kinds of variation the varied generator leaves out (e.g. devices,text)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI to log the run to (default: $MLFLOW_TRACKING_URI; none: not logged)")
    p.add_argument("--experiment", default="smartnodule-train", help="MLflow experiment of the run")
    progress.add_option(p)


def evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=200, help="images per family, half with a finding (default 200)")
    p.add_argument("--size", type=int, default=None, help="long side of generated images (default: the model's input size)")
    p.add_argument("--robust-n", type=int, default=100, help="independent-family images per perturbation (0: skip)")
    p.add_argument("--families", type=_families, default=FAMILIES, metavar="NAMES",
                   help=f"comma-separated families to score side by side (default: {','.join(FAMILIES)})")
    p.add_argument("--robust-family", default="independent", choices=FAMILIES,
                   help="the family the perturbations are applied to")
    p.add_argument("--ood-n", type=int, default=40, help="images per out-of-distribution set (0: skip)")
    p.add_argument("--data", type=Path, default=None, help="a labelled folder (NODE21 layout) to evaluate as well")
    p.add_argument("--labels", type=Path, default=None, help="its CSV (default: the only .csv in --data)")
    p.add_argument("--card", type=Path, default=None, help="model card (default: the shipped one)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when available (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--latency-images", type=int, default=3, help="2048 px DICOM phantoms timed on CPU (0: skip)")
    p.add_argument("--latency-size", type=int, default=2048, help="their width and height in pixels (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("eval-report"),
                   help="folder for report.txt, figures.json and the ROC, reliability and risk-coverage plots "
                        "(default: ./eval-report)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI to log figures and plots to (default: $MLFLOW_TRACKING_URI; none: not logged)")
    p.add_argument("--experiment", default="smartnodule-eval", help="MLflow experiment of the run")
    progress.add_option(p)
