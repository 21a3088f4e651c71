"""Owns running a model over images to measure it: held-out scoring for training and the `smartnodule eval` command.

`score_heldout` runs the network (TTA views + Grad-CAM) over generated
held-out phantoms; `summarize` turns that into the figures a card records.
`run` (`smartnodule eval`) reads each source through the serving path
(`inference.training.eval_report`, which owns the figures and tables), with one
progress bar and ETA over all images, writes the report, `figures.json` and
the ROC, reliability and risk-coverage plots (`inference.training.eval_plots`)
into `--out`, logs them with the figures to MLflow when given a tracking URI,
measures CPU latency and peak RSS, and prints a last JSON line.
The numbers themselves are `inference.training.metrics`'.
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from inference.gradcam import explained_forward
from inference.model import HEAD_STRIDE, RADIUS, NoduleNet, model_coord, tta_views
from inference.training import eval_plots, eval_report, options, progress, tracking
from inference.training.labelled_folder import read_labels
from inference.training.metrics import POINTING_MARGIN_MM, auc, ece, json_safe, platt
from inference.training.samples import HeldOut, ModelImages, worker_init

SIZE_BINS_MM = ((5.0, 8.0), (8.0, 12.0), (12.0, 18.0), (18.0, 30.0))


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


def score_heldout(net: NoduleNet, images: ModelImages, split: str, n: int, device: torch.device, workers: int,
                  batch: int = 16, start: int = 0, cam_target: str = "head", progress_mode: str = "never"
                  ) -> HeldOutScores:
    """Generate `n` held-out images of `split` as `images` says and score them (a bar per batch when
    `progress_mode` says so)."""
    loader = DataLoader(HeldOut(images, split, n, start), batch_size=batch, num_workers=workers,
                        worker_init_fn=worker_init if workers else None)
    net.eval()
    cols: dict[str, list[np.ndarray]] = {k: [] for k in HeldOutScores.__dataclass_fields__}
    for s in progress.bar(progress_mode, loader, total=len(loader), desc=f"scoring {split} ({n} phantoms)", unit="batch"):
        r = score_batch(net, s["image"].to(device), cam_target)
        cols["view_scores"].append(r["view_scores"].cpu().numpy())
        cols["heatmap_rc"].append(np.asarray(model_coord(r["heatmap_rc"].cpu().numpy())))
        cols["gradcam_rc"].append(np.asarray(model_coord(r["gradcam_rc"].cpu().numpy())))
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


def _share(flags: np.ndarray) -> float:
    """The share of True in `flags`; NaN (a "-" in the tables) for none, without numpy's empty-mean warning."""
    return float(flags.mean()) if len(flags) else float("nan")


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
        "sensitivity": _share(pred[y]),
        "specificity": _share(~pred[~y]),
        "threshold": threshold,
        "ece": ece(probs, y),
        "auc_by_size": {},
        "auc_by_contrast": {},
        "errors": int(errors.sum()),
        "review_rate": float(review.mean()),
        "errors_flagged": int((errors & review).sum()),
        "high_uncertainty": int((unc > max_uncertainty).sum()),
        "errors_high_uncertainty": int((errors & (unc > max_uncertainty)).sum()),
        "error_rate_uncertain": _share(errors[unc > np.median(unc)]),  # empty when every view agrees alike
        "error_rate_certain": _share(errors[unc <= np.median(unc)]),
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


def _phantom_dicom(seed: int, size: int):
    from inference.training.phantoms import generate_phantom, phantom_dataset

    return phantom_dataset(generate_phantom(seed, size=size, nodule=True))


def latency(detector, n: int, size: int) -> dict:
    """Median seconds of prepare, predict without and with Grad-CAM on `n` full-size phantom DICOMs.

    The phantoms are generated in a child process, so the peak RSS read
    afterwards is the serving path's (model, dataset, prepare, predict).
    """

    with multiprocessing.get_context("fork").Pool(1) as pool:
        datasets = pool.starmap(_phantom_dicom, [(3_000_000 + i, size) for i in range(n + 1)])
    prep, pred, full = [], [], []
    for i, ds in enumerate(datasets):
        t0 = time.perf_counter()
        image = detector.prepare(ds)
        t1 = time.perf_counter()
        detector.probability(image)
        t2 = time.perf_counter()
        detector.predict(image)
        t3 = time.perf_counter()
        if i:  # the first image warms up
            prep.append(t1 - t0)
            pred.append(t2 - t1)
            full.append(t3 - t2)
    return {
        "latency_predict_s": statistics.median(pred),
        "latency_explain_s": statistics.median(full),
        "latency_total_s": statistics.median(prep) + statistics.median(full),
        "latency_images": n,
        "latency_size": size,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_1min": os.getloadavg()[0],
    }



@dataclass(frozen=True)
class Source:
    """One column or row of the eval report: its images (`items`) and the eval_report function that reads them."""

    section: str  # families, out_of_distribution, robustness
    name: str
    n: int
    items: Iterable
    reader: Callable


