"""Values that cross the boundary of `inference`: what the node and `sr_writer` consume.

Every stage of the pipeline takes and returns these small frozen dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference.geometry import Letterbox, letterbox

DEVICES = ("auto", "cpu", "cuda")  # where a model may run (`inference.torch_setup.resolve_device`)


class NotApplicable(Exception):
    """The instance is not an image this model reads (job ends SKIPPED with `reason`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unreadable(Exception):
    """The instance claims to be a chest radiograph but cannot be read (job ends REJECTED)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ModelIdentity:
    """Name, version and weights digest of the model that produced a result."""

    name: str
    version: str
    weights_sha256: str


@dataclass(frozen=True)
class PreparedImage:
    """A validated chest radiograph, ready for the model and for display.

    `display` is the source image after modality LUT, VOI LUT/window and
    MONOCHROME1 inversion, as uint8 in the source geometry (rows, cols),
    bright = dense. `model_input` is what the network reads (float32, 2-D).
    """

    sop_instance_uid: str
    display: np.ndarray
    model_input: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None
    quality_flags: tuple[str, ...] = ()
    geometry: Letterbox | None = None  # where `display` lies in `model_input`; None: fitted

    @property
    def placement(self) -> Letterbox:
        """Where the source image lies in `model_input` (its `geometry`, else fitted)."""
        return self.geometry or letterbox(self.display.shape[:2], self.model_input.shape[0])


@dataclass(frozen=True)
class Location:
    """Centre and radius of a finding in source image pixel coordinates."""

    row: float
    col: float
    radius: float


# Review reasons as coded SR items (code value <= 16 characters, scheme of the SR writer's local codes).
REVIEW_REASON_CODES = {
    "near_threshold": ("NEARTHRESHOLD", "Probability near the decision threshold"),
    "uncertain": ("UNCERTAIN", "Model uncertainty high"),
    "out_of_distribution": ("OUTOFDIST", "Image out of the model's training distribution"),
    "lung_fields_not_found": ("NOLUNGFIELDS", "Lung fields not found"),
    "view_not_frontal": ("NOTFRONTAL", "Lung fields not side by side as in a frontal view"),
    "ap_view": ("APVIEW", "Antero-posterior (portable) view"),
    "no_pixel_spacing": ("NOSPACING", "Pixel spacing missing"),
    "invalid_pixel_spacing": ("BADSPACING", "Pixel spacing invalid"),
    "secondary_capture": ("SECCAPTURE", "Secondary capture"),
}


@dataclass(frozen=True)
class Prediction:
    """What the model says about one image.

    `heatmap` is the explanation map (HiResCAM on an encoder stage) in [0, 1], float32, in the source
    geometry (rows, cols).
    `embedding` is a 1-D float32 vector (L2-normalised) for similar-case retrieval.
    `threshold` is the operating threshold `positive` was decided at (the model
    card's), or None where the caller does not know it. `lung_rows` is the first
    and last source row of the lung field the model found (None: none found or
    not known); the report names the finding's zone from it.
    `review` is True when `review_reasons` is not empty: `near_threshold`,
    `uncertain`, `out_of_distribution`, `lung_fields_not_found` (the lung-field
    segmentation found no plausible lung fields), `view_not_frontal` (the two lung
    fields do not lie side by side, as in a lateral view or an image turned on its side), or a quality flag that makes a read
    unreliable (`ap_view`, `no_pixel_spacing`, `invalid_pixel_spacing`,
    `secondary_capture`). `ood_score` is the Mahalanobis distance of the image's
    encoder features to the training images' (None when the card has no density).
    """

    probability: float
    uncertainty: float
    positive: bool
    review: bool
    location: Location | None
    heatmap: np.ndarray
    embedding: np.ndarray
    model: ModelIdentity
    threshold: float | None = None
    lung_rows: tuple[float, float] | None = None
    review_reasons: tuple[str, ...] = ()
    ood_score: float | None = None
