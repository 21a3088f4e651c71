"""Owns labelled image folders in the NODE21 layout: the path from real radiographs to training and evaluation.

A folder holds images (DICOM `.dcm`/no suffix, 8- or 16-bit PNG, MetaImage
`.mha`/`.mhd`) and a CSV with the header `img_name,x,y,width,height,label`:
one row per nodule box (x, y = top-left column and row in image pixels, label
1), one row with label 0 (box 0 0 0 0) per image without a nodule. This is the
layout of NODE21's public training set; JSRT or a PACS export converted to it
works the same.

DICOM goes through `inference.preprocess.prepare` as the node reads it (its
validation and quality flags included). PNG and MHA are taken as bright =
dense, scaled by their own range; MHA's ElementSpacing is the pixel spacing.
`labelled_sample` turns a prepared image and its boxes into the training
sample `inference.training.train.losses` expects (no lung mask: `lung_valid` 0); the
fine-tune on expert verdicts builds its samples with it too.
"""
from __future__ import annotations

import csv
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import Dataset

from inference.preprocess import ThoraxSpacing, place, prepare, read_dataset
from inference.types import PreparedImage, Unreadable

COLUMNS = ("img_name", "x", "y", "width", "height", "label")
IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".mha", ".mhd", "")
_MET_TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2", "MET_UINT": "u4",
              "MET_INT": "i4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


@dataclass(frozen=True)
class Box:
    """A nodule box in image pixels: top-left (x = column, y = row), width, height."""

    x: float
    y: float
    width: float
    height: float

    @property
    def centre(self) -> tuple[float, float]:
        """(row, col) of the box centre, pixel-centre convention."""
        return self.y + self.height / 2 - 0.5, self.x + self.width / 2 - 0.5

    @property
    def radius(self) -> float:
        return max(self.width, self.height) / 2


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int
    boxes: tuple[Box, ...]


