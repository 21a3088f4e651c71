"""Owns phantom samples for training and held-out scoring: seed splits, targets, datasets.

Seeds of the three splits lie in disjoint ranges (`SPLITS`), so a held-out
image is never a training image. Training images come from the default
phantom generator or, with `generator="varied"`, from the varied generator
(`inference.training.variety`, issue #17), whose named kinds of variation can
be held out. `ModelImages` says how one model reads images: held-out phantoms
for its calibration, gate and drift reference, DICOM images (the expert
verdicts its fine-tune learns from) as serving reads them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from pydicom import Dataset as DicomDataset
from torch.utils.data import Dataset

from inference.lung_seg import LungSegmenter
from inference.model import HEAD_STRIDE, heatmap_coord
from inference.model_card import ModelCard
from inference.geometry import Letterbox, letterbox
from inference.preprocess import ThoraxSpacing, _window_linear, default_window, prepare, prepare_array
from inference.types import PreparedImage
from inference.training.phantoms import Phantom, generate_phantom
from inference.training.variety import check_kinds, finding_count, generate_varied

SPLITS = {"calibration": 1_000_000, "test": 2_000_000, "train": 10_000_000}
SPLIT_SIZE = 1_000_000  # calibration and test seeds: base .. base + SPLIT_SIZE - 1
HELD_OUT_GAIN = 1.0
GENERATORS = ("phantom", "varied")


def seed_of(split: str, index: int) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if index < 0 or (split != "train" and index >= SPLIT_SIZE):
        raise ValueError(f"index {index!r} is outside split {split!r}")
    return SPLITS[split] + index


@dataclass(frozen=True)
class Curriculum:
    """Nodule gain and diameter range as a function of the fraction of training time spent."""

    gains: tuple[float, ...] = (3.0, 2.0, 1.5, 1.25, 1.0)
    ends: tuple[float, ...] = (0.12, 0.3, 0.5, 0.68, 1.0)
    min_diameters: tuple[float | None, ...] = (15.0, 10.0, 7.0, None, None)  # None: the generator's own sizes

    def at(self, frac: float) -> tuple[float, float | None]:
        for gain, end, dmin in zip(self.gains, self.ends, self.min_diameters):
            if frac < end:
                return gain, dmin
        return self.gains[-1], self.min_diameters[-1]

    def describe(self) -> list[dict]:
        start = 0.0
        rows = []
        for gain, end, dmin in zip(self.gains, self.ends, self.min_diameters):
            rows.append({"time_fraction": [start, end], "gain": gain, "diameter_mm": f"U({dmin}, 30)" if dmin else "generator default"})
            start = end
        return rows


# `train --curriculum`: from scratch, high gain and large nodules first; a fine-tune of a trained model
# dwells near the physical gain instead of relearning the easy cases
CURRICULA = {
    "scratch": Curriculum(),
    "fine-tune": Curriculum(gains=(1.5, 1.25, 1.0), ends=(0.2, 0.45, 1.0), min_diameters=(None, None, None)),
}


def phantom_model_input(phantom: Phantom, input_size: int, mm_per_px: float | None = None
                        ) -> tuple[np.ndarray, Letterbox]:
    """What `prepare(phantom_dataset(phantom), input_size=..., mm_per_px=...)` gives the model, without
    the DICOM round trip: the model input and where the phantom lies in it."""
    centre, width = default_window(phantom.pixels)
    display = _window_linear(phantom.pixels.astype(np.float32), centre, width)
    spacing = float(phantom.pixel_spacing_mm)
    geometry = letterbox(display.shape, input_size, (spacing, spacing), mm_per_px)
    return prepare_array(display, geometry), geometry


def _lung_target(mask: np.ndarray, geometry: Letterbox) -> np.ndarray:
    """The lung mask placed like the image, at `geometry`'s (heatmap) resolution."""
    return geometry.pad(geometry.resize(mask.astype(np.float32)) > 0.5)


def phantom_sample(phantom, input_size: int, mm_per_px: float | None = None) -> dict[str, torch.Tensor]:
    """Model input and dense targets of one phantom (the dict a DataLoader batches).

    The heatmap has a peak at every finding (`phantom.findings` when the phantom
    has several, else its nodule); the radius target is that of the peak the
    loss reads (the heatmap's first maximum); row, col, diameter and contrast
    are those of `phantom.nodule` (the largest finding). `mm_per_px`: the
    model's physical scale (None: fitted), as `inference.geometry.letterbox`."""
    image, geometry = phantom_model_input(phantom, input_size, mm_per_px)
    out = input_size // HEAD_STRIDE
    lung = _lung_target(phantom.lung_mask, geometry.at(out))
    heat = np.zeros((out, out), np.float32)
    radius_hm = 0.0
    row = col = -1.0
    nod = phantom.nodule
    lb_scale = geometry.scale
    first = out * out
    yy, xx = np.mgrid[0:out, 0:out].astype(np.float32)
    for f in getattr(phantom, "findings", ()) or ([nod] if nod is not None else []):
        f_row, f_col = geometry.to_model(f.row, f.col)
        f_radius = f.radius_px * lb_scale / HEAD_STRIDE
        r, c = heatmap_coord(f_row), heatmap_coord(f_col)
        sigma = max(1.0, f_radius / 4)
        np.maximum(heat, np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma**2)).astype(np.float32), out=heat)
        peak = (min(out - 1, max(0, round(r))), min(out - 1, max(0, round(c))))
        heat[peak] = 1.0
        if peak[0] * out + peak[1] < first:
            first, radius_hm = peak[0] * out + peak[1], f_radius
        if f is nod:
            row, col = f_row, f_col
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
        "heat": torch.from_numpy(heat)[None],
        "lung": torch.from_numpy(lung.astype(np.float32))[None],
        "log_radius": torch.tensor(math.log(max(radius_hm, 0.5)), dtype=torch.float32),
        "label": torch.tensor(float(nod is not None)),
        "row": torch.tensor(row, dtype=torch.float32),
        "col": torch.tensor(col, dtype=torch.float32),
        "radius": torch.tensor(nod.radius_px * lb_scale if nod else 0.0, dtype=torch.float32),
        "diameter_mm": torch.tensor(nod.diameter_mm if nod else 0.0, dtype=torch.float32),
        "contrast": torch.tensor(nod.contrast if nod else 0.0, dtype=torch.float32),
        "mm_per_px": torch.tensor(phantom.pixel_spacing_mm / lb_scale, dtype=torch.float32),
    }


