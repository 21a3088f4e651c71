"""Owns the pictures of `smartnodule eval`: ROC, reliability and risk-coverage plots as PNG files.

One plot per kind with one curve per source (the training family's held-out
split, the independent evaluation family, a labelled folder), so the families
compare at a glance. Drawn with matplotlib's object API on the Agg canvas
(no pyplot, no display, no global backend state); the curves are
`inference.training.metrics`' functions of `eval_report.scored` reads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from inference.training.eval_report import Read, scored
from inference.training.metrics import ECE_BINS, auc, aurc, ece, reliability, risk_coverage, roc_curve

PLOTS = ("roc", "reliability", "risk_coverage")


def _figure(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(5.5, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Figure, ax, path: Path) -> Path:
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def write_plots(sources: dict[str, list[Read]], out: Path) -> list[Path]:
    """`roc.png`, `reliability.png` and `risk_coverage.png` in `out`, one curve per source; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    data = {name: scored(reads) for name, reads in sources.items()}

    fig, ax = _figure("ROC", "false-positive rate (1 - specificity)", "true-positive rate (sensitivity)")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    for name, s in data.items():
        if s.labels.any() and (~s.labels).any():
            fpr, tpr = roc_curve(s.probability, s.labels)
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc(s.probability, s.labels):.3f})")
    paths = [_save(fig, ax, out / "roc.png")]

    fig, ax = _figure(f"Reliability ({ECE_BINS} bins; marker area ~ images)", "mean predicted probability",
                      "observed share with a finding")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for name, s in data.items():
        if len(s.labels):
            mean_p, freq, count = reliability(s.probability, s.labels)
            line, = ax.plot(mean_p, freq, "-", label=f"{name} (ECE {ece(s.probability, s.labels):.3f})")
            ax.scatter(mean_p, freq, s=12 + 150 * count / count.max(), color=line.get_color(), alpha=0.7)
    paths.append(_save(fig, ax, out / "reliability.png"))

    fig, ax = _figure("Risk-coverage (accepted by confidence |p - threshold|)", "coverage (share of images accepted)",
                      "risk (error rate of the accepted)")
    top = 0.05
    for name, s in data.items():
        if len(s.labels):
            coverage, risk = risk_coverage(s.confidence, s.errors)
            ax.plot(np.r_[0.0, coverage], np.r_[risk[0], risk], drawstyle="steps-pre",
                    label=f"{name} (AURC {aurc(s.confidence, s.errors):.3f}, error {s.errors.mean():.3f})")
            top = max(top, float(risk.max()) * 1.05)
    ax.set_ylim(-0.01, min(1.05, top))
    paths.append(_save(fig, ax, out / "risk_coverage.png"))
    return paths
