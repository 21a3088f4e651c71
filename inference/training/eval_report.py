"""Owns `smartnodule eval`'s figures on whole images read as the node reads them.

Every image goes through a DICOM dataset (or a labelled folder's file),
`inference.preprocess.prepare` and `Detector.read`, so the figures include
the serving path: letterbox, MONOCHROME1 and Presentation LUT handling, the
review reasons and the out-of-distribution gate. Sources:

- `training`: held-out test phantoms of the first training generator
  (`inference.training.phantoms`, seeds of the test split, half positive);
- `varied`: held-out test images of the varied training generator
  (`inference.training.variety`, seeds of the test split, half with findings);
- `independent`: the evaluation family (`inference.training.eval_family`), written apart
  from the training generator and used for nothing but these figures;
- `folder`: a labelled folder in the NODE21 layout (`inference.training.labelled_folder`);
- perturbations of the independent family (robustness) and images that are not
  what the model reads (out-of-distribution table).

Figures per source: AUC; AUC on findings >= 10 mm with density in the upper half
of the source's positives; pointing of the detection peak and of the Grad-CAM
peak (within the finding radius + 3 mm); mean probability on negatives;
confident false positives (negatives with p >= 0.9 not sent to review), with
and without the OOD gate; the share sent to review and for the OOD reason; ECE;
AURC, the area under the risk-coverage curve (cases accepted in order of the
confidence |p - threshold| of the node's decision; risk = error rate of the accepted).

This module owns the reading and the report's figures and tables; the numbers
are `inference.training.metrics`'. It never imports `inference.training.evaluate`
(the command that runs it; an import-linter contract keeps it so).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

import cv2
import numpy as np

from inference.training import eval_family as ef
from inference.training.labelled_folder import LabelledImage, load_prepared, spots_of
from inference.training.options import FAMILIES
from inference.training.phantoms import phantom_dataset
from inference.training.samples import heldout_phantom
from inference.training.metrics import POINTING_MARGIN_MM, aurc, auc, ece
from inference.ood import REASON as OOD_REASON
from inference.types import NotApplicable, PreparedImage, Unreadable

CONFIDENT = 0.9
LARGE_MM = 10.0


@dataclass(frozen=True)
class Truth:
    """Ground truth of one image in source pixels: findings as (row, col, radius px)."""

    label: int
    spots: tuple[tuple[float, float, float], ...] = ()
    diameter_mm: float = 0.0  # largest finding
    density: float = float("nan")  # of the largest finding, in the source's own units
    spacing_mm: float | None = None


@dataclass(frozen=True)
class Read:
    """The node's answer on one image, judged against its truth; `skipped` holds a NotApplicable/Unreadable reason."""

    truth: Truth
    probability: float = float("nan")
    positive: bool = False
    threshold: float = float("nan")
    review: bool = False
    reasons: tuple[str, ...] = ()
    ood_score: float = float("nan")
    detection_hit: bool = False
    explanation_hit: bool = False
    skipped: str | None = None


def _hit(rc: tuple[float, float], truth: Truth) -> bool:
    margin = POINTING_MARGIN_MM / truth.spacing_mm if truth.spacing_mm else 0.0
    return any(math.hypot(rc[0] - r, rc[1] - c) <= rad + margin for r, c, rad in truth.spots)


def read_image(detector, image: PreparedImage, truth: Truth) -> Read:
    prediction, spot = detector.read(image)
    cam_row, cam_col = (float(v) for v in np.unravel_index(int(np.argmax(prediction.heatmap)), prediction.heatmap.shape))
    return Read(truth=truth, probability=prediction.probability, positive=prediction.positive,
                threshold=float("nan") if prediction.threshold is None else prediction.threshold, review=prediction.review,
                reasons=prediction.review_reasons,
                ood_score=float("nan") if prediction.ood_score is None else prediction.ood_score,
                detection_hit=_hit((spot.row, spot.col), truth), explanation_hit=_hit((cam_row, cam_col), truth))


def read_dataset_case(detector, ds, truth: Truth) -> Read:
    try:
        image = detector.prepare(ds)
    except (NotApplicable, Unreadable) as exc:
        return Read(truth=truth, skipped=exc.reason)
    return read_image(detector, image, truth)


# ---- sources -------------------------------------------------------------------------------------

def case_truth(case: ef.EvalCase) -> Truth:
    if not case.findings:
        return Truth(0, spacing_mm=case.spacing_mm)
    big = max(case.findings, key=lambda f: f.diameter_mm)
    return Truth(1, tuple((f.row, f.col, f.radius_px) for f in case.findings), big.diameter_mm, big.density,
                 case.spacing_mm)