def heldout_phantom(split: str, index: int, size: int, generator: str = "phantom", hold_out: tuple[str, ...] = ()):
    """Phantom `index` of `split` at the physical gain (HELD_OUT_GAIN), finding(s) on even indices.

    `generator` "varied" draws it from the varied generator (the kinds in `hold_out` switched off),
    so a model trained on varied images is calibrated and tested on held-out varied images."""
    seed = seed_of(split, index)
    if generator == "varied":
        return generate_varied(seed, size, findings=finding_count(seed) if index % 2 == 0 else 0, exclude=hold_out,
                               gain=HELD_OUT_GAIN)
    if generator != "phantom":
        raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
    return generate_phantom(seed, size=size, nodule=index % 2 == 0, gain=HELD_OUT_GAIN)


def trained_generator(card: ModelCard) -> str:
    """The generator a card's model was trained on, read from its fingerprint (`training.generator`)."""
    return "varied" if "; varied:" in str(card.training.get("generator", "")) else "phantom"


@dataclass(frozen=True)
class ModelImages:
    """Images as one model reads them: its training generator (with the kinds of variation it held out
    switched off), input size and physical scale, and, for a DICOM image without a spacing, the scale its
    lung fields give (`thorax_spacing`, as the serving Detector estimates it)."""

    generator: str
    input_size: int
    mm_per_px: float | None = None
    hold_out: tuple[str, ...] = ()
    thorax_spacing: ThoraxSpacing | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {self.generator!r}")

    @classmethod
    def of(cls, card: ModelCard, generator: str | None = None, card_path: str | Path | None = None) -> ModelImages:
        """The card's (`generator` overrides the one it was trained on); with `card_path`, a physical-scale
        card's lung segmentation estimates the spacing of DICOM images that have none, as serving does."""
        lungs = (LungSegmenter.of_card(card, card_path, torch.device("cpu"))
                 if card_path is not None and card.input_mm_per_px is not None else None)
        return cls(generator or trained_generator(card), card.input_size, card.input_mm_per_px,
                   thorax_spacing=lungs.thorax_spacing if lungs is not None else None)

    def read(self, ds: DicomDataset) -> PreparedImage:
        """`inference.preprocess.prepare` of a DICOM image for this model (raises NotApplicable, Unreadable)."""
        return prepare(ds, input_size=self.input_size, mm_per_px=self.mm_per_px, thorax_spacing=self.thorax_spacing)

    def sample(self, split: str, index: int) -> dict[str, torch.Tensor]:
        """`phantom_sample` of held-out image `index` of `split` (a finding on even indices)."""
        phantom = heldout_phantom(split, index, self.input_size, self.generator, self.hold_out)
        return phantom_sample(phantom, self.input_size, self.mm_per_px)


class HeldOut(Dataset):
    """`n` calibration or test images of `images` from index `start` on, positives on even indices."""

    def __init__(self, images: ModelImages, split: str, n: int, start: int = 0) -> None:
        if n < 2:
            raise ValueError(f"n must be >= 2, got {n!r}")
        seed_of(split, start + n - 1)
        self.images, self.split, self.n, self.start = images, split, n, start

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.images.sample(self.split, self.start + i)


class TrainStream(Dataset):
    """Training phantoms generated on the fly; gain and sizes follow `curriculum` by wall-clock time.

    `generator` "phantom" (the default generator) or "varied" (the varied one,
    with the kinds named in `hold_out` switched off); positives on even indices."""

    def __init__(self, input_size: int, t0: float, budget_s: float, curriculum: Curriculum, length: int = 10**8,
                 generator: str = "phantom", hold_out: tuple[str, ...] = (), mm_per_px: float | None = None) -> None:
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
        check_kinds(hold_out, "hold-out")
        if hold_out and generator != "varied":
            raise ValueError("hold-out applies to the varied generator only (generator 'varied')")
        self.input_size, self.t0, self.budget_s, self.curriculum, self.length = input_size, t0, budget_s, curriculum, length
        self.generator, self.hold_out, self.mm_per_px = generator, tuple(hold_out), mm_per_px

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        frac = min(1.0, (time.time() - self.t0) / self.budget_s)
        gain, dmin = self.curriculum.at(frac)
        seed = seed_of("train", i)
        positive = i % 2 == 0
        diameter = None
        if positive and dmin is not None:
            diameter = float(np.random.default_rng(seed).uniform(dmin, 30.0))
        if self.generator == "varied":
            p: Phantom = generate_varied(seed, self.input_size, findings=finding_count(seed) if positive else 0,
                                exclude=self.hold_out, gain=gain, min_diameter_mm=dmin)
        else:
            p = generate_phantom(seed, size=self.input_size, nodule=positive, gain=gain, diameter_mm=diameter)
        return phantom_sample(p, self.input_size, self.mm_per_px)


def worker_init(_: int) -> None:
    """Keep each DataLoader worker to one thread (generation is per-process parallel)."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
