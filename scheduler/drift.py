"""Drift check: recent cases against the reference window kept from the model's validation set.

The reference (`drift_reference.npz` beside the model card) holds, per held-out
phantom the model saw: calibrated probability, uncertainty, display-image
exposure mean and std, rows, columns, bits stored, manufacturer, pixel spacing,
and a sample of embeddings. `build_reference` makes it by running the Detector
on generated phantoms through the DICOM path (`python -m scheduler.drift`).

The recent window is the jobs encoded in the last `drift_window_days`, at most
the last `drift_window_jobs`; image statistics are read back from their spool
files (those still present). Statistics (numpy only): population stability
index and two-sample Kolmogorov-Smirnov on probability, uncertainty, exposure
mean and std; total variation distance on manufacturer, image size and bits
stored; mean-embedding shift relative to the reference spread; against final
expert verdicts, sensitivity, specificity and ECE. A breach is any figure past
its threshold in `[scheduler]`.
"""
from __future__ import annotations

import argparse
import json
import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import structlog
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from config.settings import Settings
from node.store.db import Job, utcnow
from node.store.review import outcomes

log = structlog.get_logger(__name__)

REFERENCE_FILE = "drift_reference.npz"
CONTINUOUS = ("probability", "uncertainty", "exposure_mean", "exposure_std")
CATEGORIES = ("manufacturer", "size", "bits_stored")
REFERENCE_INDEX0 = 500_000  # calibration-split indices: far from the card's calibration (0..999)


# --- statistics -------------------------------------------------------------------------------------------

