"""What the case page shows from a job's files: the display PNG, the Grad-CAM overlay PNG, the PDF report.

The display image comes from the spooled source through `inference.preprocess.prepare`
(the pixels the model saw, before letterboxing). The overlay is drawn by the same
function that draws it into the heatmap secondary capture sent to the PACS,
`sr_writer.heatmap.explanation_layer`, from the explanation map the worker keeps
beside the results (`results_dir/explanation.png`) and the job's location, on a
transparent background, so it lies over the display image at any window. Without
that map it is the circle at the job's location alone.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom

from inference.preprocess import prepare
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
