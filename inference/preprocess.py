"""Validation and preprocessing of a DICOM chest radiograph for the model.

This module owns the step from a received dataset to a `PreparedImage`: decide
whether the instance is a chest radiograph the model reads, decode the pixels
once, apply the modality LUT, the VOI LUT or window (or a percentile window),
undo MONOCHROME1, and place it in the square model input: fitted, or at the
model card's physical scale from the Pixel Spacing (`inference.geometry`). The
array-level step (`prepare_array`) and the geometry are shared with training
and with the predictor, so train and serve see the same pixels.

What is accepted:
- Modality CR or DX, with BodyPartExamined CHEST, THORAX or LUNG, or absent
  (many CR devices leave it empty; flagged `body_part_missing`).
- Modality SC or OT (digitised films, screenshots) only when BodyPartExamined is
  explicitly chest-like (flagged `secondary_capture`); anything else is SKIPPED.
- ViewPosition PA or AP (AP flagged `ap_view`), or absent (flagged
  `view_position_missing`); lateral and other views are SKIPPED.
- One frame, one sample per pixel, MONOCHROME1/2, 8-32 bits allocated, signed or
  not, any size whose shorter side is at least `MIN_SIDE_PX`, any transfer
  syntax that pydicom's pixel handlers decode (pylibjpeg: JPEG, JPEG-LS,
  JPEG 2000, RLE).

`NotApplicable` (job SKIPPED) and `Unreadable` (job REJECTED) carry a reason
"code: detail" whose code is stable: not_an_image, modality_not_supported,
body_part_not_chest, lateral_view, view_not_supported, multi_frame,
photometric_not_supported (NotApplicable); too_small, bits_not_supported,
pixel_data_truncated, pixel_data_unreadable, no_dynamic_range (Unreadable).

Display polarity: MONOCHROME1 is inverted; so is a MONOCHROME2 image whose
Presentation LUT Shape is INVERSE (flagged `presentation_lut_inverse`). A
MONOCHROME1 image with INVERSE, as the DX module prescribes (PS3.3
C.8.11.7.1.1), is inverted once, not twice.
"""
from __future__ import annotations

import math
from collections.abc import Callable
import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (JPEG2000, HTJ2K, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless,
                         UID)

from inference.geometry import Letterbox, letterbox
from inference.types import NotApplicable, PreparedImage, Unreadable

MODEL_INPUT_SIZE = 512
MIN_SIDE_PX = 256

ACCEPTED_MODALITIES = frozenset({"CR", "DX"})
CAPTURE_MODALITIES = frozenset({"SC", "OT"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})
LOSSY_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K})

SATURATED_FRACTION = 0.3  # share of pixels clipped by the window
LOW_RANGE_LEVELS = 32  # stored levels between the 1st and 99th percentile
LOW_RANGE_DISPLAY = 0.15  # display contrast between the 1st and 99th percentile
# The longer side of a chest radiograph's field: a neonate's film is about 150 mm, the largest detectors 430 mm;
# a spacing that makes the field smaller or much larger than these is wrong, and read as none.
FIELD_MM = (100.0, 800.0)

# Estimates a source pixel spacing (mm) from a fitted model input and its placement, or None (`inference.lung_seg`)
ThoraxSpacing = Callable[[np.ndarray, Letterbox], "float | None"]


def prepare_array(display_float: np.ndarray, geometry: Letterbox) -> np.ndarray:
    """The model's view of a VOI-applied image in [0, 1] (bright = dense, any geometry).

    Placed by `geometry` with cv2.INTER_AREA (centred, zero padding), then
    per-image 1-99 percentile normalisation of the content, clipped to [0, 1].
    float32 (input_size, input_size).
    """
    if display_float.ndim != 2:
        raise ValueError(f"display_float must be 2-D, got shape {display_float.shape}")
    if display_float.shape != geometry.source_shape:
        raise ValueError(f"display_float has shape {display_float.shape}, geometry is for {geometry.source_shape}")
    content = geometry.resize(display_float.astype(np.float32, copy=False))
    p1, p99 = np.percentile(content, [1.0, 99.0])
    content = (content - np.float32(p1)) / np.float32(max(p99 - p1, 1e-6))
    np.clip(content, 0.0, 1.0, out=content)
    return geometry.pad(content)


