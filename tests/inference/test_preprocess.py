"""DICOM validation and preprocessing: photometrics, bit depths, geometry, compression, rejections."""
from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from inference.training.phantoms import Phantom, generate_phantom, phantom_dataset
from inference.training.samples import phantom_model_input
from inference.geometry import letterbox
from inference.preprocess import prepare, prepare_array
from inference.types import NotApplicable, Unreadable

SIZE = 512


@lru_cache(maxsize=None)
def phantom(seed: int = 21, bits_stored: int = 12) -> Phantom:
    return generate_phantom(seed, SIZE, nodule=True, bits_stored=bits_stored)


def dataset(**kwargs) -> pydicom.Dataset:
    return phantom_dataset(phantom(), **kwargs)


def test_prepare_gives_display_and_model_input():
    image = prepare(dataset())
    assert image.display.dtype == np.uint8 and image.display.shape == (SIZE, SIZE)
    assert image.model_input.dtype == np.float32 and image.model_input.shape == (512, 512)
    assert 0.0 <= image.model_input.min() and image.model_input.max() <= 1.0
    assert image.pixel_spacing_mm == pytest.approx((360 / SIZE, 360 / SIZE), rel=1e-5)
    assert image.quality_flags == ()
    assert image.sop_instance_uid == dataset().SOPInstanceUID


@pytest.mark.parametrize("input_size, mm_per_px", [(256, None), (512, None), (512, 0.9)])
def test_phantom_fast_path_matches_prepare(input_size, mm_per_px):
    p = phantom()
    fast, geometry = phantom_model_input(p, input_size, mm_per_px)
    served = prepare(phantom_dataset(p), input_size=input_size, mm_per_px=mm_per_px)
    assert geometry == served.geometry
    assert geometry.scale == pytest.approx(input_size / SIZE if mm_per_px is None else p.pixel_spacing_mm / mm_per_px)
    assert np.abs(fast - served.model_input).max() <= 1e-4


def test_monochrome1_equals_monochrome2():
    plain, inverted = prepare(dataset()), prepare(dataset(monochrome1=True, modality="CR"))
    assert np.abs(plain.model_input - inverted.model_input).max() <= 1e-4
    assert np.abs(plain.display.astype(int) - inverted.display.astype(int)).max() <= 1


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_bit_depths(bits):
    ds = phantom_dataset(phantom(bits_stored=bits))
    assert ds.BitsAllocated == (8 if bits == 8 else 16)
    image = prepare(ds)
    assert _corr(image.model_input, prepare(dataset()).model_input) > 0.99


def test_signed_pixels_with_rescale_equal_unsigned():
    ds = dataset()
    signed = (ds.pixel_array.astype(np.int32) - 2048).astype(np.int16)
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "2048"
    ds.PixelData = signed.tobytes()
    assert np.abs(prepare(ds).model_input - prepare(dataset()).model_input).max() <= 1e-4


def test_odd_geometry_is_letterboxed():
    ds = dataset(rows_cols=(1999, 1600))
    image = prepare(ds)
    assert image.display.shape == (1999, 1600)
    lb = letterbox((1999, 1600), 512)
    assert (lb.height, lb.width, lb.top, lb.left) == (512, 410, 0, 51)
    assert not image.model_input[:, :lb.left].any() and not image.model_input[:, lb.left + lb.width:].any()
    assert image.model_input[:, lb.left:lb.left + lb.width].std() > 0.1


def test_coordinate_mapping_round_trip_and_maps():
    shape = (1999, 1600)
    lb = letterbox(shape, 512)
    r, c = lb.to_model(1000.0, 321.0)
    assert lb.to_source(r, c) == pytest.approx((1000.0, 321.0))
    assert letterbox((512, 512), 512).to_model(10.0, 20.0) == pytest.approx((10.0, 20.0))
    heat = np.zeros((128, 128), np.float32)
    heat[64, 64] = 1.0
    src = lb.map_to_source(heat)
    assert src.shape == shape and src.dtype == np.float32
    peak = np.unravel_index(np.argmax(src), shape)
    expect = lb.to_source(64 * 4 + 1.5, 64 * 4 + 1.5)
    assert abs(peak[0] - expect[0]) < 8 and abs(peak[1] - expect[1]) < 8


def test_prepare_array_normalises_percentiles():
    ramp = np.tile(np.linspace(0.2, 0.6, 300, dtype=np.float32), (200, 1))
    lb = letterbox(ramp.shape, 128)
    out = prepare_array(ramp, lb)
    assert out.shape == (128, 128) and out.dtype == np.float32
    assert (lb.top, lb.height, lb.left, lb.width) == (21, 85, 0, 128)
    content = out[lb.top:lb.top + lb.height]
    assert content.min() == 0.0 and content.max() == 1.0
    assert not out[:lb.top].any() and not out[lb.top + lb.height:].any()


def test_window_functions_and_voi_lut():
    ds = dataset()
    base = prepare(ds).model_input
    ds.VOILUTFunction = "LINEAR_EXACT"
    assert _corr(prepare(ds).model_input, base) > 0.999
    ds.VOILUTFunction = "SIGMOID"
    assert _corr(prepare(ds).model_input, base) > 0.95
    lut = dataset()
    del lut.WindowCenter, lut.WindowWidth
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = list(range(4096))
    lut.VOILUTSequence = [item]
    assert _corr(prepare(lut).model_input, base) > 0.99


