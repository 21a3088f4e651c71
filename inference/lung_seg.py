"""Owns the lung-field segmentation: where in the image nodules can be.

A small U-Net (`LungNet`, about 0.4 M parameters) reads the model input
downsampled to `SEG_SIZE` px and gives lung-field logits at that size. The lung
field is the whole projected lung, the lung behind the heart included; it was
trained on the training generators only, default and varied phantoms
(`inference.training.lung_seg_train --generator mixed`), and its Dice is
measured on the independent evaluation family (`inference.training.lung_seg_eval`).

Serving (`inference.predictor`) grows the field by `DILATION_PX` in every direction
and by `BELOW_PX` downwards (the lung behind the diaphragm domes, which the
projected outline leaves out), and zeroes the detection heatmap outside it before
the peak and the image score are taken (`inference.model.restricted`). A field whose area is
implausible for a frontal chest (`AREA_RANGE`, share of the model input) or that the
network is undecided about (`MAX_UNDECIDED`: an abdomen's gas gives such fields) is a
failed segmentation: the image goes to review with `REASON` and is read inside the
detection network's own lung channel. A plausible field whose two lungs do not lie
side by side (`side_by_side`: a lateral view superimposes them, an image turned
on its side stacks them; a tilted chest still has them side by side) goes to
review with `NOT_FRONTAL`, whatever ViewPosition says or omits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inference.geometry import Letterbox
from inference.model import dilate, load_weights
from inference.model_card import ModelCard, verify_file

SEG_SIZE = 256  # px of the segmentation input (the model input is area-downsampled to it)
CHANNELS = (16, 32, 64, 96)  # U-Net widths at strides 2, 4, 8, 16 of the segmentation input
# Share of the (letterboxed) input the lung field may cover. The training phantoms' true fields cover 0.20-0.33
# (60 held-out test phantoms at 256 px), the geometric augmentation the network learned from spreads that to
# 0.10-0.51 (300 draws); the range is wider still, so that only a near-empty or a near-full field counts as failed.
AREA_RANGE = (0.04, 0.60)
# Share of undecided pixels (lung probability 0.1-0.9) per field pixel: 0.07-0.10 on 12 held-out training
# phantoms; a field more than six times as undecided is not a lung field the network recognised.
MAX_UNDECIDED = 0.6
UNDECIDED_LOGIT = math.log(9.0)  # |logit| below it: probability in (0.1, 0.9)
DILATION_PX = 6  # segmentation px (about 9 mm on a 400 mm field) the field is grown by in every direction
BELOW_PX = 12  # ... and downwards, for the lung behind the diaphragm domes (about 19 mm)
REASON = "lung_fields_not_found"
NOT_FRONTAL = "view_not_frontal"
# Span of both lung fields, left edge to right edge: median 252 mm on the default phantoms, 269 mm on the varied
# ones (40 held-out calibration images each, true masks). Read as the spacing of an image that has none, it errs
# by 11 % (median; 90th percentile 29 %) on held-out varied images, where assuming the field fills the input
# errs by 20 % (57 %); on the independent family, whose fields are all 370-440 mm, 7 % against 6 %.
LUNG_SPAN_MM = 260.0
# A frontal field's two largest parts: the smaller holds 0.40-0.50 of the field and they share 0.94-1.00 of the
# shorter one's rows (36 frontal images of the three families, 12 each); a chest rotated by 90 degrees gives
# stacked parts (shared rows < 0). The bounds leave room for a small or partly hidden lung. Tilted by 15 degrees
# (24 independent images each way) the bounding boxes of the lungs overlap left to right in most images, their
# centroids in none: 96-100 % of them stay frontal; turned by 90 degrees, none does.
MIN_LUNG_SHARE = 0.25
MIN_SHARED_ROWS = 0.6
COL = cv2.CC_STAT_MAX  # column of a part's centroid, appended to its connected-component stats


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class LungNet(nn.Module):
    """U-Net with a stride-2 stem: (B,1,S,S) in [0, 1] -> (B,1,S,S) lung-field logits (S divisible by 16)."""

    def __init__(self, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        self.channels = tuple(channels)
        c = self.channels
        self.stem = nn.Sequential(nn.Conv2d(1, c[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c[0]),
                                  nn.ReLU(inplace=True))
        self.down = nn.ModuleList([_block(c[0], c[0])] + [_block(c[i - 1], c[i]) for i in range(1, len(c))])
        self.up = nn.ModuleList([_block(c[i] + c[i - 1], c[i - 1]) for i in range(len(c) - 1, 0, -1)])
        self.out = nn.Conv2d(c[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = self.stem(x)
        for i, block in enumerate(self.down):
            h = block(h if i == 0 else F.max_pool2d(h, 2))
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = block(torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        return F.interpolate(self.out(h), size=x.shape[-2:], mode="bilinear", align_corners=False)


def seg_input(model_input: np.ndarray, size: int = SEG_SIZE) -> np.ndarray:
    """The model input (float32 in [0, 1], square) area-downsampled to `size` px."""
    x = np.asarray(model_input, dtype=np.float32)
    if x.shape[0] == size:
        return x
    return cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA)


def grow(mask: torch.Tensor, dilation_px: int = DILATION_PX, below_px: int = BELOW_PX) -> torch.Tensor:
    """(B,H,W) bool mask grown by `dilation_px` in every direction and by `below_px` more downwards."""
    m = dilate(mask, dilation_px).float().unsqueeze(1)
    if below_px > 0:  # row r takes rows r - below_px ... r: the field reaches below_px further down
        m = F.max_pool2d(F.pad(m, (0, 0, below_px, 0)), (below_px + 1, 1), stride=1)
    return m[:, 0] > 0


@dataclass(frozen=True)
class LungField:
    """The segmented lung field of one image at SEG_SIZE: mask, its area share, how undecided it is, whether
    it is plausible (AREA_RANGE, MAX_UNDECIDED), and the grown region."""

    mask: np.ndarray  # bool (SEG_SIZE, SEG_SIZE)
    area: float  # share of the input
    undecided: float  # pixels with lung probability in (0.1, 0.9) per field pixel
    plausible: bool
    region: torch.Tensor  # bool (SEG_SIZE, SEG_SIZE): the mask grown (`grow`), where findings may be
    frontal: bool = True  # two lungs side by side (`side_by_side`)


def side_by_side(mask: np.ndarray) -> bool:
    """Whether a lung-field mask shows two lungs side by side, as a frontal view does: its two largest parts
    each hold at least MIN_LUNG_SHARE of it, each one's centroid lies outside the other's columns, and they
    share at least MIN_SHARED_ROWS of the shorter one's rows. A tilted chest passes: its lungs' bounding
    boxes overlap left to right, their centroids do not."""
    count, _, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count < 3:  # background and fewer than two parts
        return False
    parts = np.hstack([stats[1:], centroids[1:, :1]])  # COL: the centroid's column
    first, second = parts[np.argsort(parts[:, cv2.CC_STAT_AREA])[::-1][:2]]
    if second[cv2.CC_STAT_AREA] < MIN_LUNG_SHARE * parts[:, cv2.CC_STAT_AREA].sum():
        return False
    left, right = sorted((first, second), key=lambda s: s[cv2.CC_STAT_LEFT])
    if left[COL] >= right[cv2.CC_STAT_LEFT] or right[COL] <= left[cv2.CC_STAT_LEFT] + left[cv2.CC_STAT_WIDTH] - 1:
        return False  # a centroid within the other part's columns: superimposed, not side by side
    top = max(left[cv2.CC_STAT_TOP], right[cv2.CC_STAT_TOP])
    bottom = min(left[cv2.CC_STAT_TOP] + left[cv2.CC_STAT_HEIGHT], right[cv2.CC_STAT_TOP] + right[cv2.CC_STAT_HEIGHT])
    return bottom - top >= MIN_SHARED_ROWS * min(left[cv2.CC_STAT_HEIGHT], right[cv2.CC_STAT_HEIGHT])


class LungSegmenter:
    """A loaded LungNet; `field` segments one model input."""

    def __init__(self, net: LungNet, device: torch.device, area_range: tuple[float, float] = AREA_RANGE,
                 max_undecided: float = MAX_UNDECIDED) -> None:
        self.net, self.device, self.area_range, self.max_undecided = net.eval(), device, area_range, max_undecided

    @classmethod
    def load(cls, path: str, device: torch.device, area_range: tuple[float, float] = AREA_RANGE,
             max_undecided: float = MAX_UNDECIDED) -> "LungSegmenter":
        net = load_weights(LungNet(), path)
        for p in net.parameters():
            p.requires_grad_(False)
        return cls(net.to(device), device, area_range, max_undecided)

    @classmethod
    def of_card(cls, card: ModelCard, card_path: str | Path, device: torch.device) -> LungSegmenter | None:
        """The segmentation a model card ships (its file's sha256 checked), None when it ships none."""
        if not card.lung_segmentation:
            return None
        seg = card.lung_segmentation
        return cls.load(str(verify_file(card_path, seg, "lung_segmentation")), device, tuple(seg["area_range"]),
                        float(seg["max_undecided"]))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B,1,S,S) segmentation inputs -> (B,S,S) logits."""
        with torch.inference_mode():
            return self.net(x.to(self.device))[:, 0].float()

    def thorax_spacing(self, model_input: np.ndarray, geometry: Letterbox) -> float | None:
        """The source pixel spacing (mm) that makes the lung fields of `model_input` (placed by `geometry`)
        span LUNG_SPAN_MM; None unless they are a plausible frontal field."""
        field = self.field(model_input)
        if not (field.plausible and field.frontal):
            return None
        cols = np.nonzero(field.mask.any(axis=0))[0]
        span_model_px = (cols[-1] - cols[0] + 1) * model_input.shape[-1] / field.mask.shape[1]
        return LUNG_SPAN_MM * geometry.scale / span_model_px

    def field(self, model_input: np.ndarray) -> LungField:
        x = torch.from_numpy(seg_input(model_input))[None, None]
        logits = self.logits(x)
        mask = logits > 0
        area = float(mask.float().mean())
        undecided = float((logits.abs() < UNDECIDED_LOGIT).sum()) / max(int(mask.sum()), 1)
        plausible = self.area_range[0] <= area <= self.area_range[1] and undecided <= self.max_undecided
        field = mask[0].cpu().numpy()
        return LungField(field, area, undecided, plausible, grow(mask)[0], side_by_side(field))

