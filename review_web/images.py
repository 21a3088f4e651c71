"""What the case page shows from a job's files: the display PNG, the Grad-CAM overlay PNG, the PDF report.

The display image comes from the spooled source through `inference.preprocess.prepare`
(the pixels the model saw, before letterboxing). The overlay is taken from the
heatmap secondary capture sent to the PACS (`results_dir/heatmap.dcm`): the
pixels where it differs from the plain display image (the Grad-CAM colours and
the finding's circle) on a transparent background, so it lies over the display
image at any window. Without results it is a circle at the job's location.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom

from inference.preprocess import prepare
from node.db import Job

MAX_SIDE = 1024  # longest side of the PNGs sent to the browser
_DIFFERENCE = 6  # grey levels: below this an overlay pixel is the plain image
_CIRCLE_RGBA = (0, 255, 0, 255)


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
    """Transparent RGBA PNG, the size of `display_png`, with the Grad-CAM overlay."""
    source = prepare(ds).display
    rows, cols = _fit(source).shape
    rgba = np.zeros((rows, cols, 4), np.uint8)
    heatmap_path = Path(job.results_dir or "") / "heatmap.dcm"
    if job.results_dir and heatmap_path.is_file():
        sc = pydicom.dcmread(heatmap_path).pixel_array  # RGB: overlay on top, legend band below
        overlay_rows = round(sc.shape[1] * rows / cols)
        overlay = sc[:overlay_rows]
        shrink = overlay.shape[1] < source.shape[1]  # as sr_writer.heatmap.render_overlay resizes
        grey = cv2.resize(source, (overlay.shape[1], overlay.shape[0]),
                          interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        differs = np.abs(overlay.astype(np.int16) - grey[..., None]).max(axis=2) >= _DIFFERENCE
        coloured = np.dstack([overlay, np.where(differs, 255, 0).astype(np.uint8)])
        rgba = cv2.resize(coloured, (cols, rows), interpolation=cv2.INTER_NEAREST)
    elif job.location_row is not None and job.location_col is not None:
        scale = cols / ds.Columns
        centre = (round(job.location_col * scale), round(job.location_row * scale))
        radius = max(round((job.location_radius or 10.0) * scale), 8)
        cv2.circle(rgba, centre, radius, _CIRCLE_RGBA, max(2, round(cols / 300)), lineType=cv2.LINE_AA)
    else:
        raise MissingFile(f"job {job.id}: no heatmap among its results and no location")
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


def _fit(image: np.ndarray) -> np.ndarray:
    rows, cols = image.shape[:2]
    scale = MAX_SIDE / max(rows, cols)
    if scale >= 1:
        return image
    return cv2.resize(image, (round(cols * scale), round(rows * scale)), interpolation=cv2.INTER_AREA)


def _png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()
