"""What the case page shows from a job's files: the viewer's pixels, the display PNG, the overlay PNG, the PDF report.

The viewer's pixels (`ViewerPixels`, from `PixelCache`) are the source at full
resolution and bit depth, after the modality LUT (or rescale) and before any
window: the browser windows them itself, so no detail is clipped on the server.
They travel as little-endian uint16 (value = stored * slope + offset); images over
`web.viewer_max_pixels` are reduced by a whole factor the viewer states. Decoding
is done once per job and kept in a small LRU cache (`web.viewer_cache_images`),
one decode at a time.

The display image comes from the spooled source through `inference.preprocess.prepare`
(the pixels the model saw, before letterboxing). The overlay is drawn by the same
function that draws it into the heatmap secondary capture sent to the PACS,
`sr_writer.heatmap.explanation_layer`, from the explanation map the worker keeps
beside the results (`results_dir/explanation.png`) and the job's location, on a
transparent background, so it lies over the display image at any window. Without
that map it is the circle at the job's location alone.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from inference.preprocess import default_window, prepare
from inference.types import Location
from node.store.db import Job
from sr_writer.heatmap import EXPLANATION_FILE, explanation_layer, read_explanation_png

MAX_SIDE = 1024  # longest side of the PNGs sent to the browser


class MissingFile(LookupError):
    """A file the page needs is not (or no longer) on disk."""


def source_dataset(job: Job) -> pydicom.Dataset:
    path = Path(job.spool_path)
    if not path.is_file():
        raise MissingFile(f"job {job.id}: the spooled source is no longer on disk")
    return pydicom.dcmread(path)


@dataclass(frozen=True)
class ViewerPixels:
    """A source image for the browser viewer: `data` is rows x cols little-endian uint16,
    value = stored * slope + offset (modality units). `reduction` is the whole factor the
    image was shrunk by to stay under the size limit (1: native resolution). `invert`: the
    image is shown inverted (MONOCHROME1, or Presentation LUT Shape INVERSE). Windows are
    (centre, width) in modality units, DICOM LINEAR."""

    data: bytes
    rows: int
    cols: int
    source_rows: int
    source_cols: int
    reduction: int
    offset: float
    slope: float
    bits_stored: int
    invert: bool
    dicom_window: tuple[float, float] | None
    presets: dict[str, tuple[float, float]]

    def meta(self) -> dict[str, object]:
        """Everything but the pixels, for the viewer's JSON."""
        return {"rows": self.rows, "cols": self.cols, "source_rows": self.source_rows,
                "source_cols": self.source_cols, "reduction": self.reduction, "offset": self.offset,
                "slope": self.slope, "bits_stored": self.bits_stored, "invert": self.invert,
                "dicom_window": self.dicom_window, "presets": self.presets}


# Radiographs have no absolute units (unlike CT's Hounsfield): the presets are windows over percentiles of the
# image's own brightness as displayed (after inversion), so "lung" is the dark half whatever the polarity.
PRESET_PERCENTILES = {"lung": (1.0, 60.0), "soft tissue": (30.0, 99.0), "bone": (60.0, 99.9), "full": (0.0, 100.0)}
UINT16_LEVELS = 65535