def psi(reference: np.ndarray, current: np.ndarray, bins: int | None = None) -> float:
    """Population stability index over the reference's quantile bins.

    Default bins: 10, fewer for small samples (one per 10 cases of the smaller
    sample, at least 3), so two samples of one distribution stay near 0.
    """
    reference, current = np.asarray(reference, float), np.asarray(current, float)
    bins = bins or int(min(10, max(3, min(len(reference), len(current)) // 10)))
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if len(edges) < 3:
        edges = np.array([-np.inf, float(np.median(reference)), np.inf])
    edges[0], edges[-1] = -np.inf, np.inf
    ref = np.histogram(reference, edges)[0] / len(reference)
    cur = np.histogram(current, edges)[0] / len(current)
    ref, cur = np.clip(ref, 1e-4, None), np.clip(cur, 1e-4, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic p-value (Stephens' correction)."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    values = np.concatenate([a, b])
    d = float(np.max(np.abs(np.searchsorted(a, values, "right") / len(a) - np.searchsorted(b, values, "right") / len(b))))
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 1e-3:
        return d, 1.0
    k = np.arange(1, 101)
    p = float(2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k**2 * lam**2)))
    return d, float(min(1.0, max(0.0, p)))


def total_variation(reference: list, current: list) -> float:
    keys = set(reference) | set(current)
    ref = {k: reference.count(k) / len(reference) for k in keys}
    cur = {k: current.count(k) / len(current) for k in keys}
    return float(0.5 * sum(abs(ref[k] - cur[k]) for k in keys))


def embedding_shift(reference: np.ndarray, current: np.ndarray) -> float:
    """Distance between mean embeddings over the reference's RMS distance to its own mean."""
    mean = reference.mean(axis=0)
    spread = math.sqrt(float(np.mean(np.sum((reference - mean) ** 2, axis=1)))) or 1e-9
    return float(np.linalg.norm(current.mean(axis=0) - mean) / spread)


# --- image statistics -------------------------------------------------------------------------------------

def image_stats(ds, prepared) -> dict:
    """What the drift check compares of one image: exposure of the display image and acquisition header."""
    display = prepared.display
    spacing = prepared.pixel_spacing_mm
    return {"exposure_mean": float(display.mean()), "exposure_std": float(display.std()),
            "rows": int(ds.Rows), "cols": int(ds.Columns), "bits_stored": int(ds.BitsStored),
            "manufacturer": str(ds.get("Manufacturer", "") or "unknown"),
            "pixel_spacing": float(spacing[0]) if spacing else float("nan")}


def build_reference(card_path: Path | None, out: Path, n: int = 120, size: int = 512, index0: int = REFERENCE_INDEX0,
                    detector=None, generator: str | None = None) -> Path:
    """Run the Detector on `n` held-out images of `generator` (default: the one its model was trained on;
    DICOM path, stored as the generator chose) and write the reference NPZ to `out`."""
    from inference.predictor import Detector
    from inference.training.eval_report import heldout_dataset
    from inference.training.samples import HELD_OUT_GAIN, trained_generator

    detector = detector or Detector.load(card_path, device="cpu")
    generator = generator or trained_generator(detector.card)
    rows: list[dict] = []
    embeddings = []
    for i in range(index0, index0 + n):
        _, ds = heldout_dataset("calibration", i, size, generator)
        prepared = detector.prepare(ds)
        p = detector.predict(prepared)
        rows.append({"probability": p.probability, "uncertainty": p.uncertainty, **image_stats(ds, prepared)})
        embeddings.append(p.embedding)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(  # numpy's stub checks **arrays against allow_pickle: bool
        out, **{k: np.array([r[k] for r in rows]) for k in rows[0]},  # type: ignore[arg-type]
        embeddings=np.stack(embeddings).astype(np.float16),
        meta=np.array(json.dumps({"model": detector.identity.name, "version": detector.identity.version,
                                  "weights_sha256": detector.identity.weights_sha256, "n": n, "size": size,
                                  "phantoms": f"{generator} generator, calibration split {index0}..{index0 + n - 1}, "
                                              f"gain {HELD_OUT_GAIN}"})))
    return out


def load_reference(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        ref = {k: z[k] for k in z.files}
    ref["meta"] = json.loads(str(ref["meta"]))
    ref["embeddings"] = ref["embeddings"].astype(np.float32)
    return ref


def reference_path(settings: Settings, card_path: Path | None = None) -> Path:
    """The reference beside the card in service (shipped card by default)."""
    from scheduler.registry import shipped_card

    return Path(card_path or shipped_card(settings)).parent / REFERENCE_FILE


# --- the check --------------------------------------------------------------------------------------------

def recent_window(settings: Settings, sessions: sessionmaker) -> list[dict]:
    """The recent cases: jobs with a prediction, last `drift_window_days`, at most `drift_window_jobs`."""
    from pydicom import dcmread

    from inference.preprocess import prepare

    cfg = settings.scheduler
    since = utcnow() - timedelta(days=cfg.drift_window_days)
    with sessions() as session:
        jobs = list(session.scalars(select(Job).where(Job.probability.is_not(None), Job.encoded_at >= since)
                                    .order_by(Job.encoded_at.desc(), Job.id.desc()).limit(cfg.drift_window_jobs)))
        verdicts = outcomes(session, [j.id for j in jobs])
    cases = []
    for job in jobs:
        case = {"job_id": job.id, "probability": job.probability, "uncertainty": job.uncertainty,
                "positive": job.positive, "model_version": job.model_version,
                "embedding": np.frombuffer(job.embedding, np.float32) if job.embedding else None,
                "verdict": verdicts[job.id].label}
        try:
            ds = dcmread(job.spool_path)
            case.update(image_stats(ds, prepare(ds, input_size=64)))
        except Exception:  # spool purged or unreadable: image statistics missing for this case
            pass
        cases.append(case)
    return cases


def compare(settings: Settings, reference: dict, cases: list[dict]) -> dict:
    """Figures and breaches of `cases` against `reference` (JSON-ready)."""
    cfg = settings.scheduler
    report: dict = {"cases": len(cases), "reference": reference["meta"], "figures": {}, "breaches": []}
    if len(cases) < cfg.drift_min_cases:
        report["status"] = f"too few recent cases ({len(cases)} < {cfg.drift_min_cases}): not judged"
        return report
    figs = report["figures"]
    for name in CONTINUOUS:
        values = np.array([c[name] for c in cases if c.get(name) is not None and np.isfinite(c[name])], float)
        if len(values) < cfg.drift_min_cases:
            continue
        d, p = ks_2samp(reference[name], values)
        figs[name] = {"psi": round(psi(reference[name], values), 4), "ks_d": round(d, 4), "ks_p": float(f"{p:.3g}"),
                      "reference_mean": round(float(np.mean(reference[name])), 4),
                      "recent_mean": round(float(values.mean()), 4), "n": len(values)}
        if figs[name]["psi"] > cfg.drift_psi_max:
            report["breaches"].append(f"{name}: PSI {figs[name]['psi']} > {cfg.drift_psi_max}")
        if p < cfg.drift_ks_p_min:
            report["breaches"].append(f"{name}: KS p {p:.3g} < {cfg.drift_ks_p_min} (D {d:.3f})")
    with_header = [c for c in cases if "rows" in c]
    if len(with_header) >= cfg.drift_min_cases:
        ref_cats: dict[str, list] = {"manufacturer": [str(m) for m in reference["manufacturer"]],
                                     "size": [f"{r}x{c}" for r, c in zip(reference["rows"], reference["cols"])],
                                     "bits_stored": [int(b) for b in reference["bits_stored"]]}
        cur_cats = {"manufacturer": [c["manufacturer"] for c in with_header],
                    "size": [f"{c['rows']}x{c['cols']}" for c in with_header],
                    "bits_stored": [c["bits_stored"] for c in with_header]}
        for name in CATEGORIES:
            tv = round(total_variation(ref_cats[name], cur_cats[name]), 4)
            top = max(set(cur_cats[name]), key=cur_cats[name].count)
            figs[name] = {"total_variation": tv, "recent_most_common": str(top)}
            if tv > cfg.drift_category_max:
                report["breaches"].append(f"{name}: total variation {tv} > {cfg.drift_category_max} (recent mostly {top})")
        spacing = np.array([c["pixel_spacing"] for c in with_header], float)
        figs["pixel_spacing"] = {"reference_median": float(np.nanmedian(reference["pixel_spacing"])),
                                 "recent_median": float(np.nanmedian(spacing)) if np.isfinite(spacing).any() else None}
    emb = [c["embedding"] for c in cases if c.get("embedding") is not None
           and len(c["embedding"]) == reference["embeddings"].shape[1]]
    if len(emb) >= cfg.drift_min_cases:
        shift = round(embedding_shift(reference["embeddings"], np.stack(emb)), 4)
        figs["embedding"] = {"mean_shift_in_spreads": shift, "n": len(emb)}
        if shift > cfg.drift_embedding_max:
            report["breaches"].append(f"embedding: mean shift {shift} reference spreads > {cfg.drift_embedding_max}")
    judged = [c for c in cases if c.get("verdict") is not None]
    if len(judged) >= cfg.drift_min_verdicts:
        from inference.training.metrics import ece

        truth = np.array([c["verdict"] == "present" for c in judged])
        pred = np.array([bool(c["positive"]) for c in judged])
        probs = np.array([c["probability"] for c in judged], float)
        sens = float(pred[truth].mean()) if truth.any() else None
        spec = float((~pred[~truth]).mean()) if (~truth).any() else None
        cal = ece(probs, truth.astype(float))
        figs["verdicts"] = {"n": len(judged), "sensitivity": sens, "specificity": spec, "ece": round(cal, 4)}
        if sens is not None and sens < cfg.drift_sensitivity_min:
            report["breaches"].append(f"sensitivity {sens:.3f} < {cfg.drift_sensitivity_min} against {len(judged)} final verdicts")
        if spec is not None and spec < cfg.drift_specificity_min:
            report["breaches"].append(f"specificity {spec:.3f} < {cfg.drift_specificity_min}")
        if cal > cfg.drift_ece_max:
            report["breaches"].append(f"ECE {cal:.3f} > {cfg.drift_ece_max}")
    else:
        figs["verdicts"] = {"n": len(judged), "status": f"fewer than {cfg.drift_min_verdicts} final verdicts: not judged"}
    report["status"] = "breach" if report["breaches"] else "ok"
    return report


def check(settings: Settings, sessions: sessionmaker, reference_file: Path | None = None) -> dict:
    """The drift job: compare the recent window with the reference; returns the report (status ok/breach/...)."""
    path = reference_file or reference_path(settings)
    if not path.is_file():
        return {"status": f"no reference at {path}: build one with python -m scheduler.drift", "breaches": []}
    return compare(settings, load_reference(path), recent_window(settings, sessions))



def main(argv: list[str] | None = None) -> int:
    """`python -m scheduler.drift [--card CARD] [--n N] [--size PX]`: write the reference beside the card."""
    parser = argparse.ArgumentParser(description="build the drift reference of a model card")
    parser.add_argument("--card", type=Path, default=None)
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    from inference.predictor import DEFAULT_CARD

    card = args.card or DEFAULT_CARD
    out = build_reference(card, Path(card).parent / REFERENCE_FILE, n=args.n, size=args.size)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