def heldout_dataset(split: str, index: int, size: int, generator: str = "phantom"):
    """Held-out image `index` of `split` and its DICOM instance, stored as its generator chose (MONOCHROME1 where
    the varied generator drew it)."""
    ph = heldout_phantom(split, index, size, generator)
    return ph, phantom_dataset(ph, monochrome1=bool(getattr(ph, "monochrome1", False)))


def training_case(index: int, size: int, generator: str = "phantom") -> ef.EvalCase:
    """Held-out test image `index` of a training generator, as an EvalCase (for the same perturbations):
    every finding, stored as the generator says (MONOCHROME1 where the varied generator chose it)."""
    ph, ds = heldout_dataset("test", index, size, generator)
    found = getattr(ph, "findings", ()) or (() if ph.nodule is None else (ph.nodule,))
    findings = tuple(ef.Finding(f.row, f.col, 2 * f.radius_px, 2 * f.radius_px, f.diameter_mm, f.contrast,
                                getattr(f, "kind", "nodule")) for f in found)
    return ef.EvalCase(pixels=ds.pixel_array.astype(np.uint16), bits_stored=int(ds.BitsStored),
                       photometric=str(ds.PhotometricInterpretation), spacing_mm=ph.pixel_spacing_mm,
                       lung_mask=ph.lung_mask, findings=findings, seed=ph.seed)


def family_cases(family: str, n: int, size: int) -> Iterator[ef.EvalCase]:
    """The first `n` images of `family` (`options.FAMILIES`), half with a finding."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    for i in range(n):
        if family == "independent":
            yield ef.make_case(ef.SEED_BASE + i, size, positive=i % 2 == 0)
        else:
            yield training_case(i, size, "varied" if family == "varied" else "phantom")


# ---- perturbations (robustness) and out-of-distribution images ------------------------------------

def _warp(case: ef.EvalCase, matrix: np.ndarray, shape: tuple[int, int] | None = None) -> ef.EvalCase:
    rows, cols = shape or case.pixels.shape
    disp = cv2.warpAffine(ef.display_of(case), matrix, (cols, rows), flags=cv2.INTER_LINEAR, borderValue=0.0)
    mask = cv2.warpAffine(case.lung_mask.astype(np.uint8), matrix, (cols, rows), flags=cv2.INTER_NEAREST) > 0
    findings = []
    for f in case.findings:
        c, r = matrix @ np.array([f.col, f.row, 1.0])
        if 0 <= r < rows and 0 <= c < cols:
            findings.append(replace(f, row=float(r), col=float(c)))
    return ef.with_pixels(replace(case, pixels=np.zeros((rows, cols), np.uint16)), disp, mask, tuple(findings))


def rotate(case: ef.EvalCase, degrees: float) -> ef.EvalCase:
    rows, cols = case.pixels.shape
    return _warp(case, cv2.getRotationMatrix2D(((cols - 1) / 2, (rows - 1) / 2), degrees, 1.0))


def crop(case: ef.EvalCase, fraction: float) -> ef.EvalCase:
    """Keep the lower-left (1 - fraction) share of each side: a tight, off-centre field."""
    rows, cols = case.pixels.shape
    top, left = int(rows * fraction), 0
    return _warp(case, np.array([[1.0, 0, -left], [0, 1.0, -top]]), (rows - top, int(cols * (1 - fraction))))


def _pixels(fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> Callable[[ef.EvalCase], ef.EvalCase]:
    def apply(case: ef.EvalCase) -> ef.EvalCase:
        rng = np.random.default_rng([case.seed, 0x9E7])
        return ef.with_pixels(case, fn(ef.display_of(case), rng))
    return apply


def _text(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rows, cols = d.shape
    s = max(rows, cols) / 512
    for i, text in enumerate(("ST ELSEWHERE HOSPITAL", "PORTABLE  SUPINE", "ID 0042 17:03")):
        d = ef.burn_text(d, text, (int(cols * rng.uniform(0.02, 0.3)), int(rows * (0.25 + 0.25 * i))), 0.9 * s,
                         1.0, max(1, int(2 * s)))
    return d


PERTURBATIONS: dict[str, Callable[[ef.EvalCase], ef.EvalCase]] = {
    "none": lambda c: c,
    "rotate +15 deg": lambda c: rotate(c, 15.0),
    "rotate -15 deg": lambda c: rotate(c, -15.0),
    "gamma 0.6": _pixels(lambda d, rng: d ** 0.6),
    "gamma 1.6": _pixels(lambda d, rng: d ** 1.6),
    "blur 2 px": _pixels(lambda d, rng: cv2.GaussianBlur(d, (0, 0), 2.0)),
    "noise 5 %": _pixels(lambda d, rng: d + rng.normal(0.0, 0.05, d.shape).astype(np.float32)),
    "crop 20 %": lambda c: crop(c, 0.2),
    "burned-in text": _pixels(_text),
    "no spacing tags": lambda c: replace(c, spacing_tags=False),
}


def _blank(c: ef.EvalCase) -> ef.EvalCase:
    return replace(c, findings=())


OOD_SETS: dict[str, Callable[[int, int], tuple[ef.EvalCase, str]]] = {
    # (case, BodyPartExamined written into the DICOM header)
    "abdomen labelled CHEST": lambda i, s: (ef.make_abdomen(ef.SEED_BASE + 500_000 + i, s), "CHEST"),
    "chest rotated 90 deg": lambda i, s: (_blank(_warp_rot90(ef.make_case(ef.SEED_BASE + 600_000 + i, s, positive=False))), "CHEST"),
    "chest upside down": lambda i, s: (_blank(rotate(ef.make_case(ef.SEED_BASE + 700_000 + i, s, positive=False), 180.0)), "CHEST"),
    "chest, polarity inverted": lambda i, s: (_pixels(lambda d, rng: 1.0 - d)(
        ef.make_case(ef.SEED_BASE + 800_000 + i, s, positive=False)), "CHEST"),
    "training chest rotated 90 deg": lambda i, s: (_blank(_warp_rot90(training_case(900_000 + 2 * i + 1, s))), "CHEST"),
    "corrupt: heavy noise": lambda i, s: (_pixels(lambda d, rng: d + rng.normal(0.0, 0.35, d.shape).astype(np.float32))(
        ef.make_case(ef.SEED_BASE + 810_000 + i, s, positive=False)), "CHEST"),
    "corrupt: half blank": lambda i, s: (_pixels(lambda d, rng: np.where(np.arange(d.shape[0])[:, None] < d.shape[0] // 2, d, 0.0))(
        ef.make_case(ef.SEED_BASE + 820_000 + i, s, positive=False)), "CHEST"),
    "corrupt: stripes": lambda i, s: (_pixels(lambda d, rng: np.where((np.arange(d.shape[1]) // 8) % 2 == 0, d, 1.0))(
        ef.make_case(ef.SEED_BASE + 830_000 + i, s, positive=False)), "CHEST"),
}


def _warp_rot90(case: ef.EvalCase) -> ef.EvalCase:
    rows, cols = case.pixels.shape
    matrix = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, cols - 1.0]])  # 90 deg clockwise of the display
    return _warp(case, matrix, (cols, rows))


# ---- figures ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scored:
    """The read (not skipped) images of one source as arrays: truth, probability, the node's decision, its confidence."""

    labels: np.ndarray
    probability: np.ndarray
    positive: np.ndarray
    confidence: np.ndarray  # |p - threshold|: how far the decision is from flipping

    @property
    def errors(self) -> np.ndarray:
        return self.positive != self.labels


