"""Owns the evaluation family: chest radiograph phantoms from a second, independently written model.

Used only to measure a model, never to train it, pick thresholds or stop
training. It shares no code with `inference/training/phantoms.py` (the training
family) and models the anatomy another way, so a figure on it says whether
the detector learned nodules or the training generator:

- the body is a superellipse slab (random exponent, width, depth) with neck,
  shoulders and, half of the time, arms beside the chest; breast shadows;
- each lung is a Fourier-perturbed ellipsoid cut by its own diaphragm dome,
  with a heart ellipsoid that overlaps the left lung (retrocardiac lung stays in
  the lung mask), mediastinum, spine with vertebrae, posterior and anterior ribs
  drawn as polylines with a cortex, clavicles, scapulae, vessels as random
  branching walks from the hila, ECG leads;
- image formation: photon counts through exp(-mu * thickness), scatter,
  Poisson-like noise, log, vendor unsharp masking and a random tone curve,
  collimation borders (bright or blanked), grid lines, a side marker and
  burned-in text, an anatomical tilt, MONOCHROME1 or MONOCHROME2, 10-16 bits;
- findings: lobulated or spiculated nodules of 5-30 mm and masses of 30-60 mm,
  one or two per positive image, anywhere in the lung mask (over ribs, heart,
  hila and the diaphragm domes), with a density factor and a margin blur.

Everything is in millimetres first and drawn at the requested size (the long
side), deterministic from the seed. `make_case` gives the pixels and truth,
`case_dataset` a DX instance the node reads like any other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

SEED_BASE = 7_000_000  # seeds of this family (its own range; the training family uses other generators)
MU_WATER = 0.019  # per mm
AIR_FRACTION = 0.78  # share of lung volume that is air
BONE = 1.9  # bone density relative to water, for the excess over the tissue it replaces
MARKERS = ("R", "L")
TEXTS = ("PORTABLE", "AP ERECT", "SUPINE", "INSP", "WARD 4B", "2023-11-04 08:12", "DR-2", "150cm")
_DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"


@dataclass(frozen=True)
class Finding:
    """A nodule or mass: centre and bounding box in pixels of the image, size and density."""

    row: float
    col: float
    height: float
    width: float
    diameter_mm: float
    density: float  # relative to solid soft tissue; 0.4-1.2
    kind: str  # "nodule" (5-30 mm) or "mass" (> 30 mm)

    @property
    def radius_px(self) -> float:
        return max(self.height, self.width) / 2.0


@dataclass(frozen=True)
class EvalCase:
    """Stored pixel values, how to read them, the lung mask and the findings of one image."""

    pixels: np.ndarray  # uint16, (rows, cols)
    bits_stored: int
    photometric: str  # MONOCHROME1 or MONOCHROME2
    spacing_mm: float
    lung_mask: np.ndarray  # bool, (rows, cols)
    findings: tuple[Finding, ...]
    seed: int
    body_part: str = "CHEST"
    spacing_tags: bool = True  # False: the instance omits Pixel Spacing and Imager Pixel Spacing

    @property
    def label(self) -> int:
        return int(bool(self.findings))


class _Body:
    """Anatomical millimetres (u right on the image, v down from the lung apices) of every pixel."""

    def __init__(self, rows: int, cols: int, spacing: float, origin_mm: tuple[float, float], tilt_deg: float):
        self.rows, self.cols, self.spacing = rows, cols, spacing
        self.origin = origin_mm  # image mm (x, y) of the anatomical origin
        t = math.radians(tilt_deg)
        self.c, self.s = math.cos(t), math.sin(t)
        y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
        x = (x + 0.5) * spacing - origin_mm[0]
        y = (y + 0.5) * spacing - origin_mm[1]
        self.u = self.c * x + self.s * y
        self.v = -self.s * x + self.c * y

    def to_px(self, u: np.ndarray | float, v: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Pixel (col, row) coordinates of anatomical points."""
        x = self.c * np.asarray(u) - self.s * np.asarray(v) + self.origin[0]
        y = self.s * np.asarray(u) + self.c * np.asarray(v) + self.origin[1]
        return x / self.spacing - 0.5, y / self.spacing - 0.5


