"""Owns measuring a model: metrics, calibration fitting, held-out scoring and `smartnodule eval`.

AUC (rank-based), ECE, Platt fitting and Youden's threshold are plain numpy.
`score_heldout` runs the network (TTA views + Grad-CAM) over generated
held-out phantoms; `summarize` turns that into the figures a card records;
`main` prints the table, with CPU latency and peak RSS, and a last JSON line.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from inference.gradcam import explained_forward
from inference.training import options
from inference.model import HEAD_STRIDE, RADIUS, NoduleNet, model_coord, tta_views
from inference.training.samples import HeldOut, worker_init

SIZE_BINS_MM = ((5.0, 8.0), (8.0, 12.0), (12.0, 18.0), (18.0, 30.0))
POINTING_MARGIN_MM = 3.0
ECE_BINS = 10


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by mid-ranks (ties count half); nan with one class only."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), float)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-width probability bins."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, float)
    idx = np.minimum((probs * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(probs[m].mean() - labels[m].mean())
    return float(total / len(probs))


def fit_platt(scores: np.ndarray, labels: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """(a, b) of p = sigmoid(a*s + b) by Newton's method on the log-loss (Platt's smoothed targets)."""
    s, y = np.asarray(scores, float), np.asarray(labels, float)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    a, b = 1.0, 0.0
    X = np.stack([s, np.ones_like(s)], axis=1)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(a * s + b, -50, 50)))
        g = X.T @ (p - t)
        H = X.T @ (X * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(H, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(a), float(b)


def platt(scores: np.ndarray, a: float, b: float) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(a * np.asarray(scores, float) + b, -50, 50)))


def youden_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """Probability threshold maximising sensitivity + specificity - 1 (midpoint between neighbours)."""
    probs, labels = np.asarray(probs, float), np.asarray(labels).astype(bool)
    cands = np.unique(probs)
    best, best_j = 0.5, -1.0
    for k, c in enumerate(cands):
        pred = probs >= c
        j = pred[labels].mean() + (~pred[~labels]).mean() - 1
        if j > best_j:
            lower = cands[k - 1] if k else c
            best, best_j = float((c + lower) / 2), j
    return float(np.clip(best, 1e-4, 1 - 1e-4))


@dataclass(frozen=True)
class HeldOutScores:
    """Per-image results of `score_heldout` (model-input pixel coordinates)."""

    view_scores: np.ndarray  # (N, V) image score logits per TTA view
    labels: np.ndarray
    diameter_mm: np.ndarray
    contrast: np.ndarray
    true_rc: np.ndarray  # (N, 2)
    true_radius: np.ndarray
    mm_per_px: np.ndarray
    heatmap_rc: np.ndarray  # (N, 2) heatmap argmax
    gradcam_rc: np.ndarray  # (N, 2) Grad-CAM peak
    pred_radius: np.ndarray


def score_batch(net: NoduleNet, images: torch.Tensor, cam_target: str = "head") -> dict[str, torch.Tensor]:
    """TTA scores, heatmap/Grad-CAM peaks (output-map px) and radius (heatmap px) of a batch (B,1,S,S)."""
    b = images.shape[0]
    out, scores, idx, cam = explained_forward(net, tta_views(images), b, cam_target)
    w = out.maps.shape[-1]
    maps = out.maps.detach()[:b]
    log_r = maps[:, RADIUS].flatten(1).gather(1, idx[:b, None])[:, 0]
    cam_idx = cam.flatten(1).argmax(dim=1)
    return {
        "view_scores": scores.view(-1, b).T,
        "heatmap_rc": torch.stack([idx[:b] // w, idx[:b] % w], dim=1).float(),
        "gradcam_rc": torch.stack([cam_idx // w, cam_idx % w], dim=1).float(),
        "radius": torch.exp(log_r.float()),
    }


def score_heldout(net: NoduleNet, split: str, n: int, input_size: int, device: torch.device, workers: int,
                  batch: int = 16, start: int = 0, cam_target: str = "head") -> HeldOutScores:
    """Generate `n` held-out phantoms of `split` and score them."""
    loader = DataLoader(HeldOut(split, n, input_size, start), batch_size=batch, num_workers=workers,
                        worker_init_fn=worker_init if workers else None)
    net.eval()
    cols: dict[str, list[np.ndarray]] = {k: [] for k in HeldOutScores.__dataclass_fields__}
    for s in loader:
        r = score_batch(net, s["image"].to(device), cam_target)
        cols["view_scores"].append(r["view_scores"].cpu().numpy())
        cols["heatmap_rc"].append(model_coord(r["heatmap_rc"].cpu().numpy()))
        cols["gradcam_rc"].append(model_coord(r["gradcam_rc"].cpu().numpy()))
        cols["pred_radius"].append(r["radius"].cpu().numpy() * HEAD_STRIDE)
        cols["labels"].append(s["label"].numpy())
        cols["diameter_mm"].append(s["diameter_mm"].numpy())
        cols["contrast"].append(s["contrast"].numpy())
        cols["true_rc"].append(torch.stack([s["row"], s["col"]], dim=1).numpy())
        cols["true_radius"].append(s["radius"].numpy())
        cols["mm_per_px"].append(s["mm_per_px"].numpy())
    return HeldOutScores(**{k: np.concatenate(v) for k, v in cols.items()})


def pointing_hits(rc: np.ndarray, r: HeldOutScores) -> np.ndarray:
    """Per positive: peak within the nodule radius plus POINTING_MARGIN_MM."""
    pos = r.labels > 0
    dist = np.hypot(*(rc[pos] - r.true_rc[pos]).T)
    return dist <= r.true_radius[pos] + POINTING_MARGIN_MM / r.mm_per_px[pos]


def summarize(r: HeldOutScores, a: float, b: float, threshold: float, margin: float, max_uncertainty: float) -> dict:
    """The figures of the eval table (probabilities from mean TTA score, uncertainty = std over views)."""
    y = r.labels > 0
    probs = platt(r.view_scores.mean(axis=1), a, b)
    unc = platt(r.view_scores, a, b).std(axis=1)
    pred = probs >= threshold
    review = (np.abs(probs - threshold) < margin) | (unc > max_uncertainty)
    errors = pred != y
    figs: dict = {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "auc": auc(probs, y),
        "sensitivity": float(pred[y].mean()),
        "specificity": float((~pred[~y]).mean()),
        "threshold": threshold,
        "ece": ece(probs, y),
        "auc_by_size": {},
        "auc_by_contrast": {},
        "errors": int(errors.sum()),
        "review_rate": float(review.mean()),
        "errors_flagged": int((errors & review).sum()),
        "high_uncertainty": int((unc > max_uncertainty).sum()),
        "errors_high_uncertainty": int((errors & (unc > max_uncertainty)).sum()),
        "error_rate_uncertain": float(errors[unc > np.median(unc)].mean()),
        "error_rate_certain": float(errors[unc <= np.median(unc)].mean()),
    }
    for lo, hi in SIZE_BINS_MM:
        m = (~y) | ((r.diameter_mm >= lo) & (r.diameter_mm < hi))
        figs["auc_by_size"][f"{lo:g}-{hi:g}mm"] = {"auc": auc(probs[m], y[m]), "n_pos": int((m & y).sum())}
    cuts = np.quantile(r.contrast[y], [1 / 3, 2 / 3]) if y.any() else [0, 0]
    tertile = np.digitize(r.contrast, cuts)
    for t, name in enumerate(("low", "mid", "high")):
        m = (~y) | (tertile == t)
        figs["auc_by_contrast"][name] = {"auc": auc(probs[m], y[m]), "n_pos": int((m & y).sum())}
    hit = pointing_hits(r.heatmap_rc, r)
    rel = np.abs(r.pred_radius[y][hit] - r.true_radius[y][hit]) / r.true_radius[y][hit]
    figs["radius_rel_error_median"] = float(np.median(rel)) if len(rel) else float("nan")
    for source in ("heatmap", "gradcam"):
        hits = pointing_hits(getattr(r, f"{source}_rc"), r)
        figs[f"pointing_{source}"] = float(hits.mean()) if len(hits) else float("nan")
        by_size = {}
        for lo, hi in SIZE_BINS_MM:
            m = (r.diameter_mm[y] >= lo) & (r.diameter_mm[y] < hi)
            by_size[f"{lo:g}-{hi:g}mm"] = float(hits[m].mean()) if m.any() else float("nan")
        figs[f"pointing_{source}_by_size"] = by_size
    return figs


def json_safe(obj):
    """`obj` with NaN/inf floats replaced by None, so it dumps as strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _phantom_dicom(seed: int, size: int):
    from inference.training.phantoms import generate_phantom, phantom_dataset

    return phantom_dataset(generate_phantom(seed, size=size, nodule=True))


