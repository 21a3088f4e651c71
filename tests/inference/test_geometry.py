"""The placement of a source image in the model input: fitted, or at a physical scale from the pixel spacing."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from inference.geometry import Letterbox, letterbox
from inference.predictor import Detector
from inference.preprocess import prepare
from inference.training.phantoms import generate_phantom, phantom_dataset


def test_fitted_placement_fills_the_longer_side() -> None:
    lb = letterbox((1999, 1600), 512)
    assert (lb.height, lb.width, lb.top, lb.left) == (512, 410, 0, 51)
    assert lb.scale == pytest.approx(512 / 1999)


def test_physical_placement_keeps_millimetres_per_model_pixel() -> None:
    for spacing in (0.15, 0.2, 0.3):  # a 2000 px detector row of 300, 400 and 600 mm
        lb = letterbox((2000, 1500), 512, (spacing, spacing), 0.9)
        expected = min(spacing / 0.9, 512 / 2000)  # a 600 mm field is larger than 512 x 0.9 mm: fitted
        assert lb.scale == pytest.approx(expected)
        assert lb.height == round(2000 * expected) and lb.width == round(1500 * expected)
        assert lb.top == (512 - lb.height) // 2 and lb.left == (512 - lb.width) // 2
    small = letterbox((1000, 800), 512, (0.2, 0.2), 0.9)  # a child's 200 mm field stays small
    assert (small.height, small.width) == (222, 178)


def test_anisotropic_spacing_gives_square_model_pixels() -> None:
    lb = letterbox((1000, 1000), 512, (0.3, 0.15), 0.9)
    assert lb.height == 333 and lb.width == 167
    assert lb.scale_row / lb.scale_col == pytest.approx(2.0, rel=0.01)


def test_mapping_round_trips_and_rescales() -> None:
    lb = letterbox((2000, 1500), 512, (0.17, 0.17), 0.8)
    r, c = lb.to_model(1234.0, 321.0)
    assert lb.to_source(r, c) == pytest.approx((1234.0, 321.0))
    quarter = lb.at(128)
    assert quarter.scale == pytest.approx(lb.scale / 4)
    assert abs(quarter.top - lb.top / 4) <= 1 and abs(quarter.height - lb.height / 4) <= 1
    assert letterbox((300, 200), 512).at(128) == letterbox((300, 200), 128)
    square = np.zeros((128, 128), np.float32)
    square[quarter.top + quarter.height // 2, quarter.left + quarter.width // 2] = 1.0
    source = quarter.map_to_source(square)
    assert source.shape == (2000, 1500)
    peak = np.unravel_index(int(np.argmax(source)), source.shape)
    assert abs(peak[0] - 1000) < 20 and abs(peak[1] - 750) < 20


def test_placement_pads_with_zeros_and_keeps_dtype() -> None:
    lb = letterbox((40, 80), 64, (1.0, 1.0), 2.0)
    placed = lb.pad(lb.resize(np.ones((40, 80), np.uint8)))
    assert placed.dtype == np.uint8 and placed.sum() == lb.height * lb.width == 20 * 40
    assert np.array_equal(lb.content(placed), np.ones((20, 40), np.uint8))


@pytest.mark.parametrize("bad", [dict(source_shape=(0, 5)), dict(input_size=0), dict(row_scale=0.0),
                                 dict(col_scale=float("inf"))])
def test_impossible_geometry_is_refused(bad: dict) -> None:
    kwargs = dict(source_shape=(10, 10), input_size=16, row_scale=1.0, col_scale=1.0) | bad
    with pytest.raises(ValueError):
        Letterbox(**kwargs)
    with pytest.raises(ValueError, match="mm_per_px"):
        letterbox((10, 10), 16, (1.0, 1.0), -1.0)


def test_a_nodule_has_the_same_model_size_whatever_the_detector_spacing() -> None:
    """The same anatomy stored at two resolutions and two fields: at a physical scale its size in the
    model input is the same; fitted, the image with a wider field shows it smaller."""
    ph = generate_phantom(3, 600, nodule=True)
    ds = phantom_dataset(ph)
    wide = phantom_dataset(ph)
    wide.PixelSpacing = wide.ImagerPixelSpacing = [f"{ph.pixel_spacing_mm / 2:.6g}"] * 2  # claims half the field
    a, b = prepare(ds, mm_per_px=0.8), prepare(wide, mm_per_px=0.8)
    assert b.geometry.scale == pytest.approx(a.geometry.scale / 2, rel=1e-4)
    assert b.geometry.height == pytest.approx(a.geometry.height / 2, abs=1)
    assert prepare(ds).geometry.scale == prepare(wide).geometry.scale  # fitted: spacing ignored


def test_without_spacing_a_physical_model_fits_the_image_and_flags_it() -> None:
    ds = phantom_dataset(generate_phantom(4, 400, nodule=False))
    del ds.PixelSpacing, ds.ImagerPixelSpacing
    image = prepare(ds, mm_per_px=0.8)
    assert image.geometry == letterbox((400, 400), 512)
    assert "no_pixel_spacing" in image.quality_flags


def test_the_detector_prepares_at_its_cards_scale(card_copy) -> None:
    detector = _physical_detector(card_copy, 1.2)
    ph = generate_phantom(5, 400, nodule=True)
    image = detector.prepare(phantom_dataset(ph))
    assert image.geometry.scale == pytest.approx(ph.pixel_spacing_mm / 1.2)
    prediction = detector.predict(image)
    assert prediction.heatmap.shape == (400, 400)
    location = detector.read(image)[1]
    assert 0 <= location.row < 400 and 0 <= location.col < 400


@pytest.mark.parametrize("spacing", ["0.01", "2.0", "-0.2"])
def test_a_spacing_no_chest_field_has_is_read_as_none(spacing: str) -> None:
    """A 600 px image of 0.01 mm pixels would be a 6 mm field, of 2 mm pixels a 1.2 m one: fitted and flagged,
    never shrunk to a speck or ignored."""
    ds = phantom_dataset(generate_phantom(6, 600, nodule=False))
    ds.PixelSpacing = [spacing, spacing]
    image = prepare(ds, mm_per_px=0.85)
    assert image.pixel_spacing_mm is None and "invalid_pixel_spacing" in image.quality_flags
    assert image.geometry == letterbox((600, 600), 512)


def _physical_detector(card_copy, mm_per_px: float = 0.85) -> Detector:
    import json

    raw = json.loads(card_copy.read_text())
    raw["input_mm_per_px"] = mm_per_px
    card_copy.write_text(json.dumps(raw))
    return Detector.load(card_copy, device="cpu", threads=1)


def test_without_spacing_the_lung_fields_give_an_estimate(card_copy) -> None:
    """An image of the independent family (not our generator) without its spacing tags: the span of its
    lung fields gives the scale, flagged; a rotated chest gives none and stays fitted."""
    from inference.training import eval_family as ef

    detector = _physical_detector(card_copy)
    case = ef.make_case(ef.SEED_BASE + 11, 600, positive=False)
    ds = ef.case_dataset(case)
    del ds.PixelSpacing, ds.ImagerPixelSpacing
    image = detector.prepare(ds)
    assert {"no_pixel_spacing", "spacing_estimated"} <= set(image.quality_flags)
    assert image.pixel_spacing_mm is None  # an estimate is not a measurement: no millimetres in the SR
    estimate = image.geometry.scale * 0.85
    assert abs(estimate / case.spacing_mm - 1.0) < 0.3
    assert "no_pixel_spacing" in detector.predict(image).review_reasons

    turned = ef.case_dataset(dataclasses.replace(case, pixels=np.ascontiguousarray(np.rot90(case.pixels))))
    del turned.PixelSpacing, turned.ImagerPixelSpacing
    image = detector.prepare(turned)
    assert "spacing_estimated" not in image.quality_flags and image.geometry == letterbox(turned.pixel_array.shape, 512)


def test_a_fitted_model_estimates_nothing(card_copy) -> None:
    ds = phantom_dataset(generate_phantom(4, 400, nodule=False))
    del ds.PixelSpacing, ds.ImagerPixelSpacing
    image = Detector.load(card_copy, device="cpu", threads=1).prepare(ds)
    assert "spacing_estimated" not in image.quality_flags and image.geometry == letterbox((400, 400), 512)