def read_labels(folder: str | Path, csv_path: str | Path | None = None) -> list[LabelledImage]:
    """The labelled images of `folder` (CSV: `csv_path`, or the only .csv in the folder), in CSV order.

    ValueError names the file and row of a bad header, value or missing image.
    """
    folder = Path(folder)
    if csv_path is None:
        found = sorted(folder.glob("*.csv"))
        if len(found) != 1:
            raise ValueError(f"folder {str(folder)!r} must hold exactly one .csv (found {len(found)}); pass the labels file")
        csv_path = found[0]
    csv_path = Path(csv_path)
    images: dict[str, tuple[Path, int, list[Box]]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(h.strip() for h in (reader.fieldnames or ())) != COLUMNS:
            raise ValueError(f"{csv_path}: header must be {','.join(COLUMNS)}, got {reader.fieldnames}")
        for n, row in enumerate(reader, start=2):
            try:
                name = row["img_name"].strip()
                label = int(float(row["label"]))
                box = Box(*(float(row[k]) for k in ("x", "y", "width", "height")))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{csv_path} line {n}: {exc}") from exc
            if label not in (0, 1) or (label and (box.width <= 0 or box.height <= 0)):
                raise ValueError(f"{csv_path} line {n}: label must be 0 or 1 with a positive box for 1")
            path, old_label, boxes = images.get(name) or (_image_path(folder, name, csv_path, n), label, [])
            if label:
                boxes.append(box)
            images[name] = (path, max(old_label, label), boxes)
    return [LabelledImage(path, label, tuple(boxes)) for path, label, boxes in images.values()]


def _image_path(folder: Path, name: str, csv_path: Path, line: int) -> Path:
    if "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"{csv_path} line {line}: img_name must be a file name in the folder")
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / (name + suffix)
        if candidate.is_file():
            return candidate
    raise ValueError(f"{csv_path} line {line}: no image file for img_name {name!r} in {str(folder)!r}")


def read_mha(path: str | Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A 2-D MetaImage (.mha with LOCAL data, or .mhd with its raw file; zlib-compressed or not):
    (array, (row, col) spacing or None). A 3-D image must have one slice."""
    path = Path(path)
    raw = path.read_bytes()
    header: dict[str, str] = {}
    pos = 0
    while True:
        end = raw.index(b"\n", pos)
        key, _, value = raw[pos:end].decode("ascii").partition("=")
        header[key.strip()] = value.strip()
        pos = end + 1
        if key.strip() == "ElementDataFile":
            break
    dims = [int(v) for v in header["DimSize"].split()]
    if len(dims) == 3 and dims[2] == 1:
        dims = dims[:2]
    if len(dims) != 2:
        raise Unreadable(f"pixel_data_unreadable: MetaImage DimSize {header['DimSize']}")
    kind = _MET_TYPES.get(header.get("ElementType", ""))
    if kind is None:
        raise Unreadable(f"pixel_data_unreadable: MetaImage ElementType {header.get('ElementType')!r}")
    msb = header.get("ElementByteOrderMSB", header.get("BinaryDataByteOrderMSB", "False")).lower() == "true"
    data_file = header["ElementDataFile"]
    data = raw[pos:] if data_file == "LOCAL" else (path.parent / data_file).read_bytes()
    if header.get("CompressedData", "False").lower() == "true":
        data = zlib.decompress(data)
    dtype = np.dtype((">" if msb else "<") + kind)
    count = dims[0] * dims[1]
    if len(data) < count * dtype.itemsize:
        raise Unreadable(f"pixel_data_truncated: {len(data)} of {count * dtype.itemsize} bytes")
    array = np.frombuffer(data, dtype, count).reshape(dims[1], dims[0])
    spacing = header.get("ElementSpacing")
    sp = None
    if spacing:
        values = [float(v) for v in spacing.split()]
        sp = (values[1], values[0])
    return array, sp


def load_prepared(path: str | Path, input_size: int, mm_per_px: float | None = None,
                  thorax_spacing: ThoraxSpacing | None = None) -> PreparedImage:
    """The image at `path` as the model reads it (NotApplicable/Unreadable as the node raises them);
    `mm_per_px` the model's physical scale (None: fitted) and `thorax_spacing` its estimate of a missing
    spacing, as `inference.preprocess.prepare` (`Detector.prepare` passes both)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".png", ".mha", ".mhd"):
        if suffix == ".png":
            array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
            if array is None:
                raise Unreadable("pixel_data_unreadable: PNG not decoded")
            if array.ndim == 3:
                array = cv2.cvtColor(array[..., :3], cv2.COLOR_BGR2GRAY)
            spacing = None
        else:
            array, spacing = read_mha(path)
        values = array.astype(np.float32)
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            raise Unreadable(f"no_dynamic_range: every pixel is {lo}")
        display = (values - lo) / (hi - lo)
        model_input, geometry, estimated = place(display, input_size, spacing, mm_per_px, thorax_spacing)
        return PreparedImage(sop_instance_uid="", display=np.round(display * 255).astype(np.uint8),
                             model_input=model_input, pixel_spacing_mm=spacing,
                             quality_flags=("not_dicom",) + (() if spacing else ("no_pixel_spacing",)) + tuple(estimated),
                             geometry=geometry)
    return prepare(read_dataset(path), input_size=input_size, mm_per_px=mm_per_px, thorax_spacing=thorax_spacing)


def labelled_sample(image: PreparedImage, present: bool, spots: Sequence[tuple[float, float, float | None]],
                    input_size: int) -> dict:
    """Training sample of a labelled image: image label; a Gaussian heatmap target at each spot
    (source row, col, radius px or None) when given; no lung mask.

    A positive without spots has no heatmap target (`heat_valid` 0); a
    radius is learned only when every spot has one.
    """
    import math

    import torch

    from inference.model import HEAD_STRIDE
    from inference.model import heatmap_coord

    out = input_size // HEAD_STRIDE
    geometry = image.placement
    heat = np.zeros((out, out), np.float32)
    yy, xx = np.mgrid[0:out, 0:out].astype(np.float32)
    radii = []
    for row, col, radius in spots if present else []:
        r_m, c_m = geometry.to_model(row, col)
        r, c = heatmap_coord(r_m), heatmap_coord(c_m)
        radius_hm = None if radius is None else radius * geometry.scale / HEAD_STRIDE
        sigma = CLICK_SIGMA_HM if radius_hm is None else max(1.0, radius_hm / 4)
        heat = np.maximum(heat, np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma**2)).astype(np.float32))
        heat[min(out - 1, max(0, round(r))), min(out - 1, max(0, round(c)))] = 1.0
        radii.append(radius_hm)
    with_radius = bool(radii) and all(r is not None for r in radii)
    first_radius = radii[0] if with_radius else None
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.model_input, np.float32))[None],
        "heat": torch.from_numpy(heat)[None],
        "lung": torch.zeros((1, out, out)),
        "log_radius": torch.tensor(math.log(max(first_radius, 0.5)) if first_radius is not None else 0.0),
        "label": torch.tensor(float(present)),
        "heat_valid": torch.tensor(float(not present or bool(spots))),
        "lung_valid": torch.tensor(0.0),
        "radius_valid": torch.tensor(float(with_radius)),
    }


CLICK_SIGMA_HM = 2.0  # heatmap pixels: sigma of the target at a spot of unknown radius (a verdict click)


def spots_of(item: LabelledImage) -> list[tuple[float, float, float]]:
    return [(*b.centre, b.radius) for b in item.boxes]


class LabelledFolder(Dataset):
    """A torch map-style dataset of a labelled folder's training samples (prepared on access)."""

    def __init__(self, folder: str | Path, input_size: int, csv_path: str | Path | None = None,
                 mm_per_px: float | None = None) -> None:
        self.items = read_labels(folder, csv_path)
        if not self.items:
            raise ValueError(f"folder {str(folder)!r} has no labelled images")
        self.input_size, self.mm_per_px = input_size, mm_per_px

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i % len(self.items)]
        image = load_prepared(item.path, self.input_size, self.mm_per_px)
        return labelled_sample(image, bool(item.label), spots_of(item), self.input_size)