def _ellipsoid(body: _Body, cu: float, cv: float, au: float, av: float, depth: float) -> np.ndarray:
    """Thickness (mm) of an ellipsoid whose outline is (cu, cv, au, av) and whose depth is `depth`."""
    q = ((body.u - cu) / au) ** 2 + ((body.v - cv) / av) ** 2
    return depth * np.sqrt(np.clip(1.0 - q, 0.0, None))


def _draw(body: _Body, curves: list[np.ndarray], width_mm: float, blur_mm: float) -> np.ndarray:
    """Polylines given in anatomical mm, drawn `width_mm` wide and blurred; float32 in [0, 1]."""
    canvas: np.ndarray = np.zeros((body.rows, body.cols), np.float32)
    scale = 8  # cv2 fixed-point subpixel bits: 3
    thick = max(1, int(round(width_mm / body.spacing)))
    for uv in curves:
        x, y = body.to_px(uv[:, 0], uv[:, 1])
        pts = np.stack([x, y], axis=1) * scale
        cv2.polylines(canvas, [np.round(pts).astype(np.int32)], False, 1.0, thick, cv2.LINE_AA, shift=3)
    if blur_mm > 0:
        canvas = cv2.GaussianBlur(canvas, (0, 0), max(0.4, blur_mm / body.spacing))
    return canvas


