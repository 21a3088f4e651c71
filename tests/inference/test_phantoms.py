"""Phantom generator and its DICOM writer: determinism, ground truth, valid DX/CR instances."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from inference.training.phantoms import (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, generate_phantom, phantom_dataset,
                                write_phantom_series)

SIZE = 256  # small and fast; geometry scales with size


def test_same_seed_same_phantom_and_different_seed_differs():
    a, b = generate_phantom(3, SIZE, nodule=True), generate_phantom(3, SIZE, nodule=True)
    assert np.array_equal(a.pixels, b.pixels)
    assert np.array_equal(a.lung_mask, b.lung_mask)
    assert a.nodule == b.nodule
    assert not np.array_equal(a.pixels, generate_phantom(4, SIZE, nodule=True).pixels)


def test_pixels_lung_mask_and_spacing():
    p = generate_phantom(5, SIZE, bits_stored=12, field_mm=400.0)
    assert p.pixels.dtype == np.uint16 and p.pixels.shape == (SIZE, SIZE)
    assert p.pixels.max() <= 4095 and p.pixels.max() - p.pixels.min() > 2000
    assert p.pixel_spacing_mm == pytest.approx(400.0 / SIZE)
    assert p.lung_mask.dtype == bool and 0.15 < p.lung_mask.mean() < 0.5
    # lungs are darker than the mediastinum between them (MONOCHROME2: bright = dense)
    rows = np.nonzero(p.lung_mask.any(axis=1))[0]
    mid_row = p.pixels[(rows[0] + rows[-1]) // 2]
    assert np.median(p.pixels[p.lung_mask]) < mid_row[SIZE // 2 - 3:SIZE // 2 + 3].mean()


@pytest.mark.parametrize("seed", range(8))
def test_nodule_lies_in_the_lung_mask(seed):
    p = generate_phantom(seed, SIZE, nodule=True)
    n = p.nodule
    assert n is not None
    assert p.lung_mask[int(round(n.row)), int(round(n.col))]
    assert 5.0 <= n.diameter_mm <= 30.0
    assert n.radius_px == pytest.approx(n.diameter_mm / 2 / p.pixel_spacing_mm)


def test_nodule_presence_from_seed_and_gain_scales_contrast():
    present = {generate_phantom(s, 64).nodule is not None for s in range(12)}
    assert present == {True, False}
    one = generate_phantom(9, SIZE, nodule=True, gain=1.0, diameter_mm=20.0)
    two = generate_phantom(9, SIZE, nodule=True, gain=2.0, diameter_mm=20.0)
    assert (one.nodule.row, one.nodule.col) == (two.nodule.row, two.nodule.col)
    assert two.nodule.contrast == pytest.approx(2 * one.nodule.contrast)
    assert 0.1 < one.nodule.contrast < 0.35  # about a hilar vessel at physical contrast
    assert generate_phantom(9, SIZE, nodule=False).nodule is None


@pytest.mark.parametrize("kwargs", [{"size": 10}, {"bits_stored": 20}, {"gain": -1.0}, {"diameter_mm": 0.1},
                                    {"field_mm": 0.0}])
def test_bad_arguments_name_the_parameter(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        generate_phantom(1, **{"size": SIZE, **kwargs})


DX_REQUIRED = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "Modality",
               "SeriesInstanceUID", "SeriesNumber", "Manufacturer", "InstanceNumber", "PatientOrientation",
               "ContentDate", "ContentTime", "ImageType", "SamplesPerPixel", "PhotometricInterpretation",
               "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
               "PixelData", "PixelSpacing", "ImagerPixelSpacing", "ViewPosition", "BodyPartExamined",
               "WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "SOPClassUID",
               "SOPInstanceUID", "BurnedInAnnotation", "LossyImageCompression", "ImageLaterality"]


def test_dataset_round_trip(tmp_path):
    p = generate_phantom(11, SIZE)
    path = tmp_path / "dx.dcm"
    phantom_dataset(p, patient_name="TEST^ONE", patient_id="T1").save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == DX_FOR_PRESENTATION == ds.file_meta.MediaStorageSOPClassUID
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    missing = [k for k in DX_REQUIRED if k not in ds]
    assert not missing
    assert np.array_equal(ds.pixel_array, p.pixels)
    assert float(ds.PixelSpacing[0]) == pytest.approx(p.pixel_spacing_mm, rel=1e-5)
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
        assert pydicom.uid.UID(uid).is_valid


def test_uids_are_deterministic_and_vary_with_the_instance():
    p = generate_phantom(12, 64)
    a, b = phantom_dataset(p), phantom_dataset(p)
    assert (a.StudyInstanceUID, a.SOPInstanceUID) == (b.StudyInstanceUID, b.SOPInstanceUID)
    m1 = phantom_dataset(p, monochrome1=True)
    assert m1.StudyInstanceUID == a.StudyInstanceUID and m1.SOPInstanceUID != a.SOPInstanceUID
    assert phantom_dataset(p, study_instance_uid="1.2.3.4").StudyInstanceUID == "1.2.3.4"
    assert phantom_dataset(generate_phantom(13, 64)).StudyInstanceUID != a.StudyInstanceUID


def test_monochrome1_cr_and_geometry():
    p = generate_phantom(14, SIZE, bits_stored=10)
    ds = phantom_dataset(p, monochrome1=True, modality="CR", rows_cols=(300, 200))
    assert ds.SOPClassUID == CR_IMAGE_STORAGE and ds.PhotometricInterpretation == "MONOCHROME1"
    assert (ds.Rows, ds.Columns) == (300, 200) and ds.BitsStored == 10
    assert ds.pixel_array.shape == (300, 200) and ds.pixel_array.max() <= 1023
    assert float(ds.PixelSpacing[0]) == pytest.approx(p.pixel_spacing_mm * SIZE / 300, rel=1e-5)
    plain = phantom_dataset(p, monochrome1=False, modality="CR", rows_cols=(300, 200))
    assert np.array_equal(ds.pixel_array.astype(int), 1023 - plain.pixel_array.astype(int))
    with pytest.raises(ValueError, match="modality"):
        phantom_dataset(p, modality="CT")


def test_eight_bit_phantom_is_stored_in_eight_bits():
    ds = phantom_dataset(generate_phantom(15, 64, bits_stored=8))
    assert ds.BitsAllocated == 8 and ds.pixel_array.dtype == np.uint8


@pytest.mark.skipif(not shutil.which("dciodvfy"), reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("kwargs", [{}, {"modality": "CR", "monochrome1": True}])
def test_dciodvfy_finds_no_errors(tmp_path, kwargs):
    path = tmp_path / "p.dcm"
    phantom_dataset(generate_phantom(16, 64), **kwargs).save_as(path, enforce_file_format=True)
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = out.stdout + out.stderr
    assert "Error" not in report and "Warning" not in report, report


def test_write_phantom_series(tmp_path):
    paths = write_phantom_series(tmp_path / "out", 3, 40, size=64, nodule=True, modality="CR")
    assert [p.name for p in paths] == ["phantom_000040.dcm", "phantom_000041.dcm", "phantom_000042.dcm"]
    sets = [pydicom.dcmread(p) for p in paths]
    assert [str(d.PatientName) for d in sets] == ["PHANTOM^0040", "PHANTOM^0041", "PHANTOM^0042"]
    assert len({d.StudyInstanceUID for d in sets}) == 3
    assert {d.Modality for d in sets} == {"CR"}