def viewer_pixels(ds: pydicom.Dataset, max_pixels: int) -> ViewerPixels:
    """The source's modality values at full resolution (reduced by a whole factor over `max_pixels`)."""
    stored = ds.pixel_array
    if stored.ndim != 2:
        raise MissingFile(f"the source has decoded shape {stored.shape}, not one grey frame")
    source_rows, source_cols = stored.shape
    values: np.ndarray = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)  # exact for any rescale
    reduction = max(1, math.ceil(math.sqrt(source_rows * source_cols / max_pixels)))
    if reduction > 1:
        size = (max(1, source_cols // reduction), max(1, source_rows // reduction))
        values = cv2.resize(values, size, interpolation=cv2.INTER_AREA)
    lo, hi = float(values.min()), float(values.max())
    integral = bool(np.all(values == np.round(values)))
    slope = 1.0 if integral and hi - lo <= UINT16_LEVELS else max(hi - lo, 1e-6) / UINT16_LEVELS
    quantised = np.rint((values - lo) / slope).astype("<u2")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    lut_shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    invert = photometric == "MONOCHROME1" or lut_shape == "INVERSE"
    return ViewerPixels(
        data=quantised.tobytes(), rows=values.shape[0], cols=values.shape[1], source_rows=source_rows,
        source_cols=source_cols, reduction=reduction, offset=lo, slope=slope,
        bits_stored=int(ds.get("BitsStored") or 16), invert=invert, dicom_window=_dicom_window(ds),
        presets={"auto": default_window(values), **_presets(values, invert)})


def _dicom_window(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """The first Window Center/Width of the header, None when absent or unusable."""
    try:
        centre, width = (ds.get(keyword) for keyword in ("WindowCenter", "WindowWidth"))
        if centre is None or width is None:
            return None
        first = [float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v) for v in (centre, width)]
    except (TypeError, ValueError, IndexError):
        return None
    return (first[0], first[1]) if first[1] >= 1 and all(map(math.isfinite, first)) else None


def _presets(values: np.ndarray, invert: bool) -> dict[str, tuple[float, float]]:
    sign = -1.0 if invert else 1.0
    sample = sign * values[::4, ::4]
    presets = {}
    for name, (low, high) in PRESET_PERCENTILES.items():
        lo, hi = np.percentile(sample, [low, high])
        presets[name] = (round(float(sign * (lo + hi) / 2), 3), round(max(float(hi - lo), 1.0), 3))
    return presets


class PixelCache:
    """The last `size` jobs' `ViewerPixels`, decoded one at a time (the lock bounds the server's work)."""

    def __init__(self, size: int, max_pixels: int) -> None:
        self._size, self._max_pixels = size, max_pixels
        self._items: OrderedDict[tuple[int, str], ViewerPixels] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job: Job) -> ViewerPixels:
        key = (job.id, job.spool_path)
        with self._lock:
            if key not in self._items:
                self._items[key] = viewer_pixels(source_dataset(job), self._max_pixels)
                while len(self._items) > self._size:
                    self._items.popitem(last=False)
            self._items.move_to_end(key)
            return self._items[key]


def display_png(ds: pydicom.Dataset) -> tuple[bytes, tuple[int, int]]:
    """PNG of the display image, long side at most MAX_SIDE; and the source (rows, cols)."""
    display = prepare(ds).display
    return _png(_fit(display)), display.shape


def overlay_png(job: Job, ds: pydicom.Dataset) -> bytes:
    """Transparent RGBA PNG, the size of `display_png`, with the Grad-CAM contours and the circle."""
    source_shape = (int(ds.Rows), int(ds.Columns))
    rows, cols = _fitted_shape(source_shape)
    location = None
    if job.location_row is not None and job.location_col is not None:
        location = Location(row=job.location_row, col=job.location_col, radius=job.location_radius or 10.0)
    map_path = Path(job.results_dir or "") / EXPLANATION_FILE
    if job.results_dir and map_path.is_file():
        heatmap = read_explanation_png(map_path.read_bytes())
    elif location is not None:
        heatmap = np.zeros((1, 1), np.float32)  # no map: the circle alone
    else:
        raise MissingFile(f"job {job.id}: no explanation map among its results and no location")
    rgba = explanation_layer(heatmap, location, source_shape=source_shape, size=(cols, rows))
    return _png(cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))


def report_pdf(job: Job) -> bytes:
    """The PDF encapsulated in `results_dir/pdf.dcm`, as sent to the PACS."""
    path = Path(job.results_dir or "") / "pdf.dcm"
    if not job.results_dir or not path.is_file():
        raise MissingFile(f"job {job.id}: no PDF report among its results")
    ds = pydicom.dcmread(path)
    document = bytes(ds.EncapsulatedDocument)
    length = ds.get("EncapsulatedDocumentLength")
    return document[:length] if length else document.rstrip(b"\x00")


def _fitted_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of an image of `shape` once its long side is at most MAX_SIDE."""
    rows, cols = shape[:2]
    scale = min(1.0, MAX_SIDE / max(rows, cols))
    return round(rows * scale), round(cols * scale)


def _fit(image: np.ndarray) -> np.ndarray:
    rows, cols = _fitted_shape(image.shape)
    if (rows, cols) == image.shape[:2]:
        return image
    return cv2.resize(image, (cols, rows), interpolation=cv2.INTER_AREA)


def _png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()
