"""Synthetic frontal (PA) chest radiograph phantoms, with an optional lung nodule.

This module owns the phantom generator used by training, tests, demo and
benchmarks. A phantom is built in attenuation space (line integrals of a simple
anatomical model: torso, lungs, heart, mediastinum, trachea, spine, ribs,
clavicles, diaphragm, vessels), turned into a detector signal with scatter,
blur and quantum noise, and mapped to stored values with a vendor-like
processing and tone curve (bright = dense, MONOCHROME2). Everything is
generated at the requested size directly and is deterministic from the seed.

Attenuation is in relative units: soft tissue 0.02 per mm. A solid 20 mm nodule
adds about 0.3 at its centre at `gain` 1.0, about a hilar vessel or twice a rib.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from numpy.typing import ArrayLike
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from inference.preprocess import default_window

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"

MU_TISSUE = 0.02  # per mm, soft tissue / water
MU_LUNG = 0.005  # per mm, inflated lung parenchyma
MU_BONE_EXCESS = 0.03  # per mm, bone over the soft tissue it replaces
MU_NODULE_EXCESS = MU_TISSUE - MU_LUNG  # solid nodule replacing lung

_GENERATE_KEYS = frozenset({"nodule", "gain", "diameter_mm", "bits_stored", "field_mm"})


@dataclass(frozen=True)
class Nodule:
    """Ground truth of the phantom's nodule, in pixel coordinates of the generated image."""

    row: float
    col: float
    radius_px: float
    diameter_mm: float
    contrast: float  # peak added attenuation (relative units), gain included


@dataclass(frozen=True)
class Phantom:
    """A generated radiograph: stored values (MONOCHROME2), lung masks and ground truth.

    `lung_mask` is the lung where it is seen free of the heart (nodules are placed in it);
    `lung_field` is the whole projected lung outline, the lung behind the heart included
    (the target of the lung-field segmentation, `inference.training.lung_seg_train`).
    """

    pixels: np.ndarray
    bits_stored: int
    pixel_spacing_mm: float
    lung_mask: np.ndarray
    nodule: Nodule | None
    seed: int
    lung_field: np.ndarray | None = None


