"""Owns the model card: what a shipped checkpoint is, how it was made, and how to trust it.

A card is a JSON file beside its safetensors weights; `load_card` reads it,
`save_card` writes it, `verify_weights` checks the weights' sha256 against it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

CARD_SCHEMA = 1


@dataclass(frozen=True)
class Calibration:
    """Platt scaling of the image score: p = sigmoid(a * score + b)."""

    method: str
    a: float
    b: float

    def probability(self, score: float) -> float:
        z = self.a * score + self.b
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


class ReviewThresholds(TypedDict, total=False):
    """The card's `review` entry: `inference.predictor.ReviewPolicy`'s thresholds (its defaults where absent)."""

    margin: float
    max_uncertainty: float


@dataclass(frozen=True)
class ModelCard:
    """Everything the node needs to load, identify and trust one checkpoint."""

    name: str
    version: str
    weights_file: str  # relative to the card's folder
    weights_sha256: str
    architecture: dict[str, Any]
    input_size: int
    preprocessing: str
    threshold: float
    calibration: Calibration
    review: ReviewThresholds
    tta: str
    location_source: str  # "heatmap" or "gradcam"
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    schema: int = CARD_SCHEMA
    ood: dict[str, Any] = field(default_factory=dict)  # file, sha256, threshold of the feature density (inference.ood)
    intended_use: str = ""
    trained_on: str = ""
    known_failure_modes: list[str] = field(default_factory=list)
    independent_evaluation: dict[str, Any] = field(default_factory=dict)  # figures on the evaluation family
    # file, sha256, area_range, max_undecided, ... of the lung-field segmentation (inference.lung_seg); empty: none shipped
    lung_segmentation: dict[str, Any] = field(default_factory=dict)
    # millimetres per model-input pixel the image is resampled to from its pixel spacing; None: fitted
    input_mm_per_px: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold!r}")
        if self.input_size < 32:
            raise ValueError(f"input_size must be >= 32, got {self.input_size!r}")
        if self.input_mm_per_px is not None and not 0.0 < self.input_mm_per_px < 10.0:
            raise ValueError(f"input_mm_per_px must be in (0, 10) mm or null, got {self.input_mm_per_px!r}")
        if self.location_source not in ("heatmap", "gradcam"):
            raise ValueError(f"location_source must be 'heatmap' or 'gradcam', got {self.location_source!r}")
        missing = {"file", "sha256", "threshold"} - set(self.ood)
        if self.ood and missing:
            raise ValueError(f"ood must name {sorted(missing)}, got keys {sorted(self.ood)}")
        missing = {"file", "sha256", "area_range", "max_undecided"} - set(self.lung_segmentation)
        if self.lung_segmentation and missing:
            raise ValueError(f"lung_segmentation must name {sorted(missing)}, got keys {sorted(self.lung_segmentation)}")

    @property
    def companion_files(self) -> tuple[str, ...]:
        """Files beside the weights that the card names (OOD density, lung segmentation): they travel with it."""
        return tuple(entry["file"] for entry in (self.ood, self.lung_segmentation) if entry)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_card(card: ModelCard, path: str | Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(card), indent=2, sort_keys=False) + "\n")


def load_card(path: str | Path) -> ModelCard:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"card_path {str(path)!r} is not a readable model card: {exc}") from exc
    if raw.get("schema") != CARD_SCHEMA:
        raise ValueError(f"card_path {str(path)!r} has schema {raw.get('schema')!r}, expected {CARD_SCHEMA}")
    raw["calibration"] = Calibration(**raw["calibration"])
    return ModelCard(**raw)


def verify_weights(card: ModelCard, card_path: str | Path) -> Path:
    """Path of the card's weights file after checking its sha256; ValueError naming the file otherwise."""
    weights = Path(card_path).parent / card.weights_file
    if not weights.is_file():
        raise ValueError(f"weights file {str(weights)!r} named by card {str(card_path)!r} does not exist")
    digest = sha256_file(weights)
    if digest != card.weights_sha256:
        raise ValueError(
            f"weights file {str(weights)!r} has sha256 {digest}, card {str(card_path)!r} expects {card.weights_sha256}"
        )
    return weights


def verify_file(card_path: str | Path, entry: dict[str, Any], name: str) -> Path:
    """Path of the file a card's `name` entry (file, sha256) names, after checking its sha256."""
    path = Path(card_path).parent / entry["file"]
    if not path.is_file():
        raise ValueError(f"{name} file {str(path)!r} named by card {str(card_path)!r} does not exist")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ValueError(f"{name} file {str(path)!r} has sha256 {digest}, card {str(card_path)!r} expects {entry['sha256']}")
    return path
