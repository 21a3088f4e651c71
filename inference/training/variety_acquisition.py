"""Owns how `variety.generate_varied` turns a varied body into a stored image.

Geometry (patient placement, rotation, shear, inspiration depth, image aspect),
collimation (field edges, unexposed or electronically shuttered borders), the
exposure (beam quality, dose, scatter), anti-scatter grid lines, detector blur
and noise spectra (quantum, correlated, banding), vendor post-processing
(dynamic range compression, multi-band unsharp masking, tone curves) and
storage (bit depth, MONOCHROME1 or 2, used value range). Each stage takes its
own random generator and a flag; switched off it applies a fixed default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from inference.training.phantoms import _smooth

BITS = (8, 10, 12, 14, 15, 16)
_BITS_P = (0.1, 0.15, 0.35, 0.2, 0.1, 0.1)


@dataclass(frozen=True)
class Geometry:
    """Affine map from render pixels to image pixels, and the image shape."""

    matrix: np.ndarray  # 2 x 3
    shape: tuple[int, int]  # rows, cols
    zoom: float  # isotropic part of the map: image pixels per render pixel

    def points(self, col_row: tuple[float, float]) -> tuple[float, float]:
        c, r = col_row
        m = self.matrix
        return float(m[0, 0] * c + m[0, 1] * r + m[0, 2]), float(m[1, 0] * c + m[1, 1] * r + m[1, 2])

    def warp(self, img: np.ndarray, nearest: bool = False) -> np.ndarray:
        rows, cols = self.shape
        if nearest:
            return cv2.warpAffine(img, self.matrix, (cols, rows), flags=cv2.INTER_NEAREST, borderValue=0)
        return cv2.warpAffine(img, self.matrix, (cols, rows), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def geometry(rng: np.random.Generator, size: int, zones: np.ndarray, *, placement: bool, inspiration: bool,
             ap: bool, wide: float) -> Geometry:
    """Place the lungs in an image of long side `size`: aspect, zoom, rotation, shear, inspiration, build width."""
    rows = cols = size
    if placement:
        u = rng.random()
        if u < 0.3:
            cols = int(round(size * rng.uniform(0.78, 0.95)))  # portrait detector
        elif u < 0.45:
            rows = int(round(size * rng.uniform(0.8, 0.95)))  # landscape, wide patients
    x0, y0, bw, bh = cv2.boundingRect(zones)
    centre = (x0 + bw / 2.0, y0 + bh / 2.0)
    sy = (rng.uniform(0.80, 1.0) if ap else rng.uniform(0.86, 1.08)) if inspiration else 1.0
    sy *= 0.93 if ap else 1.0  # AP films are shallower and lordotic
    sx = wide
    if placement:
        theta = math.radians(float(np.clip(rng.normal(0.0, 4.0), -12.0, 12.0)))
        shear = rng.uniform(-0.05, 0.05)
        fill = rng.uniform(0.55, 0.84)
        target = (cols * (0.5 + rng.uniform(-0.05, 0.05)), rows * rng.uniform(0.40, 0.50))
    else:
        theta, shear, fill, target = 0.0, 0.0, 0.68, (cols / 2.0, rows * 0.45)
    zoom = min(fill * cols / (bw * sx), 0.9 * rows / (bh * sy))
    c, s = math.cos(theta), math.sin(theta)
    lin = np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([zoom * sx, zoom * sy])
    shift = np.array(target) - lin @ np.array(centre)
    return Geometry(np.hstack([lin, shift[:, None]]).astype(np.float64), (rows, cols), float(zoom))


def collimation(rng: np.random.Generator, shape: tuple[int, int], on: bool) -> tuple[np.ndarray, str]:
    """The exposed field (bool) and how the border looks: 'open', 'scatter', 'black' or 'white'."""
    rows, cols = shape
    field = np.ones(shape, bool)
    if not on or rng.random() < 0.25:
        return field, "open"
    m = rng.uniform(0.0, 0.11, 4) * np.array([cols, rows, cols, rows])
    corners = np.array([[m[0], m[1]], [cols - m[2], m[1]], [cols - m[2], rows - m[3]], [m[0], rows - m[3]]])
    a = math.radians(rng.uniform(-2.5, 2.5))
    mid = corners.mean(axis=0)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    poly = np.round((corners - mid) @ rot.T + mid).astype(np.int32)
    img = np.zeros(shape, np.uint8)
    cv2.fillPoly(img, [poly], 1)
    style = str(rng.choice(["scatter", "black", "white"], p=[0.6, 0.2, 0.2]))
    return img > 0, style


@dataclass(frozen=True)
class Exposure:
    """Which acquisition kinds are drawn at random (the others take fixed defaults)."""

    exposure: bool
    grid: bool
    noise: bool
    processing: bool
    ap: bool


def expose(seed_rngs: dict[str, np.random.Generator], att: np.ndarray, spacing: float, on: Exposure) -> np.ndarray:
    """Detector signal -> processed display values in [0, 1] (bright = dense), float32."""
    px_mm = 1.0 / spacing
    r = seed_rngs["exposure"]
    quality = r.uniform(0.8, 1.15) if on.exposure else 1.0  # lower kVp: more contrast
    spr = (r.uniform(0.1, 0.6) if on.exposure else 0.3) + (0.35 if on.ap else 0.0)  # portable: often no grid
    photons = (r.uniform(5e4, 5e5) if on.exposure else 2e5) / (3.0 if on.ap else 1.0)  # and less dose
    primary = np.exp(-quality * att)
    signal = primary + spr * _smooth(primary, (r.uniform(20, 50) if on.exposure else 30.0) * px_mm)
    if on.grid:
        g = seed_rngs["grid"]
        if g.random() < 0.4:
            period = g.uniform(2.2, 7.0)
            axis = int(g.integers(2))
            coord = np.arange(signal.shape[axis], dtype=np.float32)
            stripes = 1.0 + g.uniform(0.002, 0.01) * np.sin(2 * np.pi * coord / period + g.uniform(0, 6.3))
            signal = signal * (stripes[:, None] if axis == 0 else stripes[None, :]).astype(np.float32)
    n = seed_rngs["noise"]
    signal = _smooth(signal, n.uniform(0.35, 1.0) if on.noise else 0.5)
    photons *= spacing * spacing
    noise = n.standard_normal(att.shape, dtype=np.float32)
    if on.noise:
        corr = n.uniform(0.0, 1.2)
        if corr > 0.3:  # correlated (scintillator spread) noise, renormalised to unit variance
            noise = (_smooth(noise, corr) * (2.0 * math.sqrt(math.pi) * corr)).astype(np.float32, copy=False)
        if n.random() < 0.3:  # row or column banding of the read-out
            axis = int(n.integers(2))
            band = n.uniform(0.05, 0.3) * n.standard_normal(size=(att.shape[axis],)).astype(np.float32)
            noise += band[:, None] if axis == 0 else band[None, :]
    electronic = n.uniform(0.0, 1e-3) ** 2 if on.noise else 0.0  # read-out noise, in unattenuated signal units
    log_sig = -np.log(np.maximum(signal, 1e-6))
    log_sig += noise * np.sqrt(1.0 / (photons * np.maximum(signal, 1e-6)) + electronic / (signal * signal))
    return _process(seed_rngs["processing"], log_sig, px_mm, on.processing)


def _process(rng: np.random.Generator, log_sig: np.ndarray, px_mm: float, on: bool) -> np.ndarray:
    """Vendor processing: dynamic range compression, two unsharp bands, a tone curve; off: a plain window."""
    if on:
        log_sig = log_sig - rng.uniform(0.1, 0.5) * _smooth(log_sig, rng.uniform(25, 60) * px_mm)
        for lo_mm, hi_mm, most in ((1.0, 4.0, 1.3), (5.0, 15.0, 0.6)):
            k = rng.uniform(lo_mm, hi_mm) * px_mm
            log_sig = log_sig + rng.uniform(0.0, most) * (log_sig - _smooth(log_sig, k))
        lo_p, hi_p = rng.uniform(0.5, 12.0), rng.uniform(98.5, 99.9)  # direct exposure often clipped
    else:
        lo_p, hi_p = 1.0, 99.5
    lo, hi = np.percentile(log_sig[::4, ::4], [lo_p, hi_p])
    z = np.clip((log_sig - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if not on:
        return z.astype(np.float32)
    curve = rng.integers(3)
    if curve == 0:  # film-like S curve
        g, mid = rng.uniform(2.5, 6.0), rng.uniform(0.45, 0.7)
        ends = 1.0 / (1.0 + np.exp(-g * (np.array([0.0, 1.0]) - mid)))
        z = (1.0 / (1.0 + np.exp(-g * (z - mid))) - ends[0]) / (ends[1] - ends[0])
    elif curve == 1:
        z = z ** rng.uniform(0.6, 1.6)
    return z.astype(np.float32)


def store(rng: np.random.Generator, display: np.ndarray, on: bool) -> tuple[np.ndarray, int, bool]:
    """Quantise display values to stored MONOCHROME2 values; returns (pixels, bits_stored, monochrome1)."""
    bits = int(rng.choice(BITS, p=_BITS_P)) if on else 12
    mono1 = bool(rng.random() < 0.4) if on else False
    lo, hi = (rng.uniform(0.0, 0.06), rng.uniform(0.82, 1.0)) if on else (0.0, 1.0)
    top = (1 << bits) - 1
    return np.rint((lo + (hi - lo) * np.clip(display, 0.0, 1.0)) * top).astype(np.uint16), bits, mono1
