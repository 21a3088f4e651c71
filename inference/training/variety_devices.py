"""Owns what lies on or in the patient and what is written on the image, for `variety.generate_varied`.

Devices, drawn as attenuation in image pixels: ECG electrodes with their leads,
central venous catheters, endotracheal and nasogastric tubes, a pacemaker with
its leads, sternal wires, a chest drain. Markers and text: a lead side marker
(attenuation, so it is processed like the film) and burned-in annotation lines
written on the processed display image (white or black). No text is patient
data: words come from a fixed list and random letters and digits.
"""
from __future__ import annotations

import cv2
import numpy as np

_WORDS = ("AP", "PA", "PORTABLE", "ERECT", "SUPINE", "SEMI-ERECT", "CHEST", "MOBILE", "INSP", "kVp 110", "mAs 2.5",
          "GRID", "NO GRID", "WARD", "ICU", "SITTING", "FILTER", "STANDARD", "LUNG", "S 210", "L 1.9")


def _curve(p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float]) -> np.ndarray:
    """Quadratic Bezier polyline (col, row) through control point p1, as int32 points."""
    t = np.linspace(0.0, 1.0, 40)[:, None]
    pts = (1 - t) ** 2 * np.array(p0) + 2 * (1 - t) * t * np.array(p1) + t * t * np.array(p2)
    return np.round(pts).astype(np.int32)


def _line(att: np.ndarray, pts: np.ndarray, value: float, width_px: float) -> None:
    layer = np.zeros_like(att)
    cv2.polylines(layer, [pts], False, float(value), max(1, int(round(width_px))), cv2.LINE_AA)
    att += layer


def _tube(att: np.ndarray, pts: np.ndarray, px_mm: float, width_mm: float, stripe: float) -> None:
    """A plastic tube: two faint walls and a radio-opaque stripe along it."""
    _line(att, pts, 0.08, width_mm * px_mm)
    _line(att, pts, -0.05, max(1.0, (width_mm - 2) * px_mm))
    _line(att, pts, stripe, max(1.0, 0.8 * px_mm))


def _jitter(rng: np.random.Generator, p: tuple[float, float], mm: float, px_mm: float) -> tuple[float, float]:
    return p[0] + rng.uniform(-mm, mm) * px_mm, p[1] + rng.uniform(-mm, mm) * px_mm


def add_devices(rng: np.random.Generator, att: np.ndarray, spacing: float, marks: dict[str, tuple[float, float]],
                ap: bool) -> list[str]:
    """Draw a random set of devices into `att` (in place); returns their names."""
    px_mm = 1.0 / spacing
    rows, cols = att.shape
    drawn = []
    edge = [(0.0, rng.uniform(0, rows)), (cols - 1.0, rng.uniform(0, rows)), (rng.uniform(0, cols), 0.0)]
    if rng.random() < (0.7 if ap else 0.3):
        for _ in range(int(rng.integers(3, 6))):
            key = str(rng.choice(["subclavian_r", "subclavian_l", "apex_heart", "lateral_r", "stomach"]))
            c, r = _jitter(rng, marks[key], 35, px_mm)
            pad = np.zeros_like(att)
            cv2.circle(pad, (int(c), int(r)), max(2, int(12 * px_mm)), 0.04, -1)
            cv2.circle(pad, (int(c), int(r)), max(1, int(rng.uniform(2, 4) * px_mm)), float(rng.uniform(1.0, 3.0)), -1)
            att += pad
            end = edge[int(rng.integers(len(edge)))]
            mid = _jitter(rng, ((c + end[0]) / 2, (r + end[1]) / 2), 60, px_mm)
            _line(att, _curve((c, r), mid, end), rng.uniform(0.3, 0.8), rng.uniform(1, 2) * px_mm)
        drawn.append("ecg leads")
    if rng.random() < (0.5 if ap else 0.12):
        side = str(rng.choice(["subclavian_r", "subclavian_l"]))
        tip = _jitter(rng, (marks["svc"][0], marks["svc"][1] + rng.uniform(10, 50) * px_mm), 8, px_mm)
        start = marks[side]
        _line(att, _curve(start, _jitter(rng, marks["svc"], 20, px_mm), tip), rng.uniform(0.25, 0.5), 2 * px_mm)
        _line(att, _curve(start, _jitter(rng, start, 40, px_mm), edge[int(rng.integers(len(edge)))]),
              rng.uniform(0.25, 0.5), 2 * px_mm)
        drawn.append("central venous catheter")
    if rng.random() < (0.35 if ap else 0.03):
        c, r = marks["carina"]
        tip = (c + rng.uniform(-5, 5) * px_mm, r - rng.uniform(25, 60) * px_mm)
        _tube(att, _curve((marks["neck"][0], 0.0), ((marks["neck"][0] + tip[0]) / 2, tip[1] / 2), tip), px_mm, 8,
              0.6)
        drawn.append("endotracheal tube")
    if rng.random() < (0.3 if ap else 0.04):
        c, r = marks["stomach"]
        _tube(att, _curve((marks["neck"][0] + rng.uniform(-10, 10) * px_mm, 0.0), marks["carina"], (c, r)), px_mm,
              5, 0.5)
        drawn.append("nasogastric tube")
    if rng.random() < (0.1 if ap else 0.06):
        sign = -1 if rng.random() < 0.8 else 1
        c, r = marks["subclavian_l" if sign < 0 else "subclavian_r"]
        c += -sign * rng.uniform(10, 30) * px_mm
        w, h = rng.uniform(40, 55) * px_mm, rng.uniform(35, 50) * px_mm
        box = cv2.ellipse2Poly((int(c), int(r)), (int(w / 2), int(h / 2)), int(rng.uniform(-30, 30)), 0, 360, 10)
        can = np.zeros_like(att)
        cv2.fillPoly(can, [np.asarray(box, np.int32)], float(rng.uniform(2.5, 4.0)))
        att += cv2.GaussianBlur(can, (0, 0), 1.0)
        for target in ("svc", "apex_heart")[:int(rng.integers(1, 3))]:
            _line(att, _curve((c, r), _jitter(rng, marks["svc"], 25, px_mm), _jitter(rng, marks[target], 15, px_mm)),
                  1.0, 2 * px_mm)
        drawn.append("pacemaker")
    if rng.random() < 0.07:
        c, r = marks["carina"]
        for k in range(int(rng.integers(4, 7))):
            centre = (int(c + rng.uniform(-4, 4) * px_mm), int(r + (k * 22 - 50) * px_mm))
            cv2.ellipse(att, centre, (max(1, int(5 * px_mm)), max(1, int(3 * px_mm))), rng.uniform(-20, 20), 0, 360,
                        1.5, max(1, int(1.5 * px_mm)))
        drawn.append("sternal wires")
    if rng.random() < (0.12 if ap else 0.03):
        c, r = marks["lateral_r"]
        _tube(att, _curve((0.0, r + rng.uniform(0, 40) * px_mm), (c, r), (c + 30 * px_mm, r - 150 * px_mm)), px_mm,
              10, 0.6)
        drawn.append("chest drain")
    return drawn