def sources(args: argparse.Namespace, size: int) -> list[Source]:
    """What `smartnodule eval` reads, in the report's order (generators: images are made as they are read)."""
    er = eval_report
    found = [Source("families", name, args.n, er.family_cases(name, args.n, size), er.read_cases)
             for name in args.families]
    if args.data is not None:
        items = read_labels(args.data, args.labels)
        found.append(Source("families", "folder", len(items), items, er.read_folder_items))
    found += [Source("out_of_distribution", name, args.ood_n, er.ood_cases(name, args.ood_n, size), er.read_ood_cases)
              for name in er.OOD_SETS if args.ood_n]
    # map binds each perturbation now; a generator expression here would read `fn` late, and every row would
    # then get the last perturbation
    found += [Source("robustness", name, args.robust_n,
                     map(fn, er.family_cases(args.robust_family, args.robust_n, size)), er.read_cases)
              for name, fn in er.PERTURBATIONS.items() if args.robust_n]
    return found


def _counted(items: Iterable, bar, desc: str) -> Iterator:
    bar.set_description(desc)
    for item in items:
        yield item
        bar.update(1)


def run(args: argparse.Namespace) -> int:
    """Print the families side by side, the OOD and robustness tables, latency, and a last JSON line; write the
    report, figures and plots into `args.out` and log them to MLflow when a tracking URI is given."""
    from inference.predictor import Detector

    er = eval_report
    det = Detector.load(args.card, device=args.device, threads=args.threads)
    size = args.size or det.input_size
    args.out.mkdir(parents=True, exist_ok=True)
    figs: dict = {"model": {"name": det.identity.name, "version": det.identity.version}, "size": size}
    report: list[str] = []
    headers = {
        "families": f"== families side by side ({args.n} images each at {size} px; training = held-out test split of "
                    f"inference/training/phantoms.py, varied = held-out test split of inference/training/variety.py, "
                    f"independent = inference/training/eval_family.py;\n"
                    f"   AURC: risk-coverage, cases accepted by confidence |p - threshold|; confident FP: negatives with "
                    f"p >= {er.CONFIDENT} not sent to review)",
        "out_of_distribution": f"\n== not what the model reads ({args.ood_n} images per set, all without a finding)",
        "robustness": f"\n== robustness: {args.robust_family} family, {args.robust_n} images per perturbation"}
    columns = {"out_of_distribution": ("review_or_skipped", "ood_share", "confident_fp", "confident_fp_without_ood_gate",
                                       "mean_p_negative", "ood_score_median"),
               "robustness": ("auc", "aurc", "pointing_detection", "pointing_gradcam", "mean_p_negative", "confident_fp",
                              "review_share")}

    def say(text: str) -> None:
        report.append(text)
        progress.write(text)

    todo = sources(args, size)
    reads: dict[str, dict[str, list]] = {}
    t0 = time.perf_counter()
    with progress.bar(args.progress, total=sum(s.n for s in todo), unit="img") as bar:
        for section in headers:
            group = [s for s in todo if s.section == section]
            if not group:
                continue
            reads[section] = {s.name: s.reader(det, _counted(s.items, bar, f"{section}: {s.name}")) for s in group}
            figs[section] = table = {name: er.figures(r) for name, r in reads[section].items()}
            say(headers[section])
            say(er.side_by_side(table) if section == "families" else er.transposed(table, columns[section]))
    figs["scoring_s"] = time.perf_counter() - t0
    if args.latency_images:
        cpu = det if det.device.type == "cpu" else Detector.load(args.card, device="cpu", threads=args.threads)
        lat = latency(cpu, args.latency_images, args.latency_size)
        figs["latency"] = lat
        say(f"\n== latency, {args.latency_size} px, median of {args.latency_images}: prepare+predict+explain "
            f"{lat['latency_total_s']:.3f} s, predict only {lat['latency_predict_s']:.3f} s, "
            f"peak RSS {lat['peak_rss_mb']:.0f} MB, load {lat['load_average_1min']:.2f}")
    files = eval_plots.write_plots(reads["families"], args.out)
    (args.out / "report.txt").write_text("\n".join(report) + "\n")
    (args.out / "figures.json").write_text(json.dumps(json_safe(figs), sort_keys=True, indent=1))
    files += [args.out / "report.txt", args.out / "figures.json"]
    progress.write(f"\nwrote {', '.join(str(f) for f in files)}")
    uri = tracking.tracking_uri(args.tracking_uri)
    if uri is not None:
        figs["mlflow_run_id"] = tracking.log_run(
            uri, args.experiment, f"eval-{det.identity.name}-{det.identity.version}",
            {"model": f"{det.identity.name} {det.identity.version}", "n": args.n, "size": size, "ood_n": args.ood_n,
             "robust_n": args.robust_n, "robust_family": args.robust_family, "data": args.data, "card": args.card},
            {f"{family}_{k}": v for family, f in figs["families"].items() for k, v in f.items()}, files)
        progress.write(f"logged to MLflow: run {figs['mlflow_run_id']} in experiment {args.experiment!r} at {uri}")
    print(json.dumps(json_safe(figs), sort_keys=True), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="smartnodule eval", description=__doc__)
    options.evaluate(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