def scored(reads: list[Read]) -> Scored:
    done = [r for r in reads if r.skipped is None]
    p = np.array([r.probability for r in done], float)
    return Scored(np.array([r.truth.label for r in done], bool), p, np.array([r.positive for r in done], bool),
                  np.abs(p - np.array([r.threshold for r in done], float)))


def figures(reads: list[Read]) -> dict:
    """The side-by-side figures of one source (see the module docstring)."""
    done = [r for r in reads if r.skipped is None]
    s = scored(reads)
    y, p = s.labels, s.probability
    review = np.array([r.review for r in done], bool)
    ood = np.array([OOD_REASON in r.reasons for r in done], bool)
    review_no_ood = np.array([bool(set(r.reasons) - {OOD_REASON}) for r in done], bool)
    pos = [r for r in done if r.truth.label]
    dens = np.array([r.truth.density for r in pos], float)
    cut = float(np.nanmedian(dens)) if len(pos) and np.isfinite(dens).any() else float("nan")
    large = np.array([r.truth.label == 0 or (r.truth.diameter_mm >= LARGE_MM and r.truth.density >= cut)
                      for r in done], bool)
    neg = ~y
    confident = (p >= CONFIDENT) & neg
    return {
        "n": len(reads),
        "positives": int(y.sum()),
        "skipped": len(reads) - len(done),
        "auc": auc(p, y),
        "auc_large_dense": auc(p[large], y[large]) if large.any() else float("nan"),
        "n_large_dense": int((large & y).sum()),
        "pointing_detection": float(np.mean([r.detection_hit for r in pos])) if pos else float("nan"),
        "pointing_gradcam": float(np.mean([r.explanation_hit for r in pos])) if pos else float("nan"),
        "mean_p_negative": float(p[neg].mean()) if neg.any() else float("nan"),
        "confident_fp": float((confident & ~review).sum() / max(neg.sum(), 1)),
        "confident_fp_without_ood_gate": float((confident & ~review_no_ood).sum() / max(neg.sum(), 1)),
        "review_share": float(review.mean()) if len(done) else float("nan"),
        "ood_share": float(ood.mean()) if len(done) else float("nan"),
        "review_or_skipped": float((review.sum() + len(reads) - len(done)) / max(len(reads), 1)),
        "ood_score_median": float(np.nanmedian([r.ood_score for r in done])) if done else float("nan"),
        "ece": ece(p, y) if len(done) else float("nan"),
        "aurc": aurc(s.confidence, s.errors),
        "error_rate": float(s.errors.mean()) if len(done) else float("nan"),
    }


