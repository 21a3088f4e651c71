"""Training on windows (`train --crop`): image and maps cut alike, positives' windows on the finding, labels
and radius targets that follow the window."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.model import HEAD_STRIDE
from inference.training import train
from inference.training.samples import phantom_sample
from inference.training.variety import generate_varied

SIZE, CROP = 256, 128


def _batch() -> dict[str, torch.Tensor]:
    samples = [phantom_sample(generate_varied(seed, SIZE, findings=n), SIZE) for seed, n in ((11, 1), (12, 0), (13, 2))]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    # each image pixel holds its heatmap cell's coordinates, so a window's first pixel says where it was cut
    rows, cols = torch.meshgrid(torch.arange(SIZE) // HEAD_STRIDE, torch.arange(SIZE) // HEAD_STRIDE, indexing="ij")
    batch["image"] = (rows * 1000 + cols).float()[None, None].repeat(3, 1, 1, 1)
    return batch


@pytest.mark.parametrize("seed", range(6))
def test_windows_cut_image_and_maps_alike_and_positives_hold_their_finding(seed: int) -> None:
    batch = _batch()
    cut = train.crop_batch(batch, CROP, torch.Generator().manual_seed(seed), on_finding=1.0)
    c = CROP // HEAD_STRIDE
    assert cut["image"].shape == (3, 1, CROP, CROP) and cut["heat"].shape == cut["lung"].shape == (3, 1, c, c)
    for i in range(3):
        r, q = divmod(int(cut["image"][i, 0, 0, 0]), 1000)
        assert torch.equal(cut["heat"][i], batch["heat"][i, :, r:r + c, q:q + c])
        assert torch.equal(cut["lung"][i], batch["lung"][i, :, r:r + c, q:q + c])
    assert cut["label"].tolist() == [1.0, 0.0, 1.0]  # the finding's window holds its peak; the negative has none
    assert cut["radius_valid"][0] == 1.0 and cut["radius_valid"][1] == 0.0
    assert cut["lung"][1].mean() > 0.2  # a negative's window lies on the lungs (centred on a lung pixel)


def test_windows_of_positives_may_miss_the_finding_and_are_then_negative() -> None:
    batch = _batch()
    cut = train.crop_batch(batch, 64, torch.Generator().manual_seed(0), on_finding=0.0)
    for i in range(3):
        assert cut["label"][i] == float(cut["heat"][i].max() >= 0.999)
        assert cut["radius_valid"][i] <= cut["label"][i]


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        train.crop_batch(_batch(), 100, torch.Generator())
    with pytest.raises(ValueError, match="multiple of 32"):
        train.crop_batch(_batch(), SIZE, torch.Generator())


def test_a_short_run_on_windows_writes_its_card(tmp_path: Path) -> None:
    from inference.model_card import load_card

    assert train.main(["--out", str(tmp_path), "--generator", "varied", "--crop", "128", "--input-size", "256",
                       "--max-steps", "2", "--minutes", "5", "--batch", "2", "--workers", "0", "--threads", "1",
                       "--calib-n", "4", "--test-n", "4"]) == 0
    card = load_card(tmp_path / "card.json")
    assert card.training["crop"].startswith("128 px windows") and card.training["steps"] == 2
    assert card.input_size == 256  # served on whole images
    with pytest.raises(ValueError, match="not to --data"):
        train.main(["--out", str(tmp_path / "x"), "--data", str(tmp_path), "--crop", "128"])
