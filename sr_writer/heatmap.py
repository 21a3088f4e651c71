"""The Grad-CAM overlay: pixels for viewers and the PDF, and the secondary capture.

Owns how a result looks as a picture: the display image with the JET-coloured
Grad-CAM blended where it is warm, a circle around a positive finding, and the
burned-in legend band (model, probability, "not for primary diagnosis").
"""
from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from inference.types import Location, Prediction, PreparedImage
from sr_writer.structured_report import MANUFACTURER
from sr_writer.uids import OutputUids

SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "AI nodule heatmap (not for primary diagnosis)"
MAX_SIDE = 1024
MIN_SIDE = 512
HEAT_THRESHOLD = 0.2
HEAT_ALPHA = 0.45
DISCLAIMER = "AI result - not for primary diagnosis"
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_CIRCLE_RGB = (0, 255, 0)


def render_overlay(display: np.ndarray, heatmap: np.ndarray, location: Location | None, *,
                   long_side: int) -> np.ndarray:
    """RGB uint8 overlay scaled so its long side is `long_side`; circle at `location` if given."""
    rows, cols = display.shape
    scale = long_side / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    gray = cv2.resize(display, size, interpolation=interpolation)
    heat = cv2.resize(heatmap.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8),
                                            cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    # Fade the colour in over 0.1 above the threshold, so the overlay has no hard edge.
    alpha = (HEAT_ALPHA * np.clip((heat - HEAT_THRESHOLD) / 0.1, 0, 1))[..., None]
    rgb = (np.repeat(gray[..., None], 3, axis=2) * (1 - alpha) + colour * alpha).astype(np.uint8)
    if location is not None:
        thickness = max(2, round(long_side / 300))
        centre = (round(location.col * scale), round(location.row * scale))
        radius = max(round(location.radius * scale), 4 * thickness)
        cv2.circle(rgb, centre, radius, _CIRCLE_RGB, thickness, lineType=cv2.LINE_AA)
    return rgb


def legend_lines(prediction: Prediction) -> tuple[str, ...]:
    """The burned-in legend text, one string per line."""
    finding = "PRESENT" if prediction.positive else "absent"
    return (
        f"{prediction.model.name} {prediction.model.version}",
        f"Nodule {finding}  p={prediction.probability:.2f}  uncertainty {prediction.uncertainty:.2f}",
        DISCLAIMER,
    )


def render_heatmap_image(image: PreparedImage, prediction: Prediction) -> np.ndarray:
    """The secondary capture's pixels: overlay with the legend band below it."""
    long_side = min(MAX_SIDE, max(MIN_SIDE, max(image.display.shape)))
    overlay = render_overlay(image.display, prediction.heatmap, prediction.location,
                             long_side=long_side)
    band = _legend_band(legend_lines(prediction), overlay.shape[1])
    canvas = np.vstack([overlay, band])
    rows, cols = canvas.shape[:2]
    if max(rows, cols) > MAX_SIDE:  # a tall image plus the band: shrink both together
        scale = MAX_SIDE / max(rows, cols)
        canvas = cv2.resize(canvas, (round(cols * scale), round(rows * scale)),
                            interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(canvas)


def build_heatmap_sc(source: pydicom.Dataset, image: PreparedImage, prediction: Prediction, *,
                     uids: OutputUids, institution_name: str | None) -> hd.sc.SCImage:
    """Secondary capture (RGB) of the overlay, in the source's study; inputs validated by the caller."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=render_heatmap_image(image, prediction),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        # highdicom insists on a single-letter pair here; the source's value is copied below.
        patient_orientation=("L", "F"),
        # General Series Laterality only for a paired body part; a chest is not one.
        laterality=source.get("Laterality") if source.get("Laterality") in ("R", "L") else None,
        series_instance_uid=uids.series_instance_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name=prediction.model.name,
        software_versions=prediction.model.version,
        institution_name=institution_name,
    )
    # Patient Orientation is Type 2C: the source's value (rows and columns keep their
    # direction when scaled), or empty when the source has none.
    sc.PatientOrientation = source.get("PatientOrientation", "")
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = "Grad-CAM overlay of the AI nodule model on the source image"
    return sc


def _legend_band(lines: tuple[str, ...], width: int) -> np.ndarray:
    """Black band with white text lines, the font scaled so the longest line fits `width`."""
    margin = max(6, width // 80)
    base_width = max(cv2.getTextSize(line, _FONT, 1.0, 2)[0][0] for line in lines)
    font_scale = min(1.0, (width - 2 * margin) / base_width)
    thickness = 2 if font_scale >= 0.6 else 1
    (_, text_height), baseline = cv2.getTextSize("Ag", _FONT, font_scale, thickness)
    line_height = text_height + baseline + margin // 2
    band = np.zeros((line_height * len(lines) + margin, width, 3), dtype=np.uint8)
    for index, line in enumerate(lines):
        origin = (margin, margin // 2 + text_height + index * line_height)
        colour = (255, 220, 0) if line == DISCLAIMER else (255, 255, 255)
        cv2.putText(band, line, origin, _FONT, font_scale, colour, thickness, cv2.LINE_AA)
    return band