def read_cases(detector, cases: Iterator[ef.EvalCase], body_part: str | None = None) -> list[Read]:
    return [read_dataset_case(detector, ef.case_dataset(c, body_part=body_part), case_truth(c)) for c in cases]


def ood_cases(name: str, n: int, size: int) -> Iterator[tuple[ef.EvalCase, str]]:
    """The `n` images of out-of-distribution set `name`, each with the BodyPartExamined its header gets."""
    return (OOD_SETS[name](i, size) for i in range(n))


def read_ood_cases(detector, cases: Iterable[tuple[ef.EvalCase, str]]) -> list[Read]:
    return [read_dataset_case(detector, ef.case_dataset(c, body_part=part), case_truth(c)) for c, part in cases]


def read_folder_items(detector, items: Iterable[LabelledImage]) -> list[Read]:
    """Reads of a labelled folder's images (NODE21 layout, `read_labels`)."""
    reads = []
    for item in items:
        truth = Truth(item.label, tuple(spots_of(item)), spacing_mm=None)
        try:
            image = load_prepared(item.path, detector.input_size, detector.mm_per_px, detector.thorax_spacing)
        except (NotApplicable, Unreadable) as exc:
            reads.append(Read(truth=truth, skipped=exc.reason))
            continue
        spacing = image.pixel_spacing_mm[0] if image.pixel_spacing_mm else None
        reads.append(read_image(detector, image, replace(truth, spacing_mm=spacing)))
    return reads


ROWS = (("n", "images (skipped)", lambda f: f"{f['n']} ({f['skipped']})"),
        ("auc", "AUC", "{:.3f}"),
        ("auc_large_dense", "AUC, >= 10 mm and dense (n+)", lambda f: _fmt(f, 'auc_large_dense') + f" ({f['n_large_dense']})"),
        ("pointing_detection", "pointing, detection peak", "{:.3f}"),
        ("pointing_gradcam", "pointing, Grad-CAM peak", "{:.3f}"),
        ("mean_p_negative", "mean probability, no finding", "{:.3f}"),
        ("confident_fp", "confident FP (p>=0.9, no review) / negatives", "{:.3f}"),
        ("confident_fp_without_ood_gate", "  ... without the OOD gate", "{:.3f}"),
        ("review_share", "sent to review", "{:.3f}"),
        ("ood_share", "  ... for out_of_distribution", "{:.3f}"),
        ("review_or_skipped", "sent to review or skipped", "{:.3f}"),
        ("ood_score_median", "OOD score, median", "{:.1f}"),
        ("ece", "ECE (10 bins)", "{:.3f}"),
        ("aurc", "AURC (risk-coverage; error rate)", lambda f: _fmt(f, "aurc") + f" ({_fmt(f, 'error_rate')})"))


def _fmt(f: dict, key: str, spec: str = "{:.3f}") -> str:
    v = f.get(key)
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def side_by_side(columns: dict[str, dict], keys: tuple[str, ...] | None = None) -> str:
    """A text table: one row per figure, one column per source."""
    rows = [r for r in ROWS if keys is None or r[0] in keys]
    names = list(columns)
    width = max(len(r[1]) for r in rows)
    col_w = max(12, *(len(n) for n in names))
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>{col_w}}" for n in names)]
    for key, label, fmt in rows:
        cells = [fmt(columns[n]) if callable(fmt) else _fmt(columns[n], key, fmt) for n in names]
        lines.append(f"{label:<{width}}  " + "  ".join(f"{c:>{col_w}}" for c in cells))
    return "\n".join(lines)


def transposed(rows: dict[str, dict], keys: tuple[str, ...]) -> str:
    """A text table: one row per source (perturbation, OOD set), one column per figure."""
    name_w = max(len(k) for k in rows)
    head = f"{'':<{name_w}}  " + "  ".join(f"{k:>14}" for k in keys)
    lines = [head]
    for name, f in rows.items():
        cells = []
        for k in keys:
            v = f.get(k)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else
                         (f"{v:.3f}" if isinstance(v, float) else str(v)))
        lines.append(f"{name:<{name_w}}  " + "  ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)
