"""Owns the evaluation figures as plain numpy: AUC and the ROC curve, ECE and the reliability bins, Platt
scaling, Youden's threshold, the risk-coverage curve and its area (AURC), and JSON-safe figures.

No torch and no model here: `inference.training.evaluate` (held-out scoring, `smartnodule eval`),
`inference.training.eval_report` (figures of whole-image reads), the plots and the scheduler's gate all
compute with these functions.
"""
from __future__ import annotations

import numpy as np

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


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every distinct score taken as threshold, from (0, 0) to (1, 1)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.array([], int)
    tp, fp = np.cumsum(y)[ends], np.cumsum(~y)[ends]
    return (np.r_[0.0, fp / max(int((~y).sum()), 1)], np.r_[0.0, tp / max(int(y.sum()), 1)])


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-width probability bins."""
    mean_p, freq, count = reliability(probs, labels, bins)
    return float((count * np.abs(mean_p - freq)).sum() / count.sum()) if count.sum() else float("nan")


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty equal-width probability bin: mean probability, observed positive share, count."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, float)
    idx = np.minimum((probs * bins).astype(int), bins - 1)
    kept = [b for b in range(bins) if (idx == b).any()]
    return (np.array([probs[idx == b].mean() for b in kept]), np.array([labels[idx == b].mean() for b in kept]),
            np.array([int((idx == b).sum()) for b in kept]))


def risk_coverage(confidence: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk): cases accepted in order of falling confidence; risk = error rate of the accepted cases.

    Cases of equal confidence are accepted together (one point per distinct confidence), so the
    curve does not depend on the order of ties.
    """
    confidence, errors = np.asarray(confidence, float), np.asarray(errors).astype(bool)
    order = np.argsort(-confidence, kind="mergesort")
    c, e = confidence[order], errors[order]
    ends = np.r_[np.flatnonzero(np.diff(c)), len(c) - 1] if len(c) else np.array([], int)
    accepted = ends + 1
    return accepted / max(len(c), 1), np.cumsum(e)[ends] / accepted


def aurc(confidence: np.ndarray, errors: np.ndarray) -> float:
    """Area under the risk-coverage curve: the mean, over the cases, of the risk at the point that accepts them
    (each point weighted by the share of cases it adds); nan with no case. 0 is best; the error rate when the
    confidence tells nothing."""
    coverage, risk = risk_coverage(confidence, errors)
    if not len(coverage):
        return float("nan")
    return float((np.diff(np.r_[0.0, coverage]) * risk).sum())


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


def fit_calibration(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(a, b, threshold): Platt scaling of `scores` and the Youden threshold of the calibrated probabilities."""
    a, b = fit_platt(scores, labels)
    return a, b, youden_threshold(platt(scores, a, b), labels)


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


def json_safe(obj):
    """`obj` with NaN/inf floats replaced by None, so it dumps as strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
