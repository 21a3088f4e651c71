"""Owns the varied training generator: chest radiographs that vary the way real ones do (issue #17).

`generate_varied(seed, size, ...)` builds on the training family's anatomy
(`phantoms._attenuation`, unchanged; `generate_phantom`'s output does not
change) and randomises, each as a named kind that `exclude` switches off:

- habitus: small, large, child, obese builds;
- inspiration: depth of inspiration (lung height);
- geometry: image aspect, patient placement and zoom, rotation, shear;
- portable: a quarter of the images are portable AP films (scapulae over the
  lungs, shallow inspiration, more scatter and noise, more devices, an
  "AP PORTABLE" label);
- soft_tissue: breasts, lateral chest wall;  limbs: arms, humeri, scapulae;
- devices: ECG leads, catheters, tubes, pacemaker, sternal wires, drains;
- text: lead side marker and burned-in annotation;
- collimation: field edges, unexposed or shuttered borders;
- exposure, grid, noise, processing, storage: beam quality, dose, scatter,
  grid lines, noise spectra, vendor processing and tone curves, bit depth
  8-16 and MONOCHROME1/2 (`monochrome1` tells the DICOM writer);
- masses: findings above 30 mm among the findings;
- mimics: nipple shadows, bone islands, vessels end-on, cartilage flecks.

Every kind has its own random stream, so switching one off leaves the others'
draws unchanged. Findings (ground truth, `findings`; `nodule` is the largest)
lie in the lung zones, which include the lung behind the heart and the
posterior recesses below the domes; `lung_mask` is that lung, as warped and
collimated with the image.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.training.phantoms import Phantom
from inference.training.variety_acquisition import Exposure, collimation, expose, geometry, store
from inference.training.variety_body import render
from inference.training.variety_devices import add_devices, add_side_marker, burn_text
from inference.training.variety_findings import Finding, add_findings, add_mimics

KINDS = ("habitus", "inspiration", "geometry", "portable", "soft_tissue", "limbs", "devices", "text", "collimation",
         "exposure", "grid", "noise", "processing", "storage", "masses", "mimics")
_TAG = 0x7A51
_WIDE = {"obese": 1.1, "large": 1.04, "child": 0.95}
MAX_FINDINGS = 8


@dataclass(frozen=True)
class VariedPhantom(Phantom):
    """A varied radiograph: a `Phantom` (nodule = the largest finding) plus what was varied."""

    findings: tuple[Finding, ...] = ()
    monochrome1: bool = False
    view: str = "PA"
    habitus: str = "adult"
    mimics: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()


def fingerprint() -> str:
    """The varied generator's identity: sha256 prefixes of its modules (it has no version constant)."""
    names = ("variety", "variety_body", "variety_acquisition", "variety_devices", "variety_findings")
    files = [Path(__file__).with_name(f"{n}.py") for n in names]  # all in this folder
    return ", ".join(f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()[:16]}" for f in files)


def _rng(seed: int, stream: str | int) -> np.random.Generator:
    index = KINDS.index(stream) if isinstance(stream, str) else stream
    return np.random.default_rng([int(seed), _TAG, index])


def finding_count(seed: int) -> int:
    """How many findings (1-5, mostly one) a positive image of this seed has."""
    return int(_rng(seed, 200).choice([1, 2, 3, 4, 5], p=[0.6, 0.2, 0.1, 0.06, 0.04]))


def check_kinds(kinds: Iterable[str], name: str = "exclude") -> frozenset[str]:
    """The kinds as a set; ValueError naming `name` when one is not in `KINDS`."""
    kinds = frozenset(kinds)
    if not kinds <= set(KINDS):
        raise ValueError(f"{name}: unknown kind(s) {sorted(kinds - set(KINDS))}; known: {', '.join(KINDS)}")
    return kinds


def generate_varied(seed: int, size: int = 512, *, findings: int | None = None, exclude: Iterable[str] = (),
                    gain: float = 1.0, min_diameter_mm: float | None = None) -> VariedPhantom:
    """One varied chest radiograph, long side `size` px, deterministic from `seed`.

    `findings` None draws none (half the seeds) or `finding_count(seed)`; `exclude` names kinds of
    `KINDS` to hold at fixed defaults; `gain` scales the findings' attenuation
    (1.0 physical); `min_diameter_mm` raises the smallest nodule size (masses unchanged).
    """
    exclude = check_kinds(exclude)
    if size < 64:
        raise ValueError(f"size must be at least 64, got {size}")
    if findings is not None and not 0 <= findings <= MAX_FINDINGS:
        raise ValueError(f"findings must be within 0-{MAX_FINDINGS}, got {findings}")
    if gain < 0:
        raise ValueError(f"gain must not be negative, got {gain}")
    on = {k: k not in exclude for k in KINDS}
    if findings is None:
        findings = 0 if _rng(seed, 201).random() < 0.5 else finding_count(seed)
    ap = on["portable"] and _rng(seed, "portable").random() < 0.25

    render_spacing = 360.0 / size
    body = render(seed, size, render_spacing, habitus=on["habitus"], soft_tissue=on["soft_tissue"],
                  limbs=on["limbs"], ap=ap, tag=_TAG)
    geo = geometry(_rng(seed, "geometry"), size, body.zones, placement=on["geometry"],
                   inspiration=on["inspiration"], ap=ap, wide=_WIDE.get(body.habitus, 1.0))
    att, zones = geo.warp(body.att), geo.warp(body.zones, nearest=True)
    spacing = render_spacing * body.scale / geo.zoom
    marks = {k: geo.points(v) for k, v in body.landmarks.items()}
    field, border = collimation(_rng(seed, "collimation"), geo.shape, on["collimation"])
    zones[~field] = 0

    found = add_findings(_rng(seed, 202), att, zones, spacing, int(findings), gain=gain,
                         min_diameter_mm=min_diameter_mm, masses=on["masses"])
    mimics = add_mimics(_rng(seed, "mimics"), att, zones, spacing, marks, body.breasts) if on["mimics"] else []
    devices = add_devices(_rng(seed, "devices"), att, spacing, marks, ap) if on["devices"] else []
    text = _rng(seed, "text")
    if on["text"] and text.random() < 0.85:
        add_side_marker(text, att, spacing)
    if border != "open":
        att[~field] += 3.0  # outside the field only scatter reaches the detector
    streams = {k: _rng(seed, k) for k in ("exposure", "grid", "noise", "processing")}
    display = expose(streams, att, spacing, Exposure(on["exposure"], on["grid"], on["noise"], on["processing"], ap))
    if border in ("black", "white"):  # electronic shutter
        display[~field] = 1.0 if border == "white" else 0.0
    if on["text"] and text.random() < 0.7:
        burn_text(text, display, ap)
    pixels, bits, mono1 = store(_rng(seed, "storage"), display, on["storage"])
    return VariedPhantom(pixels=pixels, bits_stored=bits, pixel_spacing_mm=float(spacing), lung_mask=zones > 0,
                         nodule=found[0] if found else None, seed=int(seed), findings=tuple(found), monochrome1=mono1,
                         view="AP" if ap else "PA", habitus=body.habitus, mimics=tuple(mimics), devices=tuple(devices))
