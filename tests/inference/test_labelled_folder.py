"""Labelled folders in the NODE21 layout: PNG, DICOM and MHA with a box CSV, for training and evaluation."""
from __future__ import annotations

import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference.training import evaluate
from inference.training.labelled_folder import LabelledFolder, labelled_sample, load_prepared, read_labels, read_mha
from inference.model import HEAD_STRIDE, NoduleNet, heatmap_coord
from inference.training.phantoms import generate_phantom, phantom_dataset
from inference.geometry import letterbox
from inference.training.train import losses

SIZE = 256


def write_mha(path: Path, array: np.ndarray, spacing: tuple[float, float], compressed: bool) -> None:
    """A MetaImage as SimpleITK writes NODE21's images: 3-D with one slice, MET_SHORT."""
    data = array.astype("<i2").tobytes()
    if compressed:
        data = zlib.compress(data)
    header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"CompressedData = {compressed}\nElementSpacing = {spacing[1]} {spacing[0]} 1\n"
              f"DimSize = {array.shape[1]} {array.shape[0]} 1\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    path.write_bytes(header.encode() + data)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("node21")
    pos = generate_phantom(9_500, size=320, nodule=True, gain=3.0, diameter_mm=25.0)
    neg = generate_phantom(9_501, size=320, nodule=False)
    n = pos.nodule
    box = (n.col - n.radius_px + 0.5, n.row - n.radius_px + 0.5, 2 * n.radius_px, 2 * n.radius_px)
    cv2.imwrite(str(root / "n0001.png"), (neg.pixels >> 4).astype(np.uint8))  # 8 bit
    cv2.imwrite(str(root / "n0002.png"), (pos.pixels << 4).astype(np.uint16))  # 16 bit
    phantom_dataset(pos, monochrome1=True).save_as(root / "n0003.dcm", enforce_file_format=True)
    write_mha(root / "n0004.mha", pos.pixels.astype(np.int16) - 2048, (0.7, 0.7), compressed=True)
    rows = ["img_name,x,y,width,height,label", "n0001.png,0,0,0,0,0"]
    for name in ("n0002.png", "n0003", "n0004.mha"):
        rows.append(f"{name},{box[0]:.1f},{box[1]:.1f},{box[2]:.1f},{box[3]:.1f},1")
    rows.append("n0004.mha,10,10,20,20,1")  # a second box on the same image
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_rows_group_into_images_with_their_boxes(folder: Path) -> None:
    items = read_labels(folder)
    assert [i.path.name for i in items] == ["n0001.png", "n0002.png", "n0003.dcm", "n0004.mha"]
    assert [i.label for i in items] == [0, 1, 1, 1]
    assert [len(i.boxes) for i in items] == [0, 1, 1, 2]


def test_each_format_is_read_bright_dense_with_its_spacing(folder: Path) -> None:
    images = {p: load_prepared(folder / p, SIZE) for p in ("n0002.png", "n0003.dcm", "n0004.mha")}
    for name, image in images.items():
        assert image.model_input.shape == (SIZE, SIZE) and image.display.shape == (320, 320), name
    ref = images["n0003.dcm"].display.astype(float)  # MONOCHROME1 DICOM, inverted by prepare
    for name in ("n0002.png", "n0004.mha"):
        assert np.corrcoef(ref.ravel(), images[name].display.astype(float).ravel())[0, 1] > 0.95, name
    assert images["n0004.mha"].pixel_spacing_mm == (0.7, 0.7)
    assert "no_pixel_spacing" in images["n0002.png"].quality_flags
    array, spacing = read_mha(folder / "n0004.mha")
    assert array.shape == (320, 320) and array.dtype == np.dtype("<i2") and spacing == (0.7, 0.7)


def test_sample_targets_sit_on_the_boxes_and_train_losses_accept_them(folder: Path) -> None:
    data = LabelledFolder(folder, SIZE)
    assert len(data) == 4
    item = data.items[1]
    sample = data[1]
    row, col = item.boxes[0].centre
    r, c = (heatmap_coord(v) for v in letterbox((320, 320), SIZE).to_model(row, col))
    peak = np.unravel_index(int(sample["heat"][0].argmax()), sample["heat"][0].shape)
    assert abs(peak[0] - r) <= 1 and abs(peak[1] - c) <= 1
    assert sample["lung_valid"] == 0 and sample["heat_valid"] == 1 and sample["radius_valid"] == 1
    assert data[0]["heat"].max() == 0 and data[0]["label"] == 0
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in sample}
    parts = losses(NoduleNet("resnet10t").eval(), batch)
    assert all(torch.isfinite(v) for v in parts.values()) and parts["lung"] == 0
    unlocated = labelled_sample(load_prepared(item.path, SIZE), True, [], SIZE)
    assert unlocated["heat_valid"] == 0 and unlocated["heat"].max() == 0
    assert sample["heat"].shape[-1] == SIZE // HEAD_STRIDE


def test_bad_labels_are_refused_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("img_name,x,y,width,height,label\nmissing.png,1,2,3,4,1\n")
    with pytest.raises(ValueError, match="a.csv line 2: no image file"):
        read_labels(tmp_path)
    (tmp_path / "a.csv").write_text("name,x,y,w,h,label\n")
    with pytest.raises(ValueError, match="header"):
        read_labels(tmp_path)
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "a.csv").write_text("img_name,x,y,width,height,label\nx.png,0,0,0,0,1\n")
    with pytest.raises(ValueError, match="positive box"):
        read_labels(tmp_path)
    (tmp_path / "a.csv").write_text("img_name,x,y,width,height,label\n../x.png,0,0,0,0,0\n")
    with pytest.raises(ValueError, match="file name"):
        read_labels(tmp_path)


@pytest.mark.slow  # the model over dozens of images
def test_eval_reads_the_folder_beside_both_families(folder: Path, tmp_path: Path, capsys) -> None:
    assert evaluate.main(["--n", "2", "--robust-n", "0", "--ood-n", "0", "--latency-images", "0", "--threads", "1",
                          "--families", "independent,training", "--data", str(folder),
                          "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "independent" in line and "folder" in line)
    assert header.split() == ["independent", "training", "folder"]  # the families asked for, in that order
    assert next(line for line in out.splitlines() if line.startswith("images (skipped)")).split()[-2:] == ["4", "(0)"]


def test_train_takes_the_folder_and_starts_from_a_card(folder: Path, tmp_path: Path) -> None:
    from inference.training import train
    from inference.model_card import load_card
    from inference.predictor import DEFAULT_CARD

    out = tmp_path / "run"
    assert train.main(["--out", str(out), "--data", str(folder), "--init", str(DEFAULT_CARD), "--max-steps", "2",
                       "--minutes", "10", "--batch", "2", "--input-size", "128", "--calib-n", "4", "--test-n", "4",
                       "--workers", "0", "--threads", "1"]) == 0
    card = load_card(out / "card.json")
    parent = load_card(DEFAULT_CARD)
    assert card.training["data"] == f"labelled folder {folder.name} (4 images)"
    assert card.training["init"].startswith(f"{parent.name} {parent.version}") and card.training["steps"] == 2
    assert "training data: 4 labelled images" in (out / "train.log").read_text()
    # the init card's lung segmentation travels (file and entry); its OOD density, fitted on other weights, does not
    assert card.lung_segmentation == parent.lung_segmentation
    assert (out / card.lung_segmentation["file"]).read_bytes() == (DEFAULT_CARD.parent / card.lung_segmentation["file"]).read_bytes()
    assert card.ood == {} and not (out / parent.ood["file"]).exists()