def latency(detector, n: int, size: int) -> dict:
    """Median seconds of prepare, predict without and with Grad-CAM on `n` full-size phantom DICOMs.

    The phantoms are generated in a child process, so the peak RSS read
    afterwards is the serving path's (model, dataset, prepare, predict).
    """
    from inference.preprocess import prepare

    with multiprocessing.get_context("fork").Pool(1) as pool:
        datasets = pool.starmap(_phantom_dicom, [(3_000_000 + i, size) for i in range(n + 1)])
    prep, pred, full = [], [], []
    for i, ds in enumerate(datasets):
        t0 = time.perf_counter()
        image = prepare(ds, input_size=detector.input_size)
        t1 = time.perf_counter()
        detector.probability(image)
        t2 = time.perf_counter()
        detector.predict(image)
        t3 = time.perf_counter()
        if i:  # the first image warms up
            prep.append(t1 - t0), pred.append(t2 - t1), full.append(t3 - t2)
    return {
        "latency_predict_s": statistics.median(pred),
        "latency_explain_s": statistics.median(full),
        "latency_total_s": statistics.median(prep) + statistics.median(full),
        "latency_images": n,
        "latency_size": size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_1min": os.getloadavg()[0],
    }



def run(args: argparse.Namespace) -> int:
    """Print the families side by side, the robustness and OOD tables, latency, and a last JSON line."""
    from inference.training import eval_report as er
    from inference.predictor import Detector

    det = Detector.load(args.card, device=args.device, threads=args.threads)
    size = args.size or det.input_size
    figs: dict = {"model": {"name": det.identity.name, "version": det.identity.version}, "size": size}
    t0 = time.perf_counter()
    families = {name: er.figures(er.read_cases(det, er.family_cases(name, args.n, size)))
                for name in ("training", "independent")}
    if args.data is not None:
        families["folder"] = er.figures(er.read_folder(det, args.data, args.labels))
    figs["families"] = families
    print(f"== families side by side ({args.n} images each at {size} px; training = held-out test split of "
          f"inference/training/phantoms.py, independent = inference/training/eval_family.py)")
    print(er.side_by_side(families), flush=True)
    keys = ("auc", "pointing_detection", "pointing_gradcam", "mean_p_negative", "confident_fp", "review_share")
    if args.ood_n:
        ood = {name: er.figures(er.read_ood_set(det, name, args.ood_n, size)) for name in er.OOD_SETS}
        figs["out_of_distribution"] = ood
        print(f"\n== not what the model reads ({args.ood_n} images per set, all without a finding)")
        print(er.transposed(ood, ("review_or_skipped", "ood_share", "confident_fp", "confident_fp_without_ood_gate",
                                  "mean_p_negative", "ood_score_median")), flush=True)
    if args.robust_n:
        robust = {name: er.figures(er.read_cases(det, (fn(c) for c in er.family_cases(args.robust_family, args.robust_n, size))))
                  for name, fn in er.PERTURBATIONS.items()}
        figs["robustness"] = robust
        print(f"\n== robustness: {args.robust_family} family, {args.robust_n} images per perturbation")
        print(er.transposed(robust, keys), flush=True)
    figs["scoring_s"] = time.perf_counter() - t0
    if args.latency_images:
        cpu = det if det.device.type == "cpu" else Detector.load(args.card, device="cpu", threads=args.threads)
        lat = latency(cpu, args.latency_images, args.latency_size)
        figs["latency"] = lat
        print(f"\n== latency, {args.latency_size} px, median of {args.latency_images}: prepare+predict+explain "
              f"{lat['latency_total_s']:.3f} s, predict only {lat['latency_predict_s']:.3f} s, "
              f"peak RSS {lat['peak_rss_mb']:.0f} MB, load {lat['load_average_1min']:.2f}")
    print(json.dumps(json_safe(figs), sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smartnodule eval", description=__doc__)
    options.evaluate(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