def place(display_float: np.ndarray, input_size: int, spacing: tuple[float, float] | None, mm_per_px: float | None,
          thorax_spacing: ThoraxSpacing | None = None) -> tuple[np.ndarray, Letterbox, list[str]]:
    """Model input and placement of a display image of known (or no) `spacing`: physical at `mm_per_px`
    where both are known; without a spacing, at `thorax_spacing`'s estimate (flags ["spacing_estimated"])
    when it gives one of a plausible field, else fitted."""
    geometry = letterbox(display_float.shape, input_size, spacing, mm_per_px)
    model_input = prepare_array(display_float, geometry)
    if spacing is not None or mm_per_px is None or thorax_spacing is None:
        return model_input, geometry, []
    estimate = thorax_spacing(model_input, geometry)
    if estimate is None or not FIELD_MM[0] <= max(display_float.shape) * estimate <= FIELD_MM[1]:
        return model_input, geometry, []
    geometry = letterbox(display_float.shape, input_size, (estimate, estimate), mm_per_px)
    return prepare_array(display_float, geometry), geometry, ["spacing_estimated"]


def default_window(pixels: np.ndarray) -> tuple[float, float]:
    """Window (centre, width) a vendor would store: the 0.5-99.5 percentile range of the image."""
    lo, hi = np.percentile(pixels[::4, ::4], [0.5, 99.5])
    lo, width = math.floor(lo), max(math.ceil(hi) - math.floor(lo), 2)  # exact in a DS string
    return lo + width / 2.0, float(width)


def prepare(ds: pydicom.Dataset, *, input_size: int = MODEL_INPUT_SIZE, mm_per_px: float | None = None,
            thorax_spacing: ThoraxSpacing | None = None) -> PreparedImage:
    """Validate `ds` as a chest radiograph and prepare it; raises NotApplicable or Unreadable.

    With `mm_per_px` (the model card's physical scale) the image is resampled from its
    Pixel Spacing (or Imager Pixel Spacing) to that many millimetres per model pixel;
    without a usable spacing it is fitted to the input, and flagged (`no_pixel_spacing`,
    `invalid_pixel_spacing`), which sends the read to review. `thorax_spacing` may then
    estimate the spacing from the fitted image (the lung fields' span); the image is
    resampled at the estimate and flagged `spacing_estimated` as well.

    Attributes of impossible type or multiplicity (a multi-valued Rows, a text in
    BitsAllocated, ...) end as Unreadable "header_invalid" rather than an error.
    """
    try:
        return _prepare(ds, input_size, mm_per_px, thorax_spacing)
    except (NotApplicable, Unreadable):
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError, NotImplementedError) as exc:
        detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        raise Unreadable(f"header_invalid: {detail[:200]}") from exc


