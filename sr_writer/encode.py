"""Entry point of `sr_writer`: one prediction in, the DICOM result objects out.

Owns the public API the node's worker calls (`encode_results`, `ResultObjects`,
`SimilarCase`), `render_pdf` for the review page's download, and the checks on
their inputs: everything is validated here, once,
before any object is built, and a bad input raises ValueError/TypeError naming
the parameter and the value. Also owns the General Series attributes the
secondary capture and the presentation state take from the source beyond
highdicom's (Body Part Examined, Laterality).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom

from inference.types import PreparedImage, Prediction
from sr_writer.heatmap import build_heatmap_sc
from sr_writer.pdf_report import build_pdf_document, render_report_pdf
from sr_writer.presentation_state import build_gsps
from sr_writer.structured_report import ROI_TRACKING_ID, build_sr, tracking_uid
from sr_writer.uids import DEFAULT_UID_ROOT, check_uid_root, output_uids

_REQUIRED_SOURCE_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                               "SeriesInstanceUID", "Modality", "Rows", "Columns")


@dataclass(frozen=True)
class SimilarCase:
    """A past case that looks like this one, with the expert's verdict if there is one.

    `received_on` is the day the node received it (ISO date), not its DICOM Study Date.
    """

    received_on: str
    probability: float
    verdict: str | None
    similarity: float

    def __post_init__(self) -> None:
        _check_unit_interval("SimilarCase.probability", self.probability)
        _check_unit_interval("SimilarCase.similarity", self.similarity)
        if not isinstance(self.received_on, str):
            raise TypeError(f"SimilarCase.received_on must be a str, got {self.received_on!r}")
        if self.verdict is not None and not isinstance(self.verdict, str):
            raise TypeError(f"SimilarCase.verdict must be a str or None, got {self.verdict!r}")


@dataclass(frozen=True)
class ResultObjects:
    """The result objects of one source image, ready for C-STORE; `gsps` only for a positive finding."""

    sr: pydicom.Dataset
    heatmap: pydicom.Dataset
    pdf: pydicom.Dataset
    gsps: pydicom.Dataset | None = None

    def named(self) -> dict[str, pydicom.Dataset]:
        """The objects by name ("sr", "heatmap", "pdf", "gsps"), the ones that exist."""
        objects = {"sr": self.sr, "heatmap": self.heatmap, "pdf": self.pdf, "gsps": self.gsps}
        return {name: dataset for name, dataset in objects.items() if dataset is not None}

    def all(self) -> tuple[pydicom.Dataset, ...]:
        return tuple(self.named().values())


def encode_results(source: pydicom.Dataset, image: PreparedImage, prediction: Prediction, *,
                   review: bool, similar_cases: Sequence[SimilarCase] = (),
                   institution_name: str | None = None, uid_root: str = DEFAULT_UID_ROOT) -> ResultObjects:
    """SR, heatmap secondary capture, Encapsulated PDF and, when positive, GSPS of `prediction` on `source`.

    Output UIDs lie under `uid_root` and derive from the source SOP Instance UID and
    the model version, so encoding again replaces rather than duplicates.
    """
    _validate(source, image, prediction, review, similar_cases, institution_name)
    check_uid_root(uid_root)
    version = prediction.model.version
    sop_uid = source.SOPInstanceUID

    def uids(kind):
        return output_uids(sop_uid, version, kind, uid_root=uid_root)

    sr = build_sr(source, prediction, review=review, uids=uids("sr"), institution_name=institution_name,
                  uid_root=uid_root)
    heatmap = build_heatmap_sc(source, image, prediction, uids=uids("heatmap"),
                               institution_name=institution_name)
    _copy_body_part(source, heatmap)
    pdf_bytes = render_report_pdf(source, image, prediction, review=review,
                           similar_cases=similar_cases, institution_name=institution_name)
    pdf = build_pdf_document(source, pdf_bytes, uids=uids("pdf"),
                             prediction=prediction, institution_name=institution_name)
    gsps = build_gsps(source, prediction, uids=uids("gsps"), institution_name=institution_name,
                      tracking_uid=tracking_uid(source, prediction, ROI_TRACKING_ID, uid_root=uid_root)) \
        if prediction.positive else None
    if gsps is not None:
        _copy_body_part(source, gsps)
    return ResultObjects(sr=sr, heatmap=heatmap, pdf=pdf, gsps=gsps)


def _copy_body_part(source: pydicom.Dataset, series: pydicom.Dataset) -> None:
    """Body Part Examined and Laterality of the source on an image-like result series (SC, GSPS).

    General Series Laterality is Type 2C, required for a paired body part only. With
    the body part named (CHEST), a validator knows none is needed; without it, dciodvfy
    asks for it, so it is then present and empty (Type 2: claims no side). A source's
    own R or L is kept.
    """
    body_part = source.get("BodyPartExamined")
    known = isinstance(body_part, str) and bool(body_part.strip())
    if known:
        series.BodyPartExamined = body_part.strip()[:16]
    if source.get("Laterality") in ("R", "L"):
        series.Laterality = source.Laterality
    elif not known and "Laterality" not in series:
        series.Laterality = ""


def render_pdf(source: pydicom.Dataset, image: PreparedImage, prediction: Prediction, *,
               review: bool, similar_cases: Sequence[SimilarCase] = (),
               institution_name: str | None = None) -> bytes:
    """The PDF report alone (the same bytes `encode_results` encapsulates), for download."""
    _validate(source, image, prediction, review, similar_cases, institution_name)
    return render_report_pdf(source, image, prediction, review=review,
                             similar_cases=similar_cases, institution_name=institution_name)


def _validate(source: pydicom.Dataset, image: PreparedImage, prediction: Prediction,
              review: bool, similar_cases: Sequence[SimilarCase],
              institution_name: str | None) -> None:
    if not isinstance(source, pydicom.Dataset):
        raise TypeError(f"source must be a pydicom.Dataset, got {type(source).__name__}")
    missing = [keyword for keyword in _REQUIRED_SOURCE_ATTRIBUTES if not source.get(keyword)]
    if missing:
        raise ValueError(f"source lacks required attributes: {', '.join(missing)}")
    if not isinstance(image, PreparedImage):
        raise TypeError(f"image must be a PreparedImage, got {type(image).__name__}")
    if not isinstance(prediction, Prediction):
        raise TypeError(f"prediction must be a Prediction, got {type(prediction).__name__}")
    if image.sop_instance_uid != source.SOPInstanceUID:
        raise ValueError(f"image.sop_instance_uid {image.sop_instance_uid!r} differs from "
                         f"source.SOPInstanceUID {source.SOPInstanceUID!r}")

    display, heatmap = image.display, prediction.heatmap
    if not isinstance(display, np.ndarray) or display.ndim != 2 or display.dtype != np.uint8:
        raise ValueError("image.display must be a 2-D uint8 array, got "
                         f"{getattr(display, 'dtype', type(display))} {getattr(display, 'shape', '')}")
    if min(display.shape) < 2:
        raise ValueError(f"image.display is too small: shape {display.shape}")
    if display.shape != (source.Rows, source.Columns):
        raise ValueError(f"image.display shape {display.shape} differs from the source's "
                         f"(Rows, Columns) {(source.Rows, source.Columns)}")
    if not isinstance(heatmap, np.ndarray) or not np.issubdtype(heatmap.dtype, np.floating):
        raise ValueError("prediction.heatmap must be a float array, got "
                         f"{getattr(heatmap, 'dtype', type(heatmap))}")
    if heatmap.shape != display.shape:
        raise ValueError(f"prediction.heatmap shape {heatmap.shape} differs from "
                         f"image.display shape {display.shape}")
    if not np.all(np.isfinite(heatmap)) or heatmap.min() < 0 or heatmap.max() > 1:
        raise ValueError("prediction.heatmap values must be finite and in [0, 1], got range "
                         f"[{np.nanmin(heatmap)}, {np.nanmax(heatmap)}]")

    _check_unit_interval("prediction.probability", prediction.probability)
    if prediction.threshold is not None:
        _check_unit_interval("prediction.threshold", prediction.threshold)
    if prediction.lung_rows is not None:
        top, bottom = prediction.lung_rows
        if not (0 <= top <= bottom <= display.shape[0] - 1):
            raise ValueError(f"prediction.lung_rows {prediction.lung_rows!r} must be rows top <= bottom "
                             f"of the image of {display.shape[0]} rows")
    if not isinstance(prediction.uncertainty, numbers.Real) or not math.isfinite(prediction.uncertainty) \
            or prediction.uncertainty < 0:
        raise ValueError(f"prediction.uncertainty must be a finite number >= 0, "
                         f"got {prediction.uncertainty!r}")
    if prediction.positive:
        location = prediction.location
        if location is None:
            raise ValueError("prediction.location is None but prediction.positive is True")
        rows, cols = display.shape
        if not (0 <= location.row < rows and 0 <= location.col < cols):
            raise ValueError(f"prediction.location ({location.row}, {location.col}) lies outside "
                             f"the image of {rows} rows x {cols} columns")
        if not (math.isfinite(location.radius) and location.radius > 0):
            raise ValueError(f"prediction.location.radius must be > 0, got {location.radius!r}")

    model = prediction.model
    for field in ("name", "version", "weights_sha256"):
        value = getattr(model, field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"prediction.model.{field} must be a non-empty string, got {value!r}")
    if len(model.weights_sha256) != 64 or any(c not in "0123456789abcdef"
                                              for c in model.weights_sha256.lower()):
        raise ValueError(f"prediction.model.weights_sha256 must be 64 hex digits, "
                         f"got {model.weights_sha256!r}")

    if not isinstance(review, bool):
        raise TypeError(f"review must be a bool, got {review!r}")
    for index, case in enumerate(similar_cases):
        if not isinstance(case, SimilarCase):
            raise TypeError(f"similar_cases[{index}] must be a SimilarCase, got {type(case).__name__}")
    if institution_name is not None and (not isinstance(institution_name, str)
                                         or len(institution_name) > 64):
        raise ValueError(f"institution_name must be a string of at most 64 characters, "
                         f"got {institution_name!r}")


def _check_unit_interval(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or not 0 <= float(value) <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
