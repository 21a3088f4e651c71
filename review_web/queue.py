"""The review queue as the page shows it: accession, age, priority and operating threshold per case, and its sorting.

`priority` is the one rule for reading order: uncertain positives first (a
positive call whose probability is near the threshold or whose uncertainty is
high: the reads most likely to be wrong where a miss costs most), then images
out of the model's distribution, then the rest. The accession number is read
from the spooled header (it is not a job column); the age is the time since the
node received the instance. The threshold is the model card's, shown for jobs of
that card's model and version only.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import pydicom
import structlog

from config.settings import Settings
from inference.model_card import load_card
from node.store.db import Job
from node.store.review import CaseStanding

log = structlog.get_logger(__name__)

PRIORITY_LABELS = ("uncertain positive", "out of distribution", "other")
UNCERTAIN_REASONS = frozenset({"near_threshold", "uncertain"})
OOD_REASON = "out_of_distribution"  # inference.ood.REASON, named here so the web app does not load torch
SortKey = Literal["priority", "age", "probability", "accession", "job"]
Order = Literal["asc", "desc"]


@dataclass(frozen=True)
class QueueRow:
    job: Job
    outcome: CaseStanding
    accession: str
    age_s: float
    priority: int
    threshold: float | None

    @property
    def priority_label(self) -> str:
        return PRIORITY_LABELS[self.priority]


def priority(job: Job) -> int:
    """0 uncertain positive, 1 out of distribution, 2 other: the queue reads in this order."""
    reasons = set((job.review_reasons or "").split(","))
    if job.positive and reasons & UNCERTAIN_REASONS:
        return 0
    if OOD_REASON in reasons:
        return 1
    return 2


def model_thresholds(settings: Settings) -> dict[tuple[str, str], float]:
    """{(model name, version): operating threshold} of the card in service; empty when it cannot be read."""
    if settings.model.card is None:
        from inference.predictor import DEFAULT_CARD  # loads torch: only when no card is configured
        path = DEFAULT_CARD
    else:
        path = settings.model.card
    try:
        card = load_card(path)
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("model_card_unreadable", setting="model.card", error=str(exc)[:300])
        return {}
    return {(card.name, card.version): card.threshold}


def threshold_of(job: Job, thresholds: dict[tuple[str, str], float]) -> float | None:
    """The operating threshold of the model that read `job`, None when it is not the card's."""
    return thresholds.get((job.model_name or "", job.model_version or ""))


def queue_rows(items: list[tuple[Job, CaseStanding]], thresholds: dict[tuple[str, str], float], now: datetime
               ) -> list[QueueRow]:
    return [QueueRow(job, outcome, accession_number(job), (now - job.received_at).total_seconds(), priority(job),
                     threshold_of(job, thresholds))
            for job, outcome in items]


SORT_KEYS = {
    "priority": lambda row: (row.priority, -row.age_s, row.job.id),
    "age": lambda row: (row.age_s, row.job.id),
    "probability": lambda row: (row.job.probability or 0.0, row.job.id),
    "accession": lambda row: (row.accession, row.job.id),
    "job": lambda row: row.job.id,
}


def sort_rows(rows: list[QueueRow], key: SortKey, order: Order) -> list[QueueRow]:
    """`key` ascending (priority: most urgent first, oldest first within a priority) or descending."""
    return sorted(rows, key=SORT_KEYS[key], reverse=order == "desc")


def accession_number(job: Job) -> str:
    """The Accession Number of the spooled header, "" when absent or the file is gone."""
    path = Path(job.spool_path)
    if not path.is_file():
        return ""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["AccessionNumber"])
    except (OSError, pydicom.errors.InvalidDicomError):
        return ""
    return str(ds.get("AccessionNumber", "") or "")


def age_text(seconds: float) -> str:
    """"45 s", "12 min", "5.2 h", "3 d"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"
