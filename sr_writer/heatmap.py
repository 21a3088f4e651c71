"""The Grad-CAM picture: one explanation layer for the secondary capture, the PDF and the review page.

Owns how a result looks as a picture. `explanation_layer` is the single renderer
of the explanation: Grad-CAM as iso-contour lines (not a filled colour wash), small
hot spots ringed rather than painted over, and a circle around the finding with
nothing drawn inside it, so the nodule stays visible at its own grey level; on a
transparent RGBA canvas of any size. The heatmap secondary capture
lays it over the display image, marks the sides from Patient Orientation and adds
a legend band (model, version, probability, a colour bar of the contour levels,
"trained on synthetic images; not for diagnosis"); the PDF report shows the same
overlay; the review page (`review_web.images`) serves the layer itself as a PNG,
made from the explanation map the worker stores beside the results
(`explanation_png` / `read_explanation_png`).

Measured with `python -m bench.encode` (2048 px phantom, 2 shared cores): the heatmap
SC took 0.037 s with the former JET wash and 0.038 s with the first contour version
on an idle machine; five runs interleaved with the former code at load 9 to 14 gave
0.141-0.188 s before and 0.124-0.172 s after, the same within the noise.
"""
from __future__ import annotations

from collections.abc import Sequence

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
# Grad-CAM values (in [0, 1]) drawn as iso-contours, each in its colour of the colour bar.
CONTOUR_LEVELS = (0.5, 0.7, 0.9)
MIN_RING_RADIUS = 4  # line widths: a smaller hot spot is circled, not painted over
DISCLAIMER = "AI result: trained on synthetic images; not for diagnosis"
COLOUR_BAR_CAPTION = "Grad-CAM: where the model looked (not a lesion outline)"
NO_ORIENTATION = "No Patient Orientation in the source: sides not marked"
EXPLANATION_FILE = "explanation.png"  # the map beside the results, for the review page
EXPLANATION_MAX_SIDE = 512  # Grad-CAM is coarse (stride 16 or more): 512 px keeps every contour
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_CIRCLE_RGB = (0, 255, 0)
_WARNING_RGB = (255, 220, 0)
_OPPOSITE = str.maketrans("LRAPHF", "RLPAFH")


def level_colour(value: float) -> tuple[int, int, int]:
    """RGB of a Grad-CAM value on the colour bar: yellow (low) through orange to red (high)."""
    red, green, blue = (int(c) for c in _colour_map(np.array([[value]], np.float32))[0, 0])
    return red, green, blue