def add_side_marker(rng: np.random.Generator, att: np.ndarray, spacing: float) -> None:
    """A lead side marker ('L', 'R', 'LT', 'RT') in an upper corner, as dense attenuation."""
    rows, cols = att.shape
    text = str(rng.choice(["L", "R", "LT", "RT"]))
    scale = max(rows, cols) * rng.uniform(0.0016, 0.0035)
    thick = max(1, int(round(scale * 2.2)))
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    left = rng.uniform(0.03, 0.2) * cols if rng.random() < 0.5 else cols - w - rng.uniform(0.03, 0.2) * cols
    top = rng.uniform(0.03, 0.15) * rows + h
    layer = np.zeros(att.shape, np.uint8)  # OpenCV draws text on 8-bit images only
    cv2.putText(layer, text, (int(left), int(top)), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    if rng.random() < 0.5:
        pad = int(0.3 * h)
        cv2.rectangle(layer, (int(left) - pad, int(top - h) - pad), (int(left + w) + pad, int(top) + pad), 128,
                      max(1, thick // 2))
    att += layer.astype(np.float32) * (3.0 / 255)


def burn_text(rng: np.random.Generator, display: np.ndarray, ap: bool) -> None:
    """Burned-in annotation lines in the corners of the display image (in place)."""
    rows, cols = display.shape
    scale = rows * rng.uniform(0.0007, 0.0013)
    thick = max(1, int(round(scale * 1.6)))
    value = 1.0 if rng.random() < 0.8 else 0.0
    ink = np.zeros(display.shape, np.uint8)
    for corner in rng.permutation(4)[:int(rng.integers(1, 4))]:
        lines = []
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.4:
                lines.append(str(rng.choice(_WORDS)))
            else:
                lines.append("".join(rng.choice(list("ABCDEFGHKLMNPRSTUVWXYZ0123456789 -:/."),
                                                int(rng.integers(4, 16)))))
        if ap and corner == 0:
            lines[0] = "AP PORTABLE"
        h = cv2.getTextSize("X", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][1]
        for i, text in enumerate(lines):
            w = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0]
            x = int(0.02 * cols) if corner in (0, 2) else int(cols - w - 0.02 * cols)
            y = int(0.03 * rows + (i + 1) * h * 1.6) if corner in (0, 1) else int(rows - 0.03 * rows - i * h * 1.6)
            cv2.putText(ink, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thick, cv2.LINE_AA)
    alpha = ink.astype(np.float32) / 255
    display += alpha * (value - display)
