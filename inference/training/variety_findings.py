"""Owns the findings and the nodule mimics of `variety.generate_varied`, drawn in image attenuation.

Findings are ground truth: nodules of 5-30 mm and masses above 30 mm, solid or
part-solid (a ground-glass rim around a solid core), with smooth, lobulated or
spiculated margins and a random density and margin blur, placed anywhere in the
lung zones, including the lung behind the heart and below the diaphragm domes.
Mimics are not findings and carry no truth: nipple shadows, bone islands,
vessels seen end-on, costal cartilage calcifications (rib crossings come with
the anatomy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from inference.training.phantoms import MU_BONE_EXCESS, MU_NODULE_EXCESS, MU_TISSUE, Nodule
from inference.training.variety_body import HILUM, LUNG, RECESS, RETROCARDIAC

ZONE_NAMES = {LUNG: "lung", HILUM: "hilum", RETROCARDIAC: "behind the heart", RECESS: "below the dome"}
_ZONE_P = {LUNG: 0.6, HILUM: 0.12, RETROCARDIAC: 0.14, RECESS: 0.14}
MARGINS = ("smooth", "lobulated", "spiculated")


@dataclass(frozen=True)
class Finding(Nodule):
    """One ground-truth finding: a nodule (<= 30 mm) or a mass (> 30 mm)."""

    kind: str = "nodule"
    margin: str = "smooth"
    part_solid: bool = False
    zone: str = "lung"


def _place(rng: np.random.Generator, zones: np.ndarray, depth: np.ndarray, radius_px: float,
           taken: list[Finding]) -> tuple[float, float, int] | None:
    """A centre in a random lung zone, half a radius inside the lungs, not overlapping earlier findings."""
    present = [z for z in _ZONE_P if (zones == z).any()]
    if not present:
        return None
    p = np.array([_ZONE_P[z] for z in present])
    zone = int(rng.choice(present, p=p / p.sum()))
    ok = (zones == zone) & (depth >= min(0.5 * radius_px, float(depth.max())))
    rows, cols = np.nonzero(ok)
    if len(rows) == 0:
        rows, cols = np.nonzero(zones == zone)
    for _ in range(20):
        k = int(rng.integers(len(rows)))
        row, col = float(rows[k] + rng.random() - 0.5), float(cols[k] + rng.random() - 0.5)
        if all(math.hypot(row - f.row, col - f.col) > radius_px + f.radius_px for f in taken):
            return row, col, zone
    return None


def _blob(rng: np.random.Generator, r_px: float, margin: str, part_solid: bool, px_mm: float) -> np.ndarray:
    """Unit-contrast projected thickness of one finding in a square patch centred on it."""
    h = int(math.ceil(r_px * (2.3 if margin == "spiculated" else 1.5) + 3))
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1].astype(np.float32)
    ang = np.arctan2(yy, xx)
    lob = 1.0 + 0.04 * np.cos(int(rng.integers(2, 5)) * ang + rng.uniform(0, 6.3))
    if margin == "lobulated":
        for k in rng.choice(np.arange(2, 7), 2, replace=False):
            lob += rng.uniform(0.07, 0.16) * np.cos(int(k) * ang + rng.uniform(0, 6.3))
    dist = np.hypot(yy, xx)
    dd = dist / (r_px * lob)
    blob = np.sqrt(np.clip(1.0 - dd * dd, 0.0, None))
    if part_solid:  # ground glass with a solid core
        core = rng.uniform(0.3, 0.6)
        solid = np.sqrt(np.clip(1.0 - (dist / (r_px * core * lob)) ** 2, 0.0, None)) * core
        blob = rng.uniform(0.15, 0.35) * blob + 0.8 * solid
    if margin == "spiculated":
        lines = np.zeros_like(blob)
        for a in rng.uniform(0, 2 * math.pi, int(rng.integers(8, 20))):
            reach = r_px * rng.uniform(1.3, 2.2)
            p0 = (h + 0.8 * r_px * math.cos(a), h + 0.8 * r_px * math.sin(a))
            p1 = (h + reach * math.cos(a), h + reach * math.sin(a))
            cv2.line(lines, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), float(rng.uniform(0.15, 0.35)),
                     max(1, int(round(rng.uniform(0.7, 1.5) * px_mm))))
        blob = np.maximum(blob, lines * np.clip(1.5 - dist / (2.2 * r_px), 0.0, 1.0))
    soft = r_px * (rng.uniform(0.03, 0.12) if margin == "spiculated" else rng.uniform(0.05, 0.3))
    return cv2.GaussianBlur(blob, (0, 0), soft) if soft >= 0.3 else blob


def _paste(att: np.ndarray, patch: np.ndarray, row: float, col: float) -> None:
    """Add `patch` (odd square) centred at (row, col), clipped to the image."""
    h = patch.shape[0] // 2
    r, c = int(round(row)), int(round(col))
    r0, r1, c0, c1 = max(0, r - h), min(att.shape[0], r + h + 1), max(0, c - h), min(att.shape[1], c + h + 1)
    if r0 < r1 and c0 < c1:
        att[r0:r1, c0:c1] += patch[r0 - r + h:r1 - r + h, c0 - c + h:c1 - c + h]


def add_findings(rng: np.random.Generator, att: np.ndarray, zones: np.ndarray, spacing: float, count: int, *,
                 gain: float, min_diameter_mm: float | None, masses: bool) -> list[Finding]:
    """Draw `count` findings into `att` (in place); returns their truth, largest first."""
    depth = cv2.distanceTransform((zones > 0).astype(np.uint8), cv2.DIST_L2, 3)
    found: list[Finding] = []
    dmin = max(5.0, min_diameter_mm or 5.0)
    for _ in range(count):
        mass = masses and rng.random() < 0.15
        d_mm = rng.uniform(30.5, 70.0) if mass else float(np.exp(rng.uniform(np.log(dmin), np.log(30.0))))
        r_px = d_mm / 2.0 / spacing
        spot = _place(rng, zones, depth, r_px, found)
        if spot is None:
            continue
        row, col, zone = spot
        margin = str(rng.choice(MARGINS, p=(0.45, 0.3, 0.25)))
        part_solid = bool(rng.random() < 0.2)
        contrast = gain * rng.uniform(0.85 if mass else 0.7, 1.0) * MU_NODULE_EXCESS * d_mm  # solid tissue for lung
        _paste(att, (contrast * _blob(rng, r_px, margin, part_solid, 1.0 / spacing)).astype(np.float32), row, col)
        found.append(Finding(row=row, col=col, radius_px=r_px, diameter_mm=float(d_mm), contrast=float(contrast),
                             kind="mass" if d_mm > 30.0 else "nodule", margin=margin, part_solid=part_solid,
                             zone=ZONE_NAMES[zone]))
    return sorted(found, key=lambda f: -f.diameter_mm)


def _disk(r_px: float, edge: float) -> np.ndarray:
    """Flat-topped disk of radius `r_px` with a soft edge `edge` (fraction of the radius)."""
    h = int(math.ceil(r_px * (1 + edge) + 2))
    yy, xx = np.mgrid[-h:h + 1, -h:h + 1].astype(np.float32)
    return np.clip((1.0 + edge - np.hypot(yy, xx) / r_px) / edge, 0.0, 1.0)


def add_mimics(rng: np.random.Generator, att: np.ndarray, zones: np.ndarray, spacing: float,
               landmarks: dict[str, tuple[float, float]], breasts: bool) -> list[str]:
    """Draw nodule mimics into `att` (in place); returns the names of those drawn."""
    px_mm = 1.0 / spacing
    drawn = []
    if rng.random() < (0.6 if breasts else 0.35):
        sides = ("nipple_r", "nipple_l") if rng.random() < 0.7 else (str(rng.choice(["nipple_r", "nipple_l"])),)
        d, height = rng.uniform(6, 14), rng.uniform(4, 12)
        for side in sides:
            c, r = landmarks[side]
            _paste(att, (MU_TISSUE * height * _disk(d / 2 * px_mm, 0.3)).astype(np.float32), r, c)
        drawn.append("nipple shadow")
    lung_rows, lung_cols = np.nonzero((zones == LUNG) | (zones == HILUM))  # aerated lung in front
    if len(lung_rows) == 0:
        return drawn
    for _ in range(int(rng.integers(0, 3))):
        k = int(rng.integers(len(lung_rows)))
        d = rng.uniform(3, 10)
        blob = _disk(d / 2 * px_mm, 0.15) * (1 + 0.2 * rng.standard_normal())
        _paste(att, (MU_BONE_EXCESS * d * 0.8 * blob).astype(np.float32), lung_rows[k], lung_cols[k])
        drawn.append("bone island")
    hila = [landmarks["carina"][0] + s * 40 * px_mm for s in (-1, 1)]
    near = np.abs(lung_cols[:, None] - np.array(hila)[None, :]).min(axis=1) < 45 * px_mm
    near &= np.abs(lung_rows - landmarks["carina"][1] - 20 * px_mm) < 60 * px_mm
    idx = np.nonzero(near)[0]
    for _ in range(int(rng.integers(1, 7)) if len(idx) else 0):
        k = idx[int(rng.integers(len(idx)))]
        d = rng.uniform(3, 6)
        _paste(att, (MU_NODULE_EXCESS * rng.uniform(8, 20) * _disk(d / 2 * px_mm, 0.5)).astype(np.float32),
               lung_rows[k], lung_cols[k])
        drawn.append("vessel end-on")
    if rng.random() < 0.3:
        c0, r0 = landmarks["lateral_r"]
        for sign in (-1, 1):
            for _ in range(int(rng.integers(2, 7))):
                col = c0 if sign < 0 else 2 * landmarks["carina"][0] - c0
                col += sign * rng.uniform(10, 60) * px_mm
                row = r0 - rng.uniform(0, 90) * px_mm
                d = rng.uniform(2, 5)
                _paste(att, (MU_BONE_EXCESS * d * _disk(d / 2 * px_mm, 0.4)).astype(np.float32), row, col)
        drawn.append("cartilage calcification")
    return drawn
