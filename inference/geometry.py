"""Owns where a source image lies inside the square model input (`Letterbox`).

Two placements, one geometry: fitted (the longer side fills the input, as a
model without a physical scale reads) and physical (source pixels resampled to
a fixed number of millimetres per model pixel from the image's pixel spacing,
so a 10 mm nodule has the same size in the model input on every detector; a
field larger than the input is scaled down until it fits). Either way the
content is centred and the rest is zero. Serving (`inference.preprocess`),
training targets and the mapping of heatmaps back to the source all use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Letterbox:
    """A source image of `source_shape` scaled by (`row_scale`, `col_scale`) model px per source px,
    centred in an `input_size` square.

    Pixel-centre convention, as cv2.resize: model = (source + 0.5) * scale - 0.5 + offset.
    """

    source_shape: tuple[int, int]
    input_size: int
    row_scale: float
    col_scale: float

    def __post_init__(self) -> None:
        if min(self.source_shape) < 1:
            raise ValueError(f"source_shape must be positive, got {self.source_shape}")
        if self.input_size < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        if not (self.row_scale > 0 and self.col_scale > 0 and math.isfinite(self.row_scale * self.col_scale)):
            raise ValueError(f"scales must be positive and finite, got {(self.row_scale, self.col_scale)}")

    @property
    def height(self) -> int:
        return min(self.input_size, max(1, round(self.source_shape[0] * self.row_scale)))

    @property
    def width(self) -> int:
        return min(self.input_size, max(1, round(self.source_shape[1] * self.col_scale)))

    @property
    def top(self) -> int:
        return (self.input_size - self.height) // 2

    @property
    def left(self) -> int:
        return (self.input_size - self.width) // 2

    @property
    def scale(self) -> float:
        """Nominal isotropic scale (model px per source px), e.g. for radii."""
        return math.sqrt(self.row_scale * self.col_scale)

    @property
    def scale_row(self) -> float:
        return self.height / self.source_shape[0]

    @property
    def scale_col(self) -> float:
        return self.width / self.source_shape[1]

    def at(self, size: int) -> Letterbox:
        """The same placement in a `size` square (a heatmap, a segmentation input)."""
        k = size / self.input_size
        return Letterbox(self.source_shape, size, self.row_scale * k, self.col_scale * k)

    def to_model(self, row: float, col: float) -> tuple[float, float]:
        """A source pixel coordinate (pixel centres) in model-input pixels; radii scale by `scale`."""
        return (row + 0.5) * self.scale_row - 0.5 + self.top, (col + 0.5) * self.scale_col - 0.5 + self.left

    def to_source(self, row: float, col: float) -> tuple[float, float]:
        """A model-input pixel coordinate (pixel centres) in source pixels."""
        return (row - self.top + 0.5) / self.scale_row - 0.5, (col - self.left + 0.5) / self.scale_col - 0.5

    def resize(self, source: np.ndarray, interpolation: int = cv2.INTER_AREA) -> np.ndarray:
        """The source array resized to the content box (height, width)."""
        return cv2.resize(source, (self.width, self.height), interpolation=interpolation)

    def pad(self, content: np.ndarray) -> np.ndarray:
        """Content of the box's size centred in a zero square of `input_size`, dtype kept."""
        out = np.zeros((self.input_size, self.input_size), content.dtype)
        out[self.top:self.top + self.height, self.left:self.left + self.width] = content
        return out

    def content(self, square: np.ndarray) -> np.ndarray:
        """The content box of an `input_size` square (a view)."""
        return square[self.top:self.top + self.height, self.left:self.left + self.width]

    def map_to_source(self, model_map: np.ndarray) -> np.ndarray:
        """A square map over the model input (any resolution, e.g. a stride-4 heatmap) in the source
        geometry: crop the content box, resize bilinearly. Returns float32."""
        if model_map.ndim != 2 or model_map.shape[0] != model_map.shape[1]:
            raise ValueError(f"model_map must be a square 2-D array, got shape {model_map.shape}")
        m: np.ndarray = model_map.astype(np.float32, copy=False)
        if m.shape[0] != self.input_size:
            m = cv2.resize(m, (self.input_size, self.input_size), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(self.content(m), (self.source_shape[1], self.source_shape[0]),
                          interpolation=cv2.INTER_LINEAR)


def letterbox(source_shape: tuple[int, int], input_size: int, spacing_mm: tuple[float, float] | None = None,
              mm_per_px: float | None = None) -> Letterbox:
    """Placement of `source_shape` in the input square: physical when both `spacing_mm` (row, col)
    and the model's `mm_per_px` are given (scaled down further only where the field would not fit),
    else fitted (the longer side fills the input)."""
    rows, cols = int(source_shape[0]), int(source_shape[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"source_shape must be positive, got {source_shape}")
    if spacing_mm is None or mm_per_px is None:
        fit = input_size / max(rows, cols)
        return Letterbox((rows, cols), input_size, fit, fit)
    if mm_per_px <= 0 or not math.isfinite(mm_per_px):
        raise ValueError(f"mm_per_px must be positive, got {mm_per_px!r}")
    row_scale, col_scale = spacing_mm[0] / mm_per_px, spacing_mm[1] / mm_per_px
    shrink = min(1.0, input_size / max(rows * row_scale, cols * col_scale))
    return Letterbox((rows, cols), input_size, row_scale * shrink, col_scale * shrink)