def _lung(body: _Body, rng: np.random.Generator, side: int, half_width: float, height: float,
          dome: float) -> tuple[np.ndarray, np.ndarray]:
    """Air thickness (mm) and mask of one lung; side -1 on the image left (patient right)."""
    cu = side * half_width * rng.uniform(0.42, 0.52)
    au = half_width * rng.uniform(0.36, 0.44)
    cv_ = height * 0.52
    av = height * 0.56
    du, dv = body.u - cu, body.v - cv_
    theta = np.arctan2(dv, du * side)
    wobble = 1.0 + sum(rng.uniform(-0.05, 0.05) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    q = np.sqrt((du / au) ** 2 + (dv / av) ** 2) / wobble
    base = height * dome  # the dome's top, mm below the apex
    dome_v = base + 18.0 * ((body.u - cu * 1.1) / (au * 1.2)) ** 2
    inside = (q < 1.0) & (body.v < dome_v) & (body.u * side > 12.0) & (body.v > -8.0)
    depth = rng.uniform(120.0, 190.0) * np.sqrt(np.clip(1.0 - q ** 2, 0.0, None))
    depth *= np.clip((dome_v - body.v) / 25.0, 0.0, 1.0)  # thins towards the dome (lung behind it)
    return np.where(inside, depth, 0.0).astype(np.float32), inside


def _ribs(body: _Body, rng: np.random.Generator, half_width: float, height: float) -> list[np.ndarray]:
    curves = []
    gap = height / rng.uniform(9.0, 11.0)
    for side in (-1, 1):
        for i in range(11):
            v0 = -10.0 + i * gap
            reach = half_width * rng.uniform(0.9, 1.05)
            t = np.linspace(0.0, 1.0, 24)
            u = side * (18.0 + t * reach)
            v = v0 - 22.0 * np.sin(np.pi * t * 0.9) + 30.0 * t ** 2  # posterior: up from the spine, then down
            curves.append(np.stack([u, v], axis=1))
            ua = side * (half_width * (0.95 - 0.6 * t))
            va = v0 + 38.0 + 35.0 * t  # anterior: down towards the sternum
            if rng.random() < 0.8:
                curves.append(np.stack([ua, va], axis=1))
    return curves


def _vessels(body: _Body, rng: np.random.Generator, half_width: float, height: float) -> np.ndarray:
    canvas = np.zeros((body.rows, body.cols), np.float32)
    for side in (-1, 1):
        start = (side * half_width * 0.22, height * 0.48)
        stack = [(start, rng.uniform(-0.6, 0.6) + (0.0 if side > 0 else np.pi), 5.0, 0)]
        while stack:
            (u, v), angle, width, depth = stack.pop()
            length = rng.uniform(18.0, 45.0)
            pts = [(u, v)]
            for _ in range(6):
                angle += rng.normal(0.0, 0.15)
                u += math.cos(angle) * length / 6
                v += math.sin(angle) * length / 6
                pts.append((u, v))
            canvas = np.maximum(canvas, width / 5.0 * _draw(body, [np.array(pts)], width, 0.6))
            if depth < 4 and width > 1.2:
                for turn in (-1, 1):
                    stack.append(((u, v), angle + turn * rng.uniform(0.25, 0.7), width * 0.72, depth + 1))
    return canvas


def _anatomy(body: _Body, rng: np.random.Generator, half_width: float, height: float, arms: bool
             ) -> tuple[np.ndarray, np.ndarray]:
    """Water-equivalent thickness (mm) of everything but the findings, and the lung mask."""
    p = rng.uniform(2.2, 4.0)
    depth = rng.uniform(170.0, 290.0)
    widen = np.clip((body.v + 10.0) / 60.0, 0.0, 1.0)
    a = half_width * (1.02 + 0.12 * np.clip(body.v / height, 0.0, 1.3)) * (0.45 + 0.55 * widen)
    trunk = depth * np.clip(1.0 - np.abs(body.u / a) ** p, 0.0, None) ** (1.0 / p)
    shoulder = _ellipsoid(body, 0.0, -15.0, half_width * rng.uniform(1.2, 1.4), 45.0, depth * 0.6)
    thick = np.maximum(trunk, shoulder)
    if arms:
        for side in (-1, 1):
            cu = side * half_width * rng.uniform(1.25, 1.4)
            r = rng.uniform(38.0, 52.0)
            arm = 2.0 * np.sqrt(np.clip(r ** 2 - (body.u - cu) ** 2, 0.0, None)) * (body.v > -20.0)
            thick = thick + arm
            thick += BONE * 0.4 * _ellipsoid(body, cu, -5.0, 24.0, 26.0, 40.0)  # humeral head
    if rng.random() < 0.4:
        for side in (-1, 1):
            thick += _ellipsoid(body, side * half_width * 0.62, height * 0.95, half_width * 0.42,
                                height * 0.28, rng.uniform(30.0, 70.0))
    air = np.zeros_like(thick)
    mask = np.zeros(thick.shape, bool)
    for side in (-1, 1):
        dome = rng.uniform(0.9, 1.0) if side < 0 else rng.uniform(0.95, 1.05)
        a_side, m_side = _lung(body, rng, side, half_width, height, dome)
        air += a_side
        mask |= m_side
    heart = _ellipsoid(body, half_width * rng.uniform(0.1, 0.22), height * rng.uniform(0.72, 0.8),
                       half_width * rng.uniform(0.32, 0.42), height * rng.uniform(0.24, 0.3), rng.uniform(90.0, 130.0))
    media = 60.0 * np.exp(-(body.u / rng.uniform(22.0, 32.0)) ** 2) * (body.v > -30.0)
    thick = thick - AIR_FRACTION * np.maximum(air - 0.6 * heart, 0.0) + 0.3 * heart + media
    spine = np.exp(-(body.u / 19.0) ** 8) * (30.0 + 10.0 * (np.sin(body.v * 2 * np.pi / rng.uniform(24.0, 30.0)) > -0.6))
    bones = spine + 7.0 * _draw(body, _ribs(body, rng, half_width, height), rng.uniform(7.0, 10.0), 1.2)
    ribs_core = _draw(body, _ribs(body, np.random.default_rng(int(rng.integers(1 << 30))), half_width, height), 3.0, 1.0)
    bones -= 2.0 * ribs_core
    for side in (-1, 1):
        t = np.linspace(0.0, 1.0, 20)
        clav = np.stack([side * (12.0 + t * half_width * 0.85), -18.0 + 14.0 * np.sin(np.pi * t) - 10.0 * t], axis=1)
        bones += 14.0 * _draw(body, [clav], rng.uniform(9.0, 13.0), 1.5)
        scap = _ellipsoid(body, side * half_width * 0.85, height * 0.25, half_width * 0.2, height * 0.28, 14.0)
        bones += scap * rng.uniform(0.3, 1.0)
    thick += BONE * bones
    thick += 12.0 * _vessels(body, rng, half_width, height) * (air > 0)
    return thick.astype(np.float32), mask


def _place_findings(body: _Body, rng: np.random.Generator, mask: np.ndarray, count: int
                    ) -> tuple[np.ndarray, list[Finding]]:
    extra = np.zeros(mask.shape, np.float32)
    found = []
    rows, cols = np.nonzero(mask)
    for _ in range(count):
        mass = rng.random() < 0.2
        diameter = rng.uniform(30.0, 60.0) if mass else math.exp(rng.uniform(math.log(5.0), math.log(30.0)))
        density = rng.uniform(0.4, 1.2)
        k = int(rng.integers(len(rows)))
        r0, c0 = float(rows[k]), float(cols[k])
        radius_px = diameter / 2.0 / body.spacing
        y, x = np.mgrid[0:mask.shape[0], 0:mask.shape[1]].astype(np.float32)
        dy, dx = y - r0, x - c0
        theta = np.arctan2(dy, dx)
        lobes = 1.0 + sum(rng.uniform(0.0, 0.12) * np.cos(n * theta + rng.uniform(0, 6.3)) for n in (3, 4, 7))
        rho = np.hypot(dy, dx) / (radius_px * lobes)
        chord = diameter * np.sqrt(np.clip(1.0 - rho ** 2, 0.0, None))  # mm of tissue through the sphere
        blob = 1.3 * density * chord  # a little above physical: real films show a 1 cm solid nodule plainly
        if rng.random() < 0.3:  # spiculated margin
            spikes = np.clip(np.cos(theta * int(rng.integers(9, 17))) - 0.85, 0.0, None) * (rho < 1.6)
            blob += density * diameter * 0.3 * spikes
        blur = rng.uniform(0.3, 2.5) / body.spacing
        extra += cv2.GaussianBlur(blob.astype(np.float32), (0, 0), blur)
        ys, xs = np.nonzero(rho < 1.0)
        if len(ys) == 0:
            ys, xs = np.array([r0]), np.array([c0])
        found.append(Finding(row=r0, col=c0, height=float(ys.max() - ys.min() + 1), width=float(xs.max() - xs.min() + 1),
                             diameter_mm=float(diameter), density=float(density), kind="mass" if mass else "nodule"))
    return extra, found


def _form_image(rng: np.random.Generator, thick: np.ndarray, spacing: float, bits: int) -> np.ndarray:
    """Detector counts -> log -> vendor processing -> stored values (bright = dense), float in [0, 2^bits - 1]."""
    counts: np.ndarray = rng.uniform(800.0, 6000.0) * np.exp(-MU_WATER * thick)
    counts += rng.uniform(0.05, 0.35) * cv2.GaussianBlur(counts, (0, 0), 40.0 / spacing)  # scatter
    counts = np.maximum(counts + rng.normal(0.0, 1.0, counts.shape) * np.sqrt(counts), 1.0)
    counts = cv2.GaussianBlur(counts.astype(np.float32), (0, 0), rng.uniform(0.3, 0.9))
    dense = -np.log(counts)
    lo, hi = np.percentile(dense[::3, ::3], [0.5, 99.8])
    x = (dense - lo) / max(hi - lo, 1e-6)
    x = x + rng.uniform(0.2, 0.9) * (x - cv2.GaussianBlur(x, (0, 0), rng.uniform(8.0, 30.0) / spacing))  # unsharp
    x = 1.0 / (1.0 + np.exp(-rng.uniform(3.0, 7.0) * (x - rng.uniform(0.4, 0.6))))  # tone curve
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    if rng.random() < 0.3:  # stationary grid lines
        x += 0.015 * np.sin(np.arange(x.shape[1]) * 2 * np.pi / rng.uniform(2.5, 4.0))[None, :]
    x = np.clip(x, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    return (x * ((1 << bits) - 1)).astype(np.float32)


def _borders_and_text(rng: np.random.Generator, img: np.ndarray, top: float) -> np.ndarray:
    rows, cols = img.shape
    if rng.random() < 0.7:  # collimation: a slightly rotated field, outside it unexposed (bright) or blanked
        angle = rng.uniform(-3.0, 3.0)
        keep = np.zeros_like(img, np.uint8)
        w, h = cols * rng.uniform(0.78, 0.96), rows * rng.uniform(0.8, 0.97)
        box = cv2.boxPoints(((cols / 2 + rng.uniform(-0.04, 0.04) * cols, rows / 2 + rng.uniform(-0.03, 0.03) * rows),
                             (w, h), angle))
        cv2.fillPoly(keep, [np.round(box).astype(np.int32)], 1)
        fill = top * rng.uniform(0.85, 1.0) if rng.random() < 0.6 else 0.0
        img = np.where(keep > 0, img, fill).astype(np.float32)
    scale = max(rows, cols) / 512.0
    marker = MARKERS[int(rng.integers(2))]
    corner = (int(cols * rng.uniform(0.06, 0.2)), int(rows * rng.uniform(0.1, 0.2)))
    img = burn_text(img, marker, corner, 1.6 * scale, top, max(1, int(3 * scale)), font=cv2.FONT_HERSHEY_DUPLEX)
    for _ in range(int(rng.integers(0, 3))):
        text = TEXTS[int(rng.integers(len(TEXTS)))]
        where = (int(cols * rng.uniform(0.02, 0.6)), int(rows * rng.choice([rng.uniform(0.03, 0.08), rng.uniform(0.92, 0.98)])))
        img = burn_text(img, text, where, 0.6 * scale, top * rng.uniform(0.7, 1.0), max(1, int(scale)))
    return img


def burn_text(img: np.ndarray, text: str, origin: tuple[int, int], scale: float, value: float, thickness: int,
              font: int = cv2.FONT_HERSHEY_SIMPLEX) -> np.ndarray:
    """`img` (float) with `text` burned in at `value` (antialiased), as a modality or a PACS writes it."""
    ink = np.zeros(img.shape, np.uint8)
    cv2.putText(ink, text, origin, font, scale, 255, thickness, cv2.LINE_AA)
    alpha = ink.astype(np.float32) / 255.0
    return (img * (1.0 - alpha) + np.float32(value) * alpha).astype(np.float32)


def make_case(seed: int, long_side: int = 512, *, positive: bool | None = None) -> EvalCase:
    """One chest image of this family, `long_side` pixels on its longer side (portrait or square).

    `positive` None draws presence from the seed; a positive image has one
    finding, or two one time in five.
    """
    if long_side < 128:
        raise ValueError(f"long_side must be at least 128, got {long_side!r}")
    rng = np.random.default_rng([int(seed), 0xE7A1])
    rows = long_side
    cols = int(round(long_side * rng.uniform(0.82, 1.0)))
    fov = rng.uniform(370.0, 440.0)
    spacing = fov / rows
    kind = rng.random()
    half_width = rng.uniform(85.0, 105.0) if kind < 0.1 else rng.uniform(120.0, 170.0)  # child or adult
    height = half_width * rng.uniform(1.45, 1.9)
    origin = (cols * spacing / 2 + rng.uniform(-20.0, 20.0), rng.uniform(40.0, 95.0))
    body = _Body(rows, cols, spacing, origin, rng.uniform(-7.0, 7.0))
    thick, mask = _anatomy(body, rng, half_width, height, arms=bool(rng.random() < 0.5))
    if rng.random() < 0.3:  # ECG leads: rings and wires
        for _ in range(int(rng.integers(2, 5))):
            u, v = rng.uniform(-half_width, half_width), rng.uniform(0.0, height * 1.1)
            ring = np.stack([u + 7.0 * np.cos(np.linspace(0, 6.3, 16)), v + 7.0 * np.sin(np.linspace(0, 6.3, 16))], 1)
            wire = np.stack([np.linspace(u, u + rng.uniform(-80, 80), 10), np.linspace(v, v - rng.uniform(60, 160), 10)], 1)
            thick += 25.0 * _draw(body, [ring, wire], 2.0, 0.4)
    drawn, count = bool(rng.random() < 0.5), 2 if rng.random() < 0.2 else 1  # drawn either way: same image
    findings: list[Finding] = []
    if drawn if positive is None else positive:
        extra, findings = _place_findings(body, np.random.default_rng([int(seed), 0xF1D]), mask, count)
        thick = thick + extra
    bits = int(rng.choice([10, 12, 14, 15, 16]))
    top = float((1 << bits) - 1)
    img = _borders_and_text(rng, _form_image(rng, thick, spacing, bits), top)
    photometric = "MONOCHROME1" if rng.random() < 0.5 else "MONOCHROME2"
    if photometric == "MONOCHROME1":
        img = top - img
    return EvalCase(pixels=np.clip(np.round(img), 0, top).astype(np.uint16), bits_stored=bits,
                    photometric=photometric, spacing_mm=float(spacing), lung_mask=mask, findings=tuple(findings),
                    seed=int(seed))


def make_abdomen(seed: int, long_side: int = 512) -> EvalCase:
    """A non-chest image of the same physics (abdomen: body, spine, pelvis, bowel gas), for OOD checks."""
    rng = np.random.default_rng([int(seed), 0xAB0])
    rows, cols = long_side, int(round(long_side * rng.uniform(0.82, 1.0)))
    spacing = rng.uniform(370.0, 440.0) / rows
    body = _Body(rows, cols, spacing, (cols * spacing / 2, 20.0), rng.uniform(-5.0, 5.0))
    half = rng.uniform(130.0, 170.0)
    thick = rng.uniform(180.0, 260.0) * np.clip(1.0 - np.abs(body.u / half) ** 3, 0.0, None) ** (1 / 3)
    thick += BONE * np.exp(-(body.u / 20.0) ** 8) * 32.0
    for side in (-1, 1):
        thick += BONE * _ellipsoid(body, side * half * 0.55, rows * spacing * 0.78, half * 0.35, 70.0, 22.0)
    for _ in range(int(rng.integers(8, 20))):
        thick -= _ellipsoid(body, rng.uniform(-half * 0.7, half * 0.7), rng.uniform(40.0, rows * spacing * 0.7),
                            rng.uniform(10.0, 35.0), rng.uniform(8.0, 25.0), rng.uniform(20.0, 60.0))
    bits = 12
    img = _form_image(rng, np.maximum(thick, 0.0).astype(np.float32), spacing, bits)
    return EvalCase(pixels=np.round(img).astype(np.uint16), bits_stored=bits, photometric="MONOCHROME2",
                    spacing_mm=float(spacing), lung_mask=np.zeros((rows, cols), bool), findings=(), seed=int(seed),
                    body_part="ABDOMEN")


def with_pixels(case: EvalCase, display: np.ndarray, lung_mask: np.ndarray | None = None,
                findings: tuple[Finding, ...] | None = None) -> EvalCase:
    """`case` with new pixels given as display values in [0, 1] (bright = dense), stored in its own photometric."""
    top = float((1 << case.bits_stored) - 1)
    x = np.clip(display, 0.0, 1.0) * top
    if case.photometric == "MONOCHROME1":
        x = top - x
    return replace(case, pixels=np.round(x).astype(np.uint16),
                   lung_mask=case.lung_mask if lung_mask is None else lung_mask,
                   findings=case.findings if findings is None else findings)


def display_of(case: EvalCase) -> np.ndarray:
    """The case's pixels as display values in [0, 1], bright = dense (float32)."""
    x = case.pixels.astype(np.float32) / float((1 << case.bits_stored) - 1)
    return 1.0 - x if case.photometric == "MONOCHROME1" else x


def case_dataset(case: EvalCase, *, body_part: str | None = None) -> pydicom.Dataset:
    """A DX For Presentation instance of the case (no window: the node picks its own), with file meta.

    The body part is the case's unless given; `make_abdomen` images written as
    CHEST are the "non-chest labelled as chest" test of the OOD gate.
    """
    sop = generate_uid(entropy_srcs=["smartnodule-evalfamily", str(case.seed), case.body_part, str(case.pixels.shape),
                                     str(int(case.pixels.sum() % 1_000_003))])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(_DX_CLASS), UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = _DX_CLASS, sop
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["smartnodule-evalfamily-study", sop])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["smartnodule-evalfamily-series", sop])
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", body_part or case.body_part, "PA"
    ds.PatientName, ds.PatientID = "EVAL^FAMILY", f"EF{case.seed}"
    ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName, ds.AccessionNumber = "", "O", "", ""
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "20240301", "101500", "1", 1, 1
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, case.photometric
    ds.PresentationLUTShape = "INVERSE" if case.photometric == "MONOCHROME1" else "IDENTITY"
    ds.Rows, ds.Columns = case.pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, case.bits_stored, case.bits_stored - 1, 0
    if case.spacing_tags:
        ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{case.spacing_mm:.5f}", f"{case.spacing_mm:.5f}"]
    ds.BurnedInAnnotation = "YES"
    ds.PixelData = case.pixels.astype("<u2").tobytes()
    return ds