def _prepare(ds: pydicom.Dataset, input_size: int, mm_per_px: float | None,
             thorax_spacing: ThoraxSpacing | None) -> PreparedImage:
    flags = _validate(ds)
    stored = _decode(ds)
    lo, hi = stored.min(), stored.max()
    if lo == hi:
        raise Unreadable(f"no_dynamic_range: every pixel is {lo}")
    step = max(1, min(stored.shape) // 512)
    values = _modality(ds, stored)
    display, window_flags = _voi(ds, values, step)
    inverse_lut = _text(ds, "PresentationLUTShape") == "INVERSE"
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1" or inverse_lut:
        np.subtract(np.float32(1.0), display, out=display)
        if str(ds.PhotometricInterpretation).strip() != "MONOCHROME1":
            window_flags.append("presentation_lut_inverse")
    flags += window_flags + _quality(stored, display, step)
    spacing, spacing_flags = _spacing(ds, display.shape)
    model_input, geometry, estimated = place(display, input_size, spacing, mm_per_px, thorax_spacing)
    spacing_flags += estimated
    display_u8 = np.empty(display.shape, np.uint8)
    np.multiply(display, np.float32(255.0), out=display)
    np.add(display, np.float32(0.5), out=display)
    display_u8[...] = display
    return PreparedImage(sop_instance_uid=str(ds.get("SOPInstanceUID", "")), display=display_u8,
                         model_input=model_input, pixel_spacing_mm=spacing, geometry=geometry,
                         quality_flags=tuple(flags + spacing_flags))


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip().upper()


def read_dataset(source) -> pydicom.Dataset:
    """Read a DICOM file (path or binary file object) for `prepare`; any parse failure is Unreadable.

    pydicom parses elements lazily; every element is parsed here (pixels are not decoded),
    so a corrupt header fails now with a reason rather than later in the pipeline.
    """
    try:
        ds = pydicom.dcmread(source)
        for _ in ds.iterall():
            pass
        return ds
    except Exception as exc:  # pydicom raises many kinds (InvalidDicomError, zlib.error, struct.error, ...)
        detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        raise Unreadable(f"file_unreadable: {detail[:200]}") from exc


def _validate(ds: pydicom.Dataset) -> list[str]:
    """Checks that need no pixel decoding; returns quality flags."""
    flags: list[str] = []
    if "PixelData" not in ds:
        other = next((k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
        raise NotApplicable(f"not_an_image: {other} not supported" if other else "not_an_image: no Pixel Data")
    modality = _text(ds, "Modality")
    body_part = _text(ds, "BodyPartExamined")
    if modality in CAPTURE_MODALITIES:
        if body_part not in CHEST_BODY_PARTS:
            raise NotApplicable(f"modality_not_supported: {modality} without a chest BodyPartExamined")
        flags.append("secondary_capture")
    elif modality not in ACCEPTED_MODALITIES:
        raise NotApplicable(f"modality_not_supported: {modality or '(none)'}")
    if not body_part:
        flags.append("body_part_missing")
    elif body_part not in CHEST_BODY_PARTS:
        raise NotApplicable(f"body_part_not_chest: {body_part}")
    view = _text(ds, "ViewPosition")
    if view in LATERAL_VIEWS:
        raise NotApplicable(f"lateral_view: ViewPosition {view}")
    if not view:
        flags.append("view_position_missing")
    elif view not in FRONTAL_VIEWS:
        raise NotApplicable(f"view_not_supported: ViewPosition {view}")
    elif view == "AP":
        flags.append("ap_view")
    frames = ds.get("NumberOfFrames")
    if frames not in (None, "") and int(frames) > 1:
        raise NotApplicable(f"multi_frame: {int(frames)} frames")
    photometric = _text(ds, "PhotometricInterpretation")
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise NotApplicable(f"photometric_not_supported: {photometric or '(none)'}")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if min(rows, cols) < MIN_SIDE_PX:
        raise Unreadable(f"too_small: {rows}x{cols}")
    bits = int(ds.get("BitsAllocated") or 0)
    if bits not in (8, 16, 32):
        raise Unreadable(f"bits_not_supported: BitsAllocated {bits}")
    syntax = _transfer_syntax(ds)
    if not ds.PixelData:
        raise Unreadable("pixel_data_truncated: Pixel Data is empty")
    if syntax is not None and not syntax.is_encapsulated:
        expected = rows * cols * bits // 8
        if len(ds.PixelData) < expected:
            raise Unreadable(f"pixel_data_truncated: {len(ds.PixelData)} of {expected} bytes")
    if _text(ds, "PresentationIntentType") == "FOR PROCESSING":
        flags.append("for_processing")
    if _text(ds, "LossyImageCompression") == "01" or syntax in LOSSY_SYNTAXES:
        flags.append("lossy_compressed")
    return flags


def _transfer_syntax(ds: pydicom.Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        return None
    if not UID(syntax).is_transfer_syntax:
        raise Unreadable(f"transfer_syntax_unknown: {str(syntax)[:64]}")
    return UID(syntax)


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as exc:  # any decoder failure is an unreadable instance
        detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        raise Unreadable(f"pixel_data_unreadable: {detail[:200]}") from exc
    if arr.ndim != 2:
        raise Unreadable(f"pixel_data_unreadable: decoded shape {arr.shape}")
    return arr


def _modality(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """Modality LUT or rescale, as float32."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(stored, ds).astype(np.float32)
    values = stored.astype(np.float32)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _first(value: object) -> float:
    """The first number of a DS or IS element that may hold several."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0]
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"not a number: {type(value).__name__}")
    return float(value)


def _window_linear(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM LINEAR window (PS3.3 C.11.2.1.2.1) to [0, 1], float32, in place when possible."""
    if width <= 1.0:
        return (values > centre - 0.5).astype(np.float32)
    out = values if values.dtype == np.float32 else values.astype(np.float32)
    out -= np.float32(centre - 0.5)
    out *= np.float32(1.0 / (width - 1.0))
    out += np.float32(0.5)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _voi(ds: pydicom.Dataset, values: np.ndarray, step: int) -> tuple[np.ndarray, list[str]]:
    """VOI LUT, window (LINEAR, LINEAR_EXACT, SIGMOID) or a 0.5-99.5 percentile window, to [0, 1]."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        n, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
        table = apply_voi_lut(np.arange(first, first + n), ds, prefer_lut=True).astype(np.float32)
        out = apply_voi_lut(np.rint(values).astype(np.int32), ds, prefer_lut=True).astype(np.float32)
        lo, hi = float(table.min()), float(table.max())
        out -= np.float32(lo)
        out *= np.float32(1.0 / max(hi - lo, 1e-6))
        return out, []
    if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        centre, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = _text(ds, "VOILUTFunction") or "LINEAR"
        if width > 0 and math.isfinite(centre) and math.isfinite(width):
            if function == "SIGMOID":
                return (1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))).astype(np.float32), []
            if function == "LINEAR_EXACT":
                out = (values - np.float32(centre)) / np.float32(width) + np.float32(0.5)
                return np.clip(out, 0.0, 1.0, out=out), []
            return _window_linear(values, centre, width), []
    lo, hi = np.percentile(values[::step, ::step], [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    out = values - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out, ["default_window"]


def _quality(stored: np.ndarray, display: np.ndarray, step: int) -> list[str]:
    sub = display[::step, ::step]
    d1, d99 = np.percentile(sub, [1.0, 99.0])
    if d99 - d1 <= 0.0:
        raise Unreadable("no_dynamic_range: 98% of pixels display alike")
    flags = []
    if np.count_nonzero((sub <= 0.0) | (sub >= 1.0)) > SATURATED_FRACTION * sub.size:
        flags.append("saturated_exposure")
    s1, s99 = np.percentile(stored[::step, ::step], [1.0, 99.0])
    if d99 - d1 < LOW_RANGE_DISPLAY or s99 - s1 < LOW_RANGE_LEVELS:
        flags.append("low_dynamic_range")
    return flags


def _spacing(ds: pydicom.Dataset, shape: tuple[int, ...]) -> tuple[tuple[float, float] | None, list[str]]:
    """Pixel Spacing, else Imager Pixel Spacing (flagged `spacing_at_detector`), in mm (row, col); None and
    `invalid_pixel_spacing` where it is malformed, not positive, or gives a field outside FIELD_MM."""
    for keyword, flags in (("PixelSpacing", []), ("ImagerPixelSpacing", ["spacing_at_detector"])):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            return None, ["invalid_pixel_spacing"]
        field = max(shape[0] * row, shape[1] * col)
        if row > 0 and col > 0 and math.isfinite(field) and FIELD_MM[0] <= field <= FIELD_MM[1]:
            return (row, col), flags
        return None, ["invalid_pixel_spacing"]
    return None, ["no_pixel_spacing"]
