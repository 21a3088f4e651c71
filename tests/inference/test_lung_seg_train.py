"""The lung-field segmentation's training entry point: the mixed pool and a tiny run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.lung_seg import SEG_SIZE, LungNet
from inference.model import load_weights
from inference.preprocess import letterbox
from inference.training.lung_seg_train import main, pool_sample
from inference.training.samples import seed_of
from inference.training.variety import generate_varied


def test_the_mixed_pool_takes_odd_indices_from_the_varied_generator_with_the_mask_letterboxed() -> None:
    index = next(i for i in range(1, 41, 2) if len(set(generate_varied(seed_of("train", i), SEG_SIZE).pixels.shape)) == 2)
    source = generate_varied(seed_of("train", index), SEG_SIZE)
    image, mask = pool_sample(index, generator="mixed")
    assert image.shape == mask.shape == (SEG_SIZE, SEG_SIZE) and mask.dtype == np.uint8
    lb = letterbox(source.pixels.shape, SEG_SIZE)
    outside = np.ones_like(mask, bool)
    outside[lb.top:lb.top + lb.height, lb.left:lb.left + lb.width] = False
    assert outside.any() and not mask[outside].any() and not image[outside].any()
    assert abs(mask.mean() - source.lung_mask.mean() * lb.height * lb.width / SEG_SIZE**2) < 0.01
    # even indices (and every index of the default generator) stay default phantoms with their lung_field
    assert np.array_equal(pool_sample(index - 1, generator="mixed")[1], pool_sample(index - 1)[1])
    assert not np.array_equal(pool_sample(index)[1], mask)


def test_a_two_step_mixed_run_from_given_weights_writes_loadable_weights(tmp_path: Path) -> None:
    init = tmp_path / "init"
    assert main(["--out", str(init), "--steps", "1", "--pool", "2", "--val", "1", "--batch", "1",
                 "--weights-name", "init.safetensors"]) == 0
    out = tmp_path / "run"
    assert main(["--out", str(out), "--generator", "mixed", "--init", str(init / "init.safetensors"),
                 "--steps", "2", "--pool", "4", "--val", "2", "--batch", "2", "--weights-name", "w.safetensors"]) == 0
    load_weights(LungNet(), str(out / "w.safetensors"))


def test_a_missing_init_file_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--init", str(tmp_path / "absent.safetensors")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: --init {tmp_path / 'absent.safetensors'} is not a file"]