def explanation_layer(heatmap: np.ndarray, location: Location | None, *,
                      source_shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """RGBA uint8 canvas of `size` (columns, rows): Grad-CAM contours and the finding's circle.

    `heatmap` covers the whole source image at any resolution; `location` is in
    source pixels (`source_shape` is (rows, columns)). Transparent (alpha 0) where
    nothing is drawn, so a viewer or the SC shows the image itself there. Nothing
    covers what it marks: a hot spot smaller than a ring of MIN_RING_RADIUS line
    widths is drawn as that ring around it (a contour would be a solid dot on the
    spot), and nothing is drawn inside the finding's circle but the circle.
    """
    cols, rows = size
    layer = np.zeros((rows, cols, 4), np.uint8)
    thickness = _thickness(size)
    min_radius = MIN_RING_RADIUS * thickness
    heat = cv2.resize(np.asarray(heatmap, np.float32), (cols, rows), interpolation=cv2.INTER_LINEAR)
    for level in CONTOUR_LEVELS:
        colour = (*level_colour(level), 255)
        contours, _ = cv2.findContours((heat >= level).astype(np.uint8), cv2.RETR_LIST,
                                       cv2.CHAIN_APPROX_SIMPLE)
        for contour in contours:
            (x, y), radius = cv2.minEnclosingCircle(contour)
            if radius < min_radius:
                cv2.circle(layer, (round(x), round(y)), min_radius, colour, thickness, cv2.LINE_AA)
            else:
                cv2.drawContours(layer, [contour], -1, colour, thickness, cv2.LINE_AA)
    if location is not None:
        scale = cols / source_shape[1]
        centre = (round(location.col * scale), round(location.row * scale))
        radius = max(round(location.radius * scale), 4 * thickness)
        cv2.circle(layer, centre, radius, (0, 0, 0, 0), -1)  # the finding itself stays clear
        cv2.circle(layer, centre, radius, (*_CIRCLE_RGB, 255), thickness, lineType=cv2.LINE_AA)
    # OpenCV's anti-aliasing blends every channel towards the transparent black canvas, which
    # leaves colours premultiplied by alpha at the line edges; return straight alpha, as PNG has it.
    drawn = layer[..., 3] > 0
    alpha = layer[drawn, 3:].astype(np.float32)
    layer[drawn, :3] = np.clip(np.round(layer[drawn, :3] * (255.0 / alpha)), 0, 255).astype(np.uint8)
    return layer


def render_overlay(display: np.ndarray, heatmap: np.ndarray, location: Location | None, *,
                   long_side: int, patient_orientation: Sequence[str] | None = None) -> np.ndarray:
    """RGB uint8: `display` scaled to `long_side` with the explanation layer and side markers."""
    rows, cols = display.shape
    scale = long_side / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    gray = cv2.resize(display, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    layer = explanation_layer(heatmap, location, source_shape=display.shape, size=size)
    alpha = layer[..., 3:].astype(np.float32) / 255
    rgb = (gray[..., None] * (1 - alpha) + layer[..., :3] * alpha).astype(np.uint8)
    _draw_side_markers(rgb, side_markers(patient_orientation))
    return rgb


def side_markers(patient_orientation: Sequence[str] | None) -> dict[str, str]:
    """Letters for the image's left, right, top and bottom edges from Patient Orientation.

    Its first value is the patient direction of the rows (towards the image's
    right edge), its second that of the columns (towards the bottom), e.g.
    ("L", "F") for a PA chest: "L" at the right edge, "R" at the left. An absent or
    malformed value gives no markers (never a guess burned into the image).
    """
    if patient_orientation is None or len(patient_orientation) != 2:
        return {}
    row_direction, column_direction = (str(value).strip().upper() for value in patient_orientation)
    if not all(value and set(value) <= set("LRAPHF") for value in (row_direction, column_direction)):
        return {}
    return {"right": row_direction, "left": row_direction.translate(_OPPOSITE),
            "bottom": column_direction, "top": column_direction.translate(_OPPOSITE)}


def percent(probability: float) -> str:
    """A probability as a whole percentage that never reads as certainty: '>99%' and '<1%' at the ends."""
    if probability >= 0.995:
        return ">99%"
    if probability < 0.005:
        return "<1%"
    return f"{probability:.0%}"


def legend_lines(prediction: Prediction) -> tuple[str, ...]:
    """The legend's text lines above the colour bar."""
    finding = "PRESENT" if prediction.positive else "absent"
    result = (f"Nodule {finding}: probability {percent(prediction.probability)}, "
              f"uncertainty {prediction.uncertainty:.2f}")
    if prediction.threshold is not None:
        result += f", threshold {prediction.threshold:.0%}"
    return (f"Model {prediction.model.name} version {prediction.model.version}", result)


def render_heatmap_image(image: PreparedImage, prediction: Prediction,
                         patient_orientation: Sequence[str] | None) -> np.ndarray:
    """The secondary capture's pixels: the overlay with the legend band below it."""
    long_side = min(MAX_SIDE, max(MIN_SIDE, max(image.display.shape)))
    overlay = render_overlay(image.display, prediction.heatmap, prediction.location,
                             long_side=long_side, patient_orientation=patient_orientation)
    notes = () if side_markers(patient_orientation) else (NO_ORIENTATION,)
    band = _legend_band(legend_lines(prediction) + notes, overlay.shape[1])
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
    orientation = source.get("PatientOrientation")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=render_heatmap_image(image, prediction, orientation),
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
    sc.add_new("PatientOrientation", "CS", orientation or "")  # empty: a str, where the attribute is typed as a list
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = "Grad-CAM contours of the AI nodule model on the source image"
    return sc


def explanation_png(heatmap: np.ndarray) -> bytes:
    """The Grad-CAM map as an 8-bit grey PNG, long side at most EXPLANATION_MAX_SIDE."""
    rows, cols = heatmap.shape
    scale = min(1.0, EXPLANATION_MAX_SIDE / max(rows, cols))
    small = cv2.resize(np.asarray(heatmap, np.float32), (max(1, round(cols * scale)), max(1, round(rows * scale))),
                       interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".png", np.round(np.clip(small, 0, 1) * 255).astype(np.uint8))
    if not ok:
        raise RuntimeError("PNG encoding of the explanation map failed")
    return encoded.tobytes()


def read_explanation_png(data: bytes) -> np.ndarray:
    """The map `explanation_png` wrote, as float32 in [0, 1]; ValueError if it is no grey PNG."""
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.ndim != 2 or decoded.dtype != np.uint8:
        raise ValueError("explanation map is not an 8-bit grey PNG")
    return decoded.astype(np.float32) / 255


def _colour_map(values: np.ndarray) -> np.ndarray:
    """RGB uint8 of Grad-CAM values: OpenCV's AUTUMN reversed, so high is red; never green like the circle."""
    grey = np.round(255 - np.clip(values, 0, 1) * 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_AUTUMN), cv2.COLOR_BGR2RGB)


def _thickness(size: tuple[int, int]) -> int:
    return max(2, round(max(size) / 400))


def _draw_side_markers(rgb: np.ndarray, markers: dict[str, str]) -> None:
    """Burn the side letters in white with a black rim, centred on each edge."""
    rows, cols = rgb.shape[:2]
    scale = max(0.4, max(rows, cols) / 900)
    thickness = max(1, round(scale * 2))
    margin = max(4, round(max(rows, cols) / 100))
    for side, text in markers.items():
        (width, height), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
        x = {"left": margin, "right": cols - margin - width}.get(side, (cols - width) // 2)
        y = {"top": margin + height, "bottom": rows - margin - baseline}.get(side, (rows + height) // 2)
        cv2.putText(rgb, text, (x, y), _FONT, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(rgb, text, (x, y), _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def _legend_band(lines: tuple[str, ...], width: int) -> np.ndarray:
    """Black band: text lines, the colour bar with its caption and level ticks, the disclaimer in yellow."""
    margin = max(6, width // 80)
    texts = (*lines, COLOUR_BAR_CAPTION, DISCLAIMER)
    base_width = max(cv2.getTextSize(text, _FONT, 1.0, 2)[0][0] for text in texts)
    font_scale = min(1.0, (width - 2 * margin) / base_width)
    thickness = 2 if font_scale >= 0.6 else 1
    (_, text_height), baseline = cv2.getTextSize("Ag", _FONT, font_scale, thickness)
    line_height = text_height + baseline + margin // 2
    bar_height = max(8, line_height // 2)
    rows = [(text, (255, 255, 255)) for text in (*lines, COLOUR_BAR_CAPTION)]
    band = np.zeros((line_height * (len(rows) + 2) + bar_height + margin, width, 3), dtype=np.uint8)
    y = margin // 2
    for text, colour in rows:
        cv2.putText(band, text, (margin, y + text_height), _FONT, font_scale, colour, thickness, cv2.LINE_AA)
        y += line_height
    # The colour bar: 0 at the left, 1 at the right, a tick and its value at each contour level.
    bar_width = width - 2 * margin
    band[y:y + bar_height, margin:margin + bar_width] = _colour_map(
        np.tile(np.linspace(0, 1, bar_width, dtype=np.float32), (bar_height, 1)))
    for level in (0.0, *CONTOUR_LEVELS, 1.0):
        x = margin + round(level * (bar_width - 1))
        band[y + bar_height:y + bar_height + margin // 2, max(margin, x - 1):x + 1] = 255
        label = f"{level:g}"
        label_width = cv2.getTextSize(label, _FONT, font_scale, thickness)[0][0]
        x = min(max(margin, x - label_width // 2), width - margin - label_width)
        cv2.putText(band, label, (x, y + bar_height + margin // 2 + text_height), _FONT, font_scale,
                    (255, 255, 255), thickness, cv2.LINE_AA)
    y += bar_height + line_height
    cv2.putText(band, DISCLAIMER, (margin, y + text_height), _FONT, font_scale, _WARNING_RGB, thickness,
                cv2.LINE_AA)
    return band
