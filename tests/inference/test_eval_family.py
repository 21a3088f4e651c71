"""The evaluation family: independent of the training generator, deterministic, truthful, read by the node."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from inference.training import eval_family as ef
from inference.preprocess import prepare


def test_shares_no_code_with_the_training_generator() -> None:
    tree = ast.parse(Path(ef.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name.startswith("inference") for name in imported), imported


def test_deterministic_and_a_positive_differs_from_its_negative_only_at_the_findings() -> None:
    a, b = ef.make_case(ef.SEED_BASE + 4, 384, positive=True), ef.make_case(ef.SEED_BASE + 4, 384, positive=True)
    assert np.array_equal(a.pixels, b.pixels) and a.findings == b.findings
    neg = ef.make_case(ef.SEED_BASE + 4, 384, positive=False)
    assert neg.label == 0 and a.label == 1 and neg.photometric == a.photometric
    diff = np.abs(ef.display_of(a) - ef.display_of(neg))
    near = np.zeros(diff.shape, bool)
    rows, cols = np.mgrid[0:diff.shape[0], 0:diff.shape[1]]
    for f in a.findings:
        near |= np.hypot(rows - f.row, cols - f.col) <= 2.5 * f.radius_px + 4
    # the processing (percentile window, unsharp mask) spreads a little, the finding itself stands out
    assert diff[near].max() > 5 * max(diff[~near].max(), 1e-4) or diff[~near].max() < 0.02


def test_findings_lie_in_the_lung_mask_with_the_promised_sizes() -> None:
    kinds = set()
    for i in range(12):
        case = ef.make_case(ef.SEED_BASE + 100 + i, 256, positive=True)
        assert 1 <= len(case.findings) <= 2 and case.lung_mask.any()
        for f in case.findings:
            assert case.lung_mask[int(f.row), int(f.col)]
            lo, hi = (5.0, 30.0) if f.kind == "nodule" else (30.0, 60.0)
            assert lo <= f.diameter_mm <= hi
            assert f.radius_px == pytest.approx(f.diameter_mm / 2 / case.spacing_mm, rel=0.35)
            kinds.add(f.kind)
    assert "nodule" in kinds


@pytest.mark.parametrize("index", range(4))
def test_the_node_reads_both_photometrics_with_lungs_darker_than_the_spine(index: int) -> None:
    case = ef.make_case(ef.SEED_BASE + 200 + index, 512, positive=False)
    image = prepare(ef.case_dataset(case), input_size=256)
    display = image.display.astype(float)
    row = int(np.nonzero(case.lung_mask.any(axis=1))[0].mean())  # a row through both lungs
    lung_cols = np.nonzero(case.lung_mask[row])[0]
    gap = np.diff(lung_cols).argmax()  # the mediastinum lies between the lungs
    mediastinum = display[row, lung_cols[gap] + 1:lung_cols[gap + 1]].mean()
    assert display[row, lung_cols].mean() < mediastinum - 20, case.photometric
    assert "no_pixel_spacing" not in image.quality_flags


def test_photometrics_vary_and_images_are_not_all_square() -> None:
    cases = [ef.make_case(ef.SEED_BASE + 300 + i, 200) for i in range(12)]
    assert {c.photometric for c in cases} == {"MONOCHROME1", "MONOCHROME2"}
    assert any(c.pixels.shape[0] != c.pixels.shape[1] for c in cases)
    assert len({c.bits_stored for c in cases}) > 1


def test_abdomen_has_no_lungs_and_says_so_unless_told_otherwise() -> None:
    case = ef.make_abdomen(ef.SEED_BASE + 1, 256)
    assert not case.lung_mask.any() and case.label == 0
    assert ef.case_dataset(case).BodyPartExamined == "ABDOMEN"
    assert ef.case_dataset(case, body_part="CHEST").BodyPartExamined == "CHEST"