def test_missing_window_uses_percentiles_and_flags_it():
    ds = dataset()
    del ds.WindowCenter, ds.WindowWidth
    image = prepare(ds)
    assert "default_window" in image.quality_flags
    assert _corr(image.model_input, prepare(dataset()).model_input) > 0.99


def _roundtrip(ds: pydicom.Dataset, tmp_path, name: str) -> pydicom.Dataset:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_compressed_with_pydicom_encoders(tmp_path, syntax):
    ds = dataset()
    ds.compress(syntax)
    image = prepare(_roundtrip(ds, tmp_path, "c.dcm"))
    assert np.array_equal(image.model_input, prepare(dataset()).model_input)


@pytest.mark.parametrize("tool, option", [("dcmcjpeg", "+e1"), ("dcmcjpls", "+el")])
def test_compressed_with_dcmtk(tmp_path, tool, option):
    binary = shutil.which(tool) or f"/usr/bin/{tool}"
    if not shutil.which(binary):
        pytest.skip(f"{tool} (DCMTK) is not installed; no Python encoder for this transfer syntax")
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    dataset().save_as(src, enforce_file_format=True)
    subprocess.run([binary, option, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    ds = pydicom.dcmread(dst)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    image = prepare(ds)
    assert np.array_equal(image.model_input, prepare(dataset()).model_input)


def _reason(exc_type, ds: pydicom.Dataset) -> str:
    with pytest.raises(exc_type) as info:
        prepare(ds)
    return info.value.reason


def _edit(**attrs) -> pydicom.Dataset:
    ds = dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_not_applicable_reasons():
    no_pixels = dataset()
    del no_pixels.PixelData
    assert _reason(NotApplicable, no_pixels) == "not_an_image: no Pixel Data"
    assert _reason(NotApplicable, _edit(Modality="CT")) == "modality_not_supported: CT"
    assert _reason(NotApplicable, _edit(Modality="SC", BodyPartExamined="")).startswith("modality_not_supported: SC")
    assert _reason(NotApplicable, _edit(BodyPartExamined="KNEE")) == "body_part_not_chest: KNEE"
    assert _reason(NotApplicable, _edit(ViewPosition="LL")) == "lateral_view: ViewPosition LL"
    assert _reason(NotApplicable, _edit(ViewPosition="LLO")) == "view_not_supported: ViewPosition LLO"
    assert _reason(NotApplicable, _edit(NumberOfFrames=2)) == "multi_frame: 2 frames"
    assert _reason(NotApplicable, _edit(PhotometricInterpretation="RGB")) == "photometric_not_supported: RGB"
    assert _reason(NotApplicable, _edit(PhotometricInterpretation="PALETTE COLOR")).startswith(
        "photometric_not_supported")


def test_unreadable_reasons():
    small = phantom_dataset(generate_phantom(1, 64), rows_cols=(32, 32))
    assert _reason(Unreadable, small) == "too_small: 32x32"
    truncated = dataset()
    truncated.PixelData = truncated.PixelData[:1000]
    assert _reason(Unreadable, truncated).startswith("pixel_data_truncated")
    garbage = dataset()
    garbage.compress(JPEG2000Lossless)
    frame = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    garbage.PixelData = frame
    assert _reason(Unreadable, garbage).startswith("pixel_data_unreadable")
    constant = dataset()
    constant.PixelData = np.full((SIZE, SIZE), 1000, np.uint16).tobytes()
    assert _reason(Unreadable, constant).startswith("no_dynamic_range")
    assert _reason(Unreadable, _edit(BitsAllocated=1)).startswith("bits_not_supported")


def test_accepted_variants_carry_flags():
    flags = prepare(_edit(ViewPosition="", BodyPartExamined="", Modality="CR")).quality_flags
    assert {"view_position_missing", "body_part_missing"} <= set(flags)
    assert "ap_view" in prepare(_edit(ViewPosition="AP")).quality_flags
    assert "secondary_capture" in prepare(_edit(Modality="SC", BodyPartExamined="CHEST")).quality_flags
    assert prepare(_edit(BodyPartExamined="THORAX")).quality_flags == ()
    no_spacing = dataset()
    del no_spacing.PixelSpacing, no_spacing.ImagerPixelSpacing
    image = prepare(no_spacing)
    assert image.pixel_spacing_mm is None and "no_pixel_spacing" in image.quality_flags


def test_quality_flags():
    narrow = _edit(WindowCenter="2000", WindowWidth="50")
    assert "saturated_exposure" in prepare(narrow).quality_flags
    coarse = dataset()
    levels = (coarse.pixel_array // 400).astype(np.uint16)
    coarse.PixelData = levels.tobytes()
    del coarse.WindowCenter, coarse.WindowWidth
    assert "low_dynamic_range" in prepare(coarse).quality_flags
    lossy = _edit(LossyImageCompression="01")
    assert "lossy_compressed" in prepare(lossy).quality_flags
