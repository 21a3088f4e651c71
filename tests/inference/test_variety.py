"""The varied training generator (#17): determinism, kinds that switch off, masks that follow the image, truth."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from inference.preprocess import _window_linear, default_window, prepare
from inference.training.phantoms import phantom_dataset
from inference.training.samples import phantom_model_input
from inference.training.samples import Curriculum, TrainStream, phantom_sample
from inference.training.variety import KINDS, generate_varied
from inference.training.variety_acquisition import Geometry
from inference.training.variety_body import render

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # no overflow or empty-slice warnings either
SIZE = 192
ALL = frozenset(KINDS)
CONTACT = Path(__file__).resolve().parents[2] / "test-output" / "variety" / "contact.png"


def _display(p) -> np.ndarray:
    centre, width = default_window(p.pixels)
    return _window_linear(p.pixels.astype(np.float32), centre, width)


def test_same_seed_same_image_and_truth_different_seed_differs():
    a, b = generate_varied(7, SIZE, findings=2), generate_varied(7, SIZE, findings=2)
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.lung_mask, b.lung_mask)
    assert a.findings == b.findings and a.bits_stored == b.bits_stored and a.monochrome1 == b.monochrome1
    c = generate_varied(8, SIZE, findings=2)
    assert c.pixels.shape != a.pixels.shape or not np.array_equal(a.pixels, c.pixels)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_switches_off_and_changes_the_image_when_on(kind):
    changed = 0
    for seed in range(12):
        off = generate_varied(seed, SIZE, findings=4, exclude=ALL)
        on = generate_varied(seed, SIZE, findings=4, exclude=ALL - {kind})
        changed += off.pixels.shape != on.pixels.shape or not np.array_equal(off.pixels, on.pixels)
        if changed >= 2:
            break
    assert changed >= 2, f"{kind} changed {changed} of 12 images"


def test_with_every_kind_off_the_image_is_the_plain_default():
    p = generate_varied(3, SIZE, findings=0, exclude=ALL)
    assert p.pixels.shape == (SIZE, SIZE) and p.bits_stored == 12 and not p.monochrome1 and p.view == "PA"
    assert p.habitus == "adult" and p.devices == () and p.mimics == ()


def test_holding_out_a_kind_leaves_the_other_draws_alone():
    full = generate_varied(11, SIZE, findings=3)
    for kind in ("devices", "text", "mimics", "noise"):
        other = generate_varied(11, SIZE, findings=3, exclude={kind})
        assert other.findings == full.findings and np.array_equal(other.lung_mask, full.lung_mask)


def test_geometry_moves_the_zones_with_the_image():
    body = render(5, SIZE, 360.0 / SIZE, habitus=False, soft_tissue=False, limbs=False, ap=False, tag=1)
    lungs = (body.zones > 0).astype(np.uint8)
    m0 = cv2.moments(lungs, binaryImage=True)
    c0 = (m0["m10"] / m0["m00"], m0["m01"] / m0["m00"])
    # rotate 20 degrees about the image centre, scale 0.8, then crop 20 px off the left and top
    rot = cv2.getRotationMatrix2D((SIZE / 2, SIZE / 2), 20.0, 0.8)
    rot[:, 2] -= 20.0
    geo = Geometry(rot, (SIZE - 20, SIZE - 20), 0.8)
    moved = geo.warp(lungs, nearest=True)
    m1 = cv2.moments(moved, binaryImage=True)
    assert m1["m00"] == pytest.approx(0.64 * m0["m00"], rel=0.03)
    expect = geo.points(c0)
    assert math.hypot(m1["m10"] / m1["m00"] - expect[0], m1["m01"] / m1["m00"] - expect[1]) < 1.0


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_lung_mask_sits_on_the_dark_lungs_of_the_image(seed):
    """The generated mask separates dark lung from its bright surroundings better than a mask turned 8 degrees."""
    p = generate_varied(seed, 256, findings=0, exclude={"collimation", "devices", "text"})
    disp = _display(p)
    mask = p.lung_mask.astype(np.uint8)

    def separation(m: np.ndarray) -> float:
        ring = cv2.dilate(m, np.ones((9, 9), np.uint8)) > m
        return float(np.median(disp[ring]) - np.median(disp[m > 0]))

    m = cv2.moments(mask, binaryImage=True)
    centre = (m["m10"] / m["m00"], m["m01"] / m["m00"])
    own = separation(mask)
    assert own > 0.05
    for angle in (-8.0, 8.0):
        turned = cv2.warpAffine(mask, cv2.getRotationMatrix2D(centre, angle, 1.0), mask.shape[::-1],
                                flags=cv2.INTER_NEAREST)
        assert own > separation(turned)


def test_several_findings_lie_in_the_lungs_and_show():
    seen = 0
    for seed in (21, 22, 23):
        with_f = generate_varied(seed, 384, findings=4, min_diameter_mm=10.0, exclude={"masses"})
        without = generate_varied(seed, 384, findings=0, exclude={"masses"})
        assert len(with_f.findings) >= 3
        diff = _display(with_f) - _display(without)
        rows, cols = np.mgrid[0:diff.shape[0], 0:diff.shape[1]]
        far = np.ones(diff.shape, bool)
        for f in with_f.findings:
            far &= np.hypot(rows - f.row, cols - f.col) > 2.5 * f.radius_px + 4
        noise = float(np.std(diff[far]))
        for f in with_f.findings:
            assert with_f.lung_mask[int(round(f.row)), int(round(f.col))], f
            assert f.radius_px == pytest.approx(f.diameter_mm / 2 / with_f.pixel_spacing_mm)
            core = np.hypot(rows - f.row, cols - f.col) <= max(1.0, 0.5 * f.radius_px)
            assert diff[core].mean() > max(0.01, 4 * noise), (seed, f)
            seen += 1
    assert seen >= 9
    assert with_f.nodule == max(with_f.findings, key=lambda f: f.diameter_mm)


def test_masses_above_30_mm_are_drawn_and_can_be_held_out():
    found = [f for s in range(12) for f in generate_varied(s, SIZE, findings=3).findings]
    masses = [f for f in found if f.diameter_mm > 30.0]
    assert masses and all(f.kind == "mass" for f in masses)
    assert {f.margin for f in found} == {"smooth", "lobulated", "spiculated"} and any(f.part_solid for f in found)
    assert {f.zone for f in found} >= {"lung", "hilum", "behind the heart", "below the dome"}
    held = [f for s in range(12) for f in generate_varied(s, SIZE, findings=3, exclude={"masses"}).findings]
    assert held and max(f.diameter_mm for f in held) <= 30.0


def test_negatives_with_mimics_carry_no_finding():
    mimics = set()
    for seed in range(10):
        p = generate_varied(seed, SIZE, findings=0)
        assert p.findings == () and p.nodule is None
        if p.mimics:
            plain = generate_varied(seed, SIZE, findings=0, exclude={"mimics"})
            assert not np.array_equal(p.pixels, plain.pixels)
        mimics |= set(p.mimics)
    assert {"nipple shadow", "bone island", "vessel end-on"} <= mimics


def test_monochrome1_and_bit_depths_read_back_through_the_node_preprocessing(tmp_path):
    seen = set()
    for seed in range(30):
        p = generate_varied(seed, 384, findings=1)
        key = (p.bits_stored, p.monochrome1)
        if key in seen or min(p.pixels.shape) < 256:
            continue
        seen.add(key)
        path = tmp_path / f"{seed}.dcm"
        phantom_dataset(p, monochrome1=p.monochrome1, view_position=p.view).save_as(path, enforce_file_format=True)
        ds = pydicom.dcmread(path)
        assert ds.BitsStored == p.bits_stored and ds.PhotometricInterpretation == (
            "MONOCHROME1" if p.monochrome1 else "MONOCHROME2")
        assert int(ds.pixel_array.max()) <= (1 << p.bits_stored) - 1
        prepared = prepare(ds, input_size=256)
        expect, _ = phantom_model_input(p, 256)
        assert np.abs(prepared.model_input - expect).max() < 0.02, key
    assert {b for b, _ in seen} >= {8, 16} and {m for _, m in seen} == {True, False}


def test_training_samples_from_the_varied_generator():
    stream = TrainStream(128, 0.0, 1e9, Curriculum(), generator="varied", hold_out=("devices",))
    pos = [stream[i] for i in range(0, 12, 2)]
    assert all(s["label"] == 1 and int((s["heat"] == 1.0).sum()) >= 1 for s in pos)
    assert any(int((s["heat"] == 1.0).sum()) >= 2 for s in pos)  # several findings, a peak each
    neg = stream[1]
    assert neg["label"] == 0 and float(neg["heat"].max()) == 0.0
    for i in range(12):  # a non-square image: no lung in the letterbox padding
        p = generate_varied(10_000_000 + i, 128, findings=0)
        if p.pixels.shape[0] != p.pixels.shape[1]:
            s = phantom_sample(p, 128)
            empty = s["image"][0].sum(dim=0) == 0 if p.pixels.shape[0] > p.pixels.shape[1] else \
                s["image"][0].sum(dim=1) == 0
            assert empty.any()
            lung = s["lung"][0]
            assert float(lung.sum()) > 0 and float((lung.sum(dim=0) if p.pixels.shape[0] > p.pixels.shape[1]
                                                    else lung.sum(dim=1))[:1].sum()) == 0.0
            break
    else:
        pytest.fail("no non-square image in 12 seeds")


@pytest.mark.parametrize("kwargs, name", [({"exclude": {"lasers"}}, "exclude"), ({"size": 10}, "size"),
                                          ({"findings": 99}, "findings"), ({"gain": -1.0}, "gain")])
def test_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_varied(1, **{"size": SIZE, **kwargs})
    with pytest.raises(ValueError, match="hold-out"):
        TrainStream(128, 0.0, 1.0, Curriculum(), generator="varied", hold_out=("lasers",))


def test_contact_sheet_of_sixteen_varied_images():
    """Writes test-output/variety/contact.png (lung outline green, findings red) for a person to look at."""
    tile = 256
    tiles = []
    for seed in range(16):
        p = generate_varied(seed, tile)
        img = np.zeros((tile, tile), np.float32)
        d = _display(p)
        img[:d.shape[0], :d.shape[1]] = d
        bgr = cv2.cvtColor((img * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
        contours, _ = cv2.findContours(p.lung_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(bgr, contours, -1, (0, 160, 0), 1)
        for f in p.findings:
            cv2.circle(bgr, (int(f.col), int(f.row)), int(f.radius_px + 3), (0, 0, 255), 1)
        tiles.append(bgr)
    sheet = np.vstack([np.hstack(tiles[i:i + 4]) for i in range(0, 16, 4)])
    CONTACT.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(CONTACT), sheet)
    assert cv2.imread(str(CONTACT)).shape == (4 * tile, 4 * tile, 3)


def test_held_out_varied_split_and_its_eval_family_keep_every_finding_and_the_storage():
    from inference.training.eval_report import family_cases
    from inference.training.samples import HeldOut, ModelImages, heldout_phantom

    cases = list(family_cases("varied", 12, SIZE))
    phantoms = [heldout_phantom("test", i, SIZE, "varied") for i in range(12)]
    assert [c.label for c in cases] == [int(i % 2 == 0) for i in range(12)]  # findings on even indices only
    for case, ph in zip(cases, phantoms):
        assert len(case.findings) == len(ph.findings)
        assert {(f.row, f.col) for f in case.findings} == {(f.row, f.col) for f in ph.findings}
        assert case.photometric == ("MONOCHROME1" if ph.monochrome1 else "MONOCHROME2")
        assert case.bits_stored == ph.bits_stored
    assert {c.photometric for c in cases} == {"MONOCHROME1", "MONOCHROME2"}  # the storage kind varies in the split
    sample = HeldOut(ModelImages("varied", SIZE), "test", 2)[0]
    assert sample["label"] == 1 and bool((sample["image"] == phantom_sample(phantoms[0], SIZE)["image"]).all())
    with pytest.raises(ValueError, match="generator"):
        ModelImages("real", SIZE)


def test_eval_families_option_names_unknown_families():
    import argparse

    from inference.training import options

    p = argparse.ArgumentParser()
    options.evaluate(p)
    assert p.parse_args(["--families", "varied,independent"]).families == ("varied", "independent")
    assert p.parse_args([]).families == options.FAMILIES
    with pytest.raises(SystemExit):
        p.parse_args(["--families", "training,real"])
