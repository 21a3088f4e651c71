"""Owns the varied body of `variety.generate_varied`: habitus, soft tissue, arms and scapulae, lung zones.

It starts from the training family's anatomy (`phantoms._attenuation`, drawn
unchanged) and adds, in the same anatomical millimetre frame, what that anatomy
keeps fixed: body size and build (small, large, child with a thymus, obese),
breasts and lateral soft tissue, arms beside the chest with the humeri, and
scapulae (retracted on a PA film, over the lungs on a portable AP). It also
draws the lung zones a detector must search: the aerated lung, the lung behind
the heart and the posterior recesses below the diaphragm domes.

Everything is in render pixels (the square anatomy canvas); `variety_acquisition`
warps it into the final image geometry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from inference.training.phantoms import (MU_BONE_EXCESS, MU_TISSUE, _anatomy, _attenuation, _Frame,
                                         _lung_outline, _poly, _smooth, _soft_ellipse)

LUNG, RETROCARDIAC, RECESS, HILUM = 1, 2, 3, 4  # zone labels; 0 is outside the lungs

HABITUS = {"adult": (0.92, 1.06), "small": (0.80, 0.90), "large": (1.06, 1.18), "child": (0.55, 0.75),
           "obese": (1.0, 1.12)}
_HABITUS_P = (0.45, 0.12, 0.13, 0.12, 0.18)


@dataclass(frozen=True)
class Body:
    """The varied anatomy in render pixels, before the acquisition geometry."""

    att: np.ndarray  # attenuation, float32 (size, size)
    zones: np.ndarray  # uint8 labels LUNG / RETROCARDIAC / RECESS
    landmarks: dict[str, tuple[float, float]]  # named (col, row) points: nipples, carina, svc, heart, ...
    scale: float  # physical size of this patient relative to the standard anatomy
    habitus: str
    breasts: bool


def _replay_frame(rng: np.random.Generator, size: int, spacing: float) -> tuple[dict[str, float], _Frame]:
    """The anatomy parameters and frame `_attenuation` drew first from an identically seeded `rng`."""
    p = _anatomy(rng)
    centre = (size / 2 + rng.uniform(-0.03, 0.03) * size,
              size * (0.15 + rng.uniform(-0.025, 0.025)) - 10 * (p["size"] - 1) / spacing)
    theta = math.radians(rng.uniform(-3.0, 3.0))
    return p, _Frame(centre, p["size"] / spacing, math.cos(theta), math.sin(theta))


def _lung_zones(p: dict[str, float], frame: _Frame, heart: np.ndarray, size: int, recess_mm: float) -> np.ndarray:
    """Label map: aerated lung, the hila, lung behind the heart, and the posterior recesses `recess_mm` below the domes."""
    pr = dict(p, dome=p["dome_r"], medial=p["medial_r"])
    pl = dict(p, dome=p["dome_r"] + p["dome_l_drop"], medial=p["medial_l"], base=p["base"] + p["dome_l_drop"] * 0.5)
    zones = np.zeros((size, size), np.uint8)
    low = [dict(q, dome=q["dome"] + recess_mm, base=q["base"] + 0.4 * recess_mm) for q in (pr, pl)]
    cv2.fillPoly(zones, [_poly(frame, _lung_outline(-1, low[0])), _poly(frame, _lung_outline(1, low[1]))], RECESS)
    lungs = np.zeros_like(zones)
    cv2.fillPoly(lungs, [_poly(frame, _lung_outline(-1, pr)), _poly(frame, _lung_outline(1, pl))], 1)
    zones[lungs > 0] = LUNG
    hila = np.zeros_like(zones)
    for x_mm, y_mm in ((-p["medial_r"] - 12, 104.0), (p["medial_l"] + 12, 96.0)):  # where the vessel trees start
        cv2.circle(hila, tuple(_poly(frame, [(x_mm, y_mm)])[0]), max(1, int(35 * frame.px_per_mm)), 1, -1)
    zones[(lungs > 0) & (hila > 0)] = HILUM
    zones[(lungs > 0) & (heart >= 0.45)] = RETROCARDIAC
    return zones


def _capsule(x: np.ndarray, y: np.ndarray, frame: _Frame, a: tuple[float, float], b: tuple[float, float],
             reach: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """Distance (mm) to the segment a-b (mm), computed only in the pixel box within `reach` mm of it."""
    ends = frame.points(np.array([a, b], np.float64))
    pad = reach * frame.px_per_mm + 2
    c0, r0 = np.floor(ends.min(axis=0) - pad).astype(int)
    c1, r1 = np.ceil(ends.max(axis=0) + pad).astype(int)
    box = (slice(max(0, r0), max(0, r1)), slice(max(0, c0), max(0, c1)))
    xs, ys = x[box], y[box]
    dx, dy = b[0] - a[0], b[1] - a[1]
    t = np.clip(((xs - a[0]) * dx + (ys - a[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return box, np.hypot(xs - a[0] - t * dx, ys - a[1] - t * dy)


def _arms(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, frame: _Frame, p: dict[str, float], ap: bool
          ) -> np.ndarray:
    """Upper arms beside the chest (soft tissue cylinders with a cortical humerus), or none (arms raised)."""
    out = np.zeros_like(x)
    if rng.random() < 0.3:
        return out
    bh = p["body_half"]
    for side in (-1, 1):
        radius = rng.uniform(32, 50)
        gap = rng.uniform(-15, 35) - (12 if ap else 0)
        shoulder = (side * (bh + 4), -14.0)
        elbow = (side * (bh + gap + radius * 0.8 + rng.uniform(0, 40)), rng.uniform(250, 320))
        box, d = _capsule(x, y, frame, (side * (bh + gap + radius * 0.7), 10.0), (elbow[0], elbow[1] + 60), radius)
        out[box] += MU_TISSUE * 2 * np.sqrt(np.clip(radius * radius - d * d, 0.0, None))
        box, d = _capsule(x, y, frame, shoulder, elbow, 12.0)
        shaft = np.sqrt(np.clip(1.0 - (d / 11.0) ** 2, 0.0, None))
        out[box] += MU_BONE_EXCESS * 9 * (shaft + 0.8 * np.clip(1.0 - np.abs(d - 9.5) / 2.0, 0.0, None))
    return out


def _scapulae(rng: np.random.Generator, frame: _Frame, p: dict[str, float], size: int, ap: bool) -> np.ndarray:
    """Scapular plates with a thick lateral border; medial edge retracted (PA) or over the lung (AP)."""
    out = np.zeros((size, size), np.float32)
    bh = p["body_half"]
    for side in (-1, 1):
        medial = rng.uniform(55, 80) if ap else rng.uniform(100, 130)
        glenoid = (side * (bh - 12), -4.0)
        superior = (side * (medial + rng.uniform(-5, 15)), rng.uniform(-25, -5))
        inferior = (side * (medial + rng.uniform(15, 40)), rng.uniform(130, 175))
        pts = _poly(frame, [glenoid, superior, inferior])
        cv2.fillPoly(out, [pts], float(MU_BONE_EXCESS * rng.uniform(2.0, 3.5)))
        cv2.polylines(out, [_poly(frame, [glenoid, inferior])], False, float(MU_BONE_EXCESS * 7),
                      max(1, int(7 * frame.px_per_mm)))
    return _smooth(out, 1.5 * frame.px_per_mm)


def _obese(rng: np.random.Generator, att: np.ndarray, px_mm: float) -> np.ndarray:
    """Extra subcutaneous fat: a band outside the body outline and a layer over the whole trunk."""
    body = (att > 0.5).astype(np.uint8)
    outside = cv2.distanceTransform(1 - body, cv2.DIST_L2, 3) / px_mm
    width = rng.uniform(25, 60)
    band = np.sqrt(np.clip(1.0 - outside / width, 0.0, None)) * (body == 0)
    return MU_TISSUE * (rng.uniform(40, 90) * band + rng.uniform(20, 50) * body)


def _point(xy: np.ndarray) -> tuple[float, float]:
    return float(xy[0]), float(xy[1])


def render(seed: int, size: int, spacing: float, *, habitus: bool, soft_tissue: bool, limbs: bool, ap: bool,
           tag: int) -> Body:
    """Draw one varied body at `size` x `size` render pixels of `spacing` mm (standard anatomy)."""
    att, _, _ = _attenuation(np.random.default_rng([seed, tag, 100]), size, spacing)
    p, frame = _replay_frame(np.random.default_rng([seed, tag, 100]), size, spacing)
    x, y = frame.grid(size)
    heart_c = (p["heart_x"], p["dome_r"] + p["dome_l_drop"] - 32)
    heart = _soft_ellipse(x, y, frame, *heart_c, p["heart_w"], p["heart_h"], -0.42)
    rng = np.random.default_rng([seed, tag, 101])
    zones = _lung_zones(p, frame, heart, size, rng.uniform(12, 30))

    kind = str(rng.choice(list(HABITUS), p=_HABITUS_P)) if habitus else "adult"
    scale = rng.uniform(*HABITUS[kind]) if habitus else 1.0
    if kind == "child":  # thymus widening the upper mediastinum
        att += MU_TISSUE * 40 * _soft_ellipse(x, y, frame, rng.uniform(-5, 10), 60, rng.uniform(30, 45), 30, 0.0)
    att *= scale ** 0.85  # path lengths scale with the patient
    if kind == "obese":
        att += _obese(rng, att, frame.px_per_mm)

    srng = np.random.default_rng([seed, tag, 102])
    breasts = soft_tissue and kind not in ("child",) and srng.random() < 0.5
    dome = p["dome_r"]
    nip = [(-srng.uniform(65, 100), dome - srng.uniform(20, 50)), (srng.uniform(65, 100), dome - srng.uniform(20, 50))]
    if soft_tissue:
        body = (att > 0.5).astype(np.uint8)
        inside = np.minimum(cv2.distanceTransform(body, cv2.DIST_L2, 3), 1e6) / frame.px_per_mm  # huge with no edge
        att += MU_TISSUE * srng.uniform(0, 30) * np.clip(1.0 - inside / 30.0, 0.0, None) * body  # lateral wall
    if breasts:
        radius = srng.uniform(55, 95) * (1.2 if kind == "obese" else 1.0)
        depth = srng.uniform(15, 45)
        bottom = dome + srng.uniform(-10, 40)  # the inferior contour, near or below the domes
        for i, (nx, _) in enumerate(list(nip)):
            cx, cy = nx * 0.9, bottom - radius * 0.8
            shape = _soft_ellipse(x, y, frame, cx, cy, radius * 1.1, radius * 0.8, srng.uniform(-0.2, 0.2))
            fade = np.clip((y - cy + radius * 0.8) / (1.6 * radius), 0.0, 1.0) ** 1.5  # sharp only below
            att += MU_TISSUE * depth * shape ** 0.5 * fade
            nip[i] = (cx + 0.1 * nx, bottom - radius * 0.3)  # the nipple sits low on the breast
    if limbs:
        lrng = np.random.default_rng([seed, tag, 103])
        att += _arms(lrng, x, y, frame, p, ap) + _scapulae(lrng, frame, p, size, ap)
    marks = {"nipple_r": nip[0], "nipple_l": nip[1], "carina": (p["heart_x"] * 0.1, 88.0),
             "svc": (-p["medial_r"] + 2, 62.0), "heart": heart_c, "subclavian_r": (-70.0, 22.0),
             "subclavian_l": (70.0, 22.0), "neck": (0.0, -110.0), "apex_heart": (heart_c[0] + p["heart_w"] * 0.7,
                                                                               heart_c[1] + 20),
             "stomach": (65.0, dome + p["dome_l_drop"] + 30), "lateral_r": (-p["half_width"] + 15, p["base"] - 40)}
    landmarks = {k: _point(frame.points(np.array(pt, np.float64))) for k, pt in marks.items()}
    return Body(att=att.astype(np.float32), zones=zones, landmarks=landmarks, scale=float(scale), habitus=kind,
                breasts=breasts)