@dataclass(frozen=True)
class _Frame:
    """Maps anatomical millimetres (x right on screen, y down from the lung apex) to pixels."""

    centre: tuple[float, float]  # pixel (col, row) of the anatomical origin
    px_per_mm: float  # includes the patient size factor
    cos: float
    sin: float

    def points(self, xy_mm: np.ndarray) -> np.ndarray:
        x, y = xy_mm[..., 0], xy_mm[..., 1]
        col = self.centre[0] + self.px_per_mm * (self.cos * x - self.sin * y)
        row = self.centre[1] + self.px_per_mm * (self.sin * x + self.cos * y)
        return np.stack([col, row], axis=-1)

    def grid(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Anatomical (x, y) mm of every pixel centre of a size x size image."""
        idx = np.arange(size, dtype=np.float32)
        dc = (idx - self.centre[0])[None, :]
        dr = (idx - self.centre[1])[:, None]
        k = 1.0 / self.px_per_mm
        x = k * (self.cos * dc + self.sin * dr)
        y = k * (-self.sin * dc + self.cos * dr)
        return x.astype(np.float32), y.astype(np.float32)


def _smooth(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur; large sigmas run on a downsampled copy (fast, visually identical)."""
    if sigma_px < 0.3:
        return img
    if sigma_px <= 6.0:
        return cv2.GaussianBlur(img, (0, 0), sigma_px)
    f = int(sigma_px // 3)
    h, w = img.shape
    small = cv2.resize(img, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma_px / f)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _poly(frame: _Frame, pts_mm: ArrayLike) -> np.ndarray:
    return np.round(frame.points(np.asarray(pts_mm, np.float64))).astype(np.int32)


def _soft_ellipse(x: np.ndarray, y: np.ndarray, frame: _Frame, cx: float, cy: float, ax: float, ay: float,
                  angle_rad: float) -> np.ndarray:
    """Projected thickness profile sqrt(1 - r^2) of an ellipsoid, in [0, 1] (computed in its bounding box)."""
    out = np.zeros_like(x)
    col, row = frame.points(np.array([cx, cy]))
    reach = max(ax, ay) * frame.px_per_mm + 2
    r0, r1 = max(0, int(row - reach)), min(x.shape[0], int(row + reach) + 1)
    c0, c1 = max(0, int(col - reach)), min(x.shape[1], int(col + reach) + 1)
    if r0 >= r1 or c0 >= c1:
        return out
    dx, dy = x[r0:r1, c0:c1] - cx, y[r0:r1, c0:c1] - cy
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    u = (dx * c + dy * s) / ax
    v = (-dx * s + dy * c) / ay
    out[r0:r1, c0:c1] = np.sqrt(np.clip(1.0 - u * u - v * v, 0.0, None))
    return out


def _lung_outline(side: int, p: dict[str, float]) -> np.ndarray:
    """Outline (mm) of one lung, apex first; side -1 is the patient's right (screen left)."""
    w, base, dome, med = p["half_width"], p["base"], p["dome"], p["medial"]
    # lateral border: a rounded apex widening to the chest wall, then nearly straight down
    t = np.linspace(0.0, 1.0, 28)
    y1 = 0.55 * base
    lat_y = np.concatenate([y1 * t ** 1.15, y1 + (base - y1) * t[1:]])
    lat_x = np.concatenate([med + 24 + (w - med - 24) * (1 - (1 - t) ** 2.2) * (1 - 0.04 * t),
                            w * 0.96 + 0.04 * w * np.sin(t[1:] * np.pi / 2)])
    # diaphragm: costophrenic angle up to the dome top and down to the cardiophrenic angle
    s = np.linspace(0.0, 1.0, 28)
    peak = 0.55
    dx = w - 3 - (w - 3 - med - 4) * s
    rise = np.where(s < peak, 1 - np.clip((peak - s) / peak, 0, 1) ** 1.6,
                    1 - 0.25 * np.clip((s - peak) / (1 - peak), 0, 1) ** 2)
    dy = base - (base - dome) * rise
    # medial border back up to the apex, along the mediastinum (right atrium bulge on the right)
    m = np.linspace(1.0, 0.0, 20)
    bulge = p["atrium"] if side < 0 else 0.0
    my = dy[-1] * m
    apex = np.clip(1 - my / 40.0, 0, 1) ** 2
    mx = med + bulge * np.sin(np.clip((m - 0.45) / 0.55, 0, 1) * np.pi) ** 0.8 + 24 * apex
    my = my + 3 * apex
    x = np.concatenate([lat_x, dx, mx]) * side
    y = np.concatenate([lat_y, dy, my])
    return np.stack([x, y], axis=-1)


def _rib_paths(side: int, i: int, p: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Posterior arc and anterior segment (mm) of rib i (0 = first rib), screen-side `side`."""
    y0 = 6 + p["rib_step"] * i
    reach = min(p["half_width"] + 6, 38 + 30 * i)  # upper ribs are short and curved
    drop = 40 + 3.0 * i + (10 if i < 2 else 0)
    t = np.linspace(0.0, 1.0, 20)
    x = 16 + reach * t
    y = y0 - (12 - 0.6 * i) * np.sin(np.pi * t * 0.9) * (1 - t) + drop * t ** 2.2
    # turn down along the chest wall
    x = np.concatenate([x, [x[-1] + 7, x[-1] + 9]])
    y = np.concatenate([y, [y[-1] + 10, y[-1] + 22]])
    post = np.stack([x * side, y], axis=-1)
    a = np.linspace(0.0, 1.0, 12)
    ax = (x[-1] - 2) - (x[-1] - 2 - 42 - 3 * i) * a
    ay = y[-1] + 6 + (34 + 2 * i) * a - 8 * a * (1 - a)
    ant = np.stack([ax * side, ay], axis=-1)
    return post, ant


def _vessel_tree(draws: list[float], segs: list[tuple[float, ...]], start: tuple[float, float],
                 angle: float, length: float, diam: float, depth: int) -> None:
    """Collect segments (x0, y0, x1, y1, diameter) of a branching vessel tree, in mm.

    `draws` holds uniform [0, 1) numbers, consumed from the end (drawn in bulk: fast)."""
    if depth == 0 or diam < 0.8:
        return
    end = (start[0] + length * math.cos(angle), start[1] + length * math.sin(angle))
    segs.append((start[0], start[1], end[0], end[1], diam))
    for sgn in (-1.0, 1.0):
        turn, shorten, thin = 0.25 + 0.35 * draws.pop(), 0.62 + 0.23 * draws.pop(), 0.62 + 0.18 * draws.pop()
        _vessel_tree(draws, segs, end, angle + sgn * turn, length * shorten, diam * thin, depth - 1)


def _profile(y: np.ndarray, knots: list[float], values: list[float]) -> np.ndarray:
    """Piecewise-linear function of y through a 1 mm lookup table (np.interp, only faster)."""
    lut = np.interp(np.arange(knots[0], knots[-1] + 1.0), knots, values).astype(np.float32)
    idx = (y - knots[0]).astype(np.int32)
    np.clip(idx, 0, len(lut) - 1, out=idx)
    return lut[idx]


def _anatomy(rng: np.random.Generator) -> dict[str, float]:
    return {
        "size": rng.uniform(0.86, 1.08),
        "half_width": rng.uniform(120, 140),
        "base": rng.uniform(225, 255),
        "dome_r": rng.uniform(180, 205),
        "dome_l_drop": rng.uniform(5, 20),
        "medial_r": rng.uniform(24, 32),
        "medial_l": rng.uniform(24, 32),
        "atrium": rng.uniform(12, 22),
        "rib_step": rng.uniform(19.0, 22.0),
        "depth": rng.uniform(190, 250),  # AP body thickness (mm)
        "heart_w": rng.uniform(70, 86),
        "heart_h": rng.uniform(52, 64),
        "heart_x": rng.uniform(18, 30),
        "lung_depth": rng.uniform(130, 170),
        "body_half": rng.uniform(152, 178),
    }


def _attenuation(rng: np.random.Generator, size: int, spacing: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attenuation map (float32), lung mask (free of the heart) and whole lung field of one random anatomy."""
    p = _anatomy(rng)
    px_mm = p["size"] / spacing
    centre = (size / 2 + rng.uniform(-0.03, 0.03) * size,
              size * (0.15 + rng.uniform(-0.025, 0.025)) - 10 * (p["size"] - 1) / spacing)
    theta = math.radians(rng.uniform(-3.0, 3.0))
    frame = _Frame(centre, px_mm, math.cos(theta), math.sin(theta))
    x, y = frame.grid(size)

    # torso: elliptic thickness profile whose half-width changes from neck to abdomen
    bh = p["body_half"]
    half = _profile(y, [-140, -75, -45, -20, 10, 160, 400], [56, 58, 95, bh - 15, bh + 4, bh, bh - 10])
    depth = _profile(y, [-140, -40, 20, 140, 400], [110, 125, p["depth"] * 0.85, p["depth"],
                                                     p["depth"] * 1.05])
    r = np.abs(x) / half
    body = depth * np.sqrt(np.clip(1.0 - r ** 2.6, 0.0, None))
    att = MU_TISSUE * body

    # lungs: polygons, air path from the distance to the border
    mask = np.zeros((size, size), np.uint8)
    pr = dict(p, dome=p["dome_r"], medial=p["medial_r"])
    pl = dict(p, dome=p["dome_r"] + p["dome_l_drop"], medial=p["medial_l"],
              base=p["base"] + p["dome_l_drop"] * 0.5)
    cv2.fillPoly(mask, [_poly(frame, _lung_outline(-1, pr)), _poly(frame, _lung_outline(1, pl))], 1)
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3) / px_mm
    lung_depth = _profile(y, [0, 80, 220], [0.5, 0.85, 1.0]) * p["lung_depth"]
    air = lung_depth * np.sqrt(np.clip(dist / 28.0, 0.0, 1.0))

    # heart, aortic knob and superior vena cava displace lung air in projection
    heart = _soft_ellipse(x, y, frame, p["heart_x"], pl["dome"] - 32, p["heart_w"], p["heart_h"], -0.42)
    knob = _soft_ellipse(x, y, frame, p["medial_l"] + 4, 58, 16, 15, 0.0)
    svc = _soft_ellipse(x, y, frame, -p["medial_r"] + 2, 62, 12, 55, 0.0)
    displaced = np.maximum(np.maximum(0.85 * heart ** 0.6, 0.75 * knob), 0.55 * svc)
    air *= 1.0 - displaced
    att -= (MU_TISSUE - MU_LUNG) * air

    # trachea and main bronchi
    airway = np.zeros((size, size), np.float32)
    carina = (p["heart_x"] * 0.1, 88.0)
    for airway_path, airway_mm in (([(0, -150), (0, 30), carina], 16), ([carina, (-36, 112)], 11),
                                   ([carina, (38, 118)], 10)):
        cv2.polylines(airway, [_poly(frame, airway_path)], False, float(airway_mm * MU_TISSUE * 0.8),
                      max(1, int(airway_mm * px_mm)))
    att -= _smooth(airway, 2.5 * px_mm)

    # stomach gas bubble under the left dome
    if rng.random() < 0.7:
        gx, gy = rng.uniform(50, 85), pl["dome"] + rng.uniform(18, 28)
        att -= MU_TISSUE * rng.uniform(12, 30) * _soft_ellipse(x, y, frame, gx, gy, rng.uniform(16, 26),
                                                               rng.uniform(9, 14), 0.1)

    # bones: ribs (cortical margins brighter), clavicles, spine, humeral heads
    bone = np.zeros((size, size), np.float32)
    for side in (-1, 1):
        for i in range(11):
            post, ant = _rib_paths(side, i, p)
            w_mm = 7.5 + 0.4 * i
            for path, k, wm in ((post, 1.0, w_mm), (ant, 0.3, w_mm * 1.2)):
                pts = _poly(frame, path)
                cv2.polylines(bone, [pts], False, float(k * 4 * MU_BONE_EXCESS), max(1, int(wm * px_mm)))
                cv2.polylines(bone, [pts], False, float(k * 2 * MU_BONE_EXCESS),
                              max(1, int(0.55 * wm * px_mm)))
        clav = [(side * 16, 32), (side * 50, 22), (side * 95, 20), (side * 135, 4), (side * 160, -8)]
        cv2.polylines(bone, [_poly(frame, clav)], False, float(7 * MU_BONE_EXCESS), max(1, int(12 * px_mm)))
        cv2.circle(bone, tuple(_poly(frame, [(side * (bh + 4), -14)])[0]), int(28 * px_mm),
                   float(7 * MU_BONE_EXCESS), -1)
    vert_h = 23.0
    phase = np.mod(y + 230.0, vert_h) / vert_h
    disc = np.clip(np.abs(phase - 0.5) * 2 - 0.8, 0, None) * 5.0
    spine_w = _profile(y, [-140, 100, 400], [15, 19, 24])
    spine = np.sqrt(np.clip(1.0 - (x / spine_w) ** 4, 0.0, None)) * (1.0 - 0.5 * disc)
    pedicle = np.sqrt(np.clip(1.0 - ((np.abs(x) - spine_w * 0.72) / 4.0) ** 2 - ((phase - 0.35) / 0.16) ** 2,
                              0.0, None))
    bone += MU_BONE_EXCESS * (7.0 * spine + 2.0 * pedicle)
    bone *= (body > 5).astype(np.float32)
    att += _smooth(bone, 0.4 * px_mm)

    # pulmonary vessels from the hila, and fine parenchymal texture
    segs: list[tuple[float, ...]] = []
    for side, hy in ((-1, 104.0), (1, 96.0)):
        hil = (side * ((p["medial_l"] if side > 0 else p["medial_r"]) + 12), hy)
        for a in (-2.0, -2.6, 2.8, 2.2):  # up, out, out-down, down (screen-left lung)
            ang = a if side < 0 else math.pi - a
            draws = rng.random(6 * 2 ** 7).tolist()
            _vessel_tree(draws, segs, hil, ang + rng.uniform(-0.15, 0.15), rng.uniform(26, 36),
                         rng.uniform(9, 13), 7)
    seg = np.asarray(segs, np.float64)
    ends = np.round(frame.points(seg[:, :4].reshape(-1, 2, 2))).astype(np.int32)
    vessels = np.zeros((size, size), np.float32)
    for (p0, p1), d in zip(ends.tolist(), seg[:, 4].tolist()):
        cv2.line(vessels, p0, p1, d * MU_NODULE_EXCESS * 0.9, max(1, int(round(d * px_mm))))
    lung_soft = _smooth((mask > 0).astype(np.float32), 3 * px_mm)
    vessels = _smooth(vessels, 0.8 * px_mm) * lung_soft
    tex_n = max(8, size // 16)
    tex = cv2.resize(rng.standard_normal((tex_n, tex_n)).astype(np.float32), (size, size),
                     interpolation=cv2.INTER_CUBIC)
    att += vessels + 0.015 * tex * (air / p["lung_depth"])

    lung_mask = (mask > 0) & (heart < 0.45)
    return att.astype(np.float32), lung_mask, mask > 0


def _add_nodule(rng: np.random.Generator, att: np.ndarray, lung_mask: np.ndarray, spacing: float,
                gain: float, diameter_mm: float | None) -> Nodule:
    d_mm = float(diameter_mm) if diameter_mm is not None else float(np.exp(rng.uniform(np.log(5), np.log(30))))
    r_px = d_mm / 2.0 / spacing
    step = max(1, lung_mask.shape[0] // 256)
    sub = lung_mask[::step, ::step].astype(np.uint8)
    depth = cv2.distanceTransform(sub, cv2.DIST_L2, 3) * step  # pixels to the lung border
    inside = depth >= min(0.5 * r_px, float(depth.max()))  # centre at least half a radius inside
    rows, cols = np.nonzero(inside & (sub > 0))
    k = int(rng.integers(len(rows)))
    row = float(rows[k] * step + rng.uniform(0, step))
    col = float(cols[k] * step + rng.uniform(0, step))
    row = min(row, lung_mask.shape[0] - 1.0)
    col = min(col, lung_mask.shape[1] - 1.0)
    density = rng.uniform(0.55, 1.0)
    contrast = gain * density * MU_NODULE_EXCESS * d_mm
    h = int(math.ceil(r_px * 1.6 + 3))
    r0, r1 = max(0, int(row) - h), min(att.shape[0], int(row) + h + 1)
    c0, c1 = max(0, int(col) - h), min(att.shape[1], int(col) + h + 1)
    rr = np.arange(r0, r1, dtype=np.float32)[:, None] - row
    cc = np.arange(c0, c1, dtype=np.float32)[None, :] - col
    lob = 1.0 + 0.08 * np.cos(rng.integers(3, 7) * np.arctan2(rr, cc) + rng.uniform(0, 6.3))
    dd = np.sqrt(rr * rr + cc * cc) / (r_px * lob)
    edge = 0.25 + 0.25 * rng.random()  # soft margin as a fraction of the radius
    profile = np.sqrt(np.clip(1.0 - dd * dd, 0.0, None))
    halo = np.clip((1.0 + edge - dd) / edge, 0.0, 1.0) ** 2 * (dd >= 1.0) * 0.15
    att[r0:r1, c0:c1] += (contrast * (profile + halo)).astype(np.float32)
    return Nodule(row=row, col=col, radius_px=r_px, diameter_mm=d_mm, contrast=float(contrast))


def _detector(rng: np.random.Generator, att: np.ndarray, spacing: float, bits_stored: int) -> np.ndarray:
    """Scatter, blur, noise and a vendor-like processing chain; returns stored uint16 values."""
    px_mm = 1.0 / spacing
    primary = np.exp(-att)
    spr = rng.uniform(0.15, 0.45)
    signal = primary + spr * _smooth(primary, 30.0 * px_mm)
    signal = _smooth(signal, max(0.45, 0.12 * px_mm))
    photons = rng.uniform(1.2e5, 4.0e5) * spacing * spacing  # per pixel, unattenuated
    log_sig = -np.log(np.maximum(signal, 1e-6))
    noise = rng.standard_normal(att.shape, dtype=np.float32)
    log_sig += noise / np.sqrt(photons * signal)
    # vendor processing: dynamic range compression, then unsharp masking
    drc = rng.uniform(0.3, 0.5)
    log_sig -= drc * _smooth(log_sig, 22.0 * px_mm)
    log_sig += rng.uniform(0.4, 0.9) * (log_sig - _smooth(log_sig, 2.0 * px_mm))
    sub = log_sig[::4, ::4]
    lo, hi = np.percentile(sub, [1.0, 99.5])
    z = (log_sig - lo) / max(hi - lo, 1e-6)
    # film-like S curve with per-seed contrast and brightness
    g = rng.uniform(3.5, 5.0)
    shift = rng.uniform(-0.08, 0.08)
    y = 1.0 / (1.0 + np.exp(-g * (z - 0.62 + shift)))
    y0, y1 = 1.0 / (1.0 + math.exp(g * (0.62 - shift))), 1.0 / (1.0 + math.exp(-g * (0.38 + shift)))
    y = (y - y0) / (y1 - y0)
    top = (1 << bits_stored) - 1
    lo_v, hi_v = rng.uniform(0.0, 0.05), rng.uniform(0.9, 1.0)
    out = (lo_v + (hi_v - lo_v) * np.clip(y, 0.0, 1.0)) * top
    return np.rint(out).astype(np.uint16)


def generate_phantom(seed: int, size: int = 2048, *, nodule: bool | None = None, gain: float = 1.0,
                     diameter_mm: float | None = None, bits_stored: int = 12,
                     field_mm: float = 360.0) -> Phantom:
    """Generate one PA chest phantom of `size` x `size` pixels, deterministic from `seed`.

    `nodule` None draws presence 50/50 from the seed. `gain` scales the nodule's
    attenuation (1.0 physical). `diameter_mm` None draws 5-30 mm log-uniformly.
    Pixel spacing is `field_mm / size`.
    """
    if size < 64:
        raise ValueError(f"size must be at least 64, got {size}")
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 8-16, got {bits_stored}")
    if gain < 0:
        raise ValueError(f"gain must not be negative, got {gain}")
    if diameter_mm is not None and not 1.0 <= diameter_mm <= 60.0:
        raise ValueError(f"diameter_mm must be within 1-60, got {diameter_mm}")
    if field_mm <= 0:
        raise ValueError(f"field_mm must be positive, got {field_mm}")
    rng = np.random.default_rng([int(seed), 0x5EED])
    spacing = field_mm / size
    has_nodule = bool(rng.random() < 0.5) if nodule is None else bool(nodule)
    att, lung_mask, lung_field = _attenuation(rng, size, spacing)
    found = None
    if has_nodule:
        found = _add_nodule(np.random.default_rng([int(seed), 0x40D]), att, lung_mask, spacing, gain,
                            diameter_mm)
    pixels = _detector(rng, att, spacing, bits_stored)
    return Phantom(pixels=pixels, bits_stored=bits_stored, pixel_spacing_mm=spacing,
                   lung_mask=lung_mask, nodule=found, seed=int(seed), lung_field=lung_field)



def _code(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


_VIEW_CODES = {"PA": ("399348003", "postero-anterior"), "AP": ("272479009", "antero-posterior"),
               "LL": ("260421005", "left lateral"), "RL": ("260422003", "right lateral")}


def _resample(phantom: Phantom, rows_cols: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Scale the square phantom so it covers rows x cols, centre-crop; spacing stays isotropic."""
    rows, cols = rows_cols
    if rows < 1 or cols < 1:
        raise ValueError(f"rows_cols must be positive, got {rows_cols}")
    size = phantom.pixels.shape[0]
    side = max(rows, cols)
    img = phantom.pixels
    if side != size:
        interp = cv2.INTER_AREA if side < size else cv2.INTER_LINEAR
        img = cv2.resize(img, (side, side), interpolation=interp)
    top, left = (side - rows) // 2, (side - cols) // 2
    return np.ascontiguousarray(img[top:top + rows, left:left + cols]), phantom.pixel_spacing_mm * size / side


def phantom_dataset(phantom: Phantom, *, monochrome1: bool = False, patient_name: str = "PHANTOM^ONE",
                    patient_id: str = "PH0001", study_instance_uid: str | None = None, accession: str = "",
                    view_position: str = "PA", body_part: str = "CHEST", modality: str = "DX",
                    rows_cols: tuple[int, int] | None = None) -> pydicom.Dataset:
    """A complete DX (For Presentation) or CR instance holding the phantom, with file meta.

    UIDs derive from the seed and the arguments, so the same call gives the same
    instance. `rows_cols` rescales and centre-crops the phantom to that geometry
    (isotropic spacing kept). MONOCHROME1 stores inverted values with a matching
    window, so both display alike.
    """
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be 'DX' or 'CR', got {modality!r}")
    pixels, spacing = (phantom.pixels, phantom.pixel_spacing_mm) if rows_cols is None \
        else _resample(phantom, rows_cols)
    bits = phantom.bits_stored
    top = (1 << bits) - 1
    centre, width = default_window(phantom.pixels)
    if monochrome1:
        pixels = (top - pixels.astype(np.int32)).astype(np.uint16)
        centre = top + 1 - centre
    allocated = 8 if bits <= 8 else 16
    stored = pixels.astype(np.uint8 if allocated == 8 else np.uint16)

    seed = str(phantom.seed)
    study_uid = study_instance_uid or generate_uid(entropy_srcs=["smartnodule-phantom-study", seed, patient_id])
    series_uid = generate_uid(entropy_srcs=["smartnodule-phantom-series", study_uid, modality])
    variant = [str(monochrome1), str(rows_cols), str(bits), view_position, body_part, str(stored.shape)]
    sop_uid = generate_uid(entropy_srcs=["smartnodule-phantom-sop", series_uid, *variant])
    sop_class = DX_FOR_PRESENTATION if modality == "DX" else CR_IMAGE_STORAGE
    when = datetime(2024, 1, 1, tzinfo=timezone.utc).replace(day=1 + phantom.seed % 28,
                                                             hour=8 + phantom.seed % 10)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""] if modality == "DX" else ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = when.strftime("%H%M%S")
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer = "SmartNodule"
    ds.ManufacturerModelName = "Chest phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Chest phantom"
    ds.ImageComments = phantom_truth(phantom)
    ds.SeriesDescription = f"Chest {view_position}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = body_part
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID = f"{phantom.seed % 100000}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["R", "F"] if view_position == "AP" else ["L", "F"]
    ds.ViewPosition = view_position
    ds.ImageLaterality = "U"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.WindowCenter, ds.WindowWidth = f"{centre:.6g}", f"{width:.6g}"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
        ds.DetectorType = "SCINTILLATOR"
        ds.AcquisitionContextSequence = Sequence()
        ds.PositionerType = ""
        code_meaning = _VIEW_CODES.get(view_position)
        ds.ViewCodeSequence = Sequence([_code(code_meaning[0], "SCT", code_meaning[1])] if code_meaning else [])
    ds.KVP = "125"
    ds.PixelData = stored.tobytes()
    return ds


def phantom_truth(phantom: Phantom) -> str:
    """The ground truth as one line (written to Image Comments, shown by the demo)."""
    n = phantom.nodule
    if n is None:
        return "synthetic phantom: no nodule"
    return f"synthetic phantom: nodule {n.diameter_mm:.1f} mm at row {n.row:.0f}, col {n.col:.0f}"


def write_phantom_series(out_dir: str | Path, count: int, seed0: int, size: int = 2048, **kw: Any
                         ) -> list[Path]:
    """Write `count` phantoms (seeds seed0...) as DICOM files, one study each; returns the paths.

    Keyword arguments go to `generate_phantom` (nodule, gain, diameter_mm,
    bits_stored, field_mm) or `phantom_dataset` (everything else, except the
    patient name and ID, which are PHANTOM^NNNN and PHNNNN).
    """
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen_kw = {k: v for k, v in kw.items() if k in _GENERATE_KEYS}
    ds_kw = {k: v for k, v in kw.items() if k not in _GENERATE_KEYS}
    paths = []
    for i in range(count):
        seed = seed0 + i
        ds = phantom_dataset(generate_phantom(seed, size, **gen_kw), patient_name=f"PHANTOM^{seed:04d}",
                             patient_id=f"PH{seed:04d}", **{"accession": f"A{seed:06d}", **ds_kw})
        path = out / f"phantom_{seed:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    """`python -m inference.training.phantoms OUT_DIR --count N --seed S --size PX [--nodule|--no-nodule]`."""
    parser = argparse.ArgumentParser(description="Write synthetic chest phantom DICOM files.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--gain", type=float, default=1.0)
    parser.add_argument("--nodule", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--monochrome1", action="store_true")
    args = parser.parse_args(argv)
    paths = write_phantom_series(args.out_dir, args.count, args.seed, args.size, gain=args.gain,
                                 nodule=args.nodule, monochrome1=args.monochrome1)
    print(f"wrote {len(paths)} files to {args.out_dir}")


if __name__ == "__main__":
    main()
