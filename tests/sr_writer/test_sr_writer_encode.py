"""Result objects of `sr_writer.encode_results`, read back with highdicom, pydicom, DCMTK and poppler."""
from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from inference.types import Location, ModelIdentity, PreparedImage, Prediction
from sr_writer.encode import ResultObjects, SimilarCase, encode_results, render_pdf
from tests.conftest import require_binary
from sr_writer.structured_report import (ABSENT, EXPERT_REVIEW, LUNG, NODULE, NO, PRESENT, PROBABILITY,
                                         QUALITATIVE_EVALUATIONS, ROI_TRACKING_ID, UNCERTAINTY, YES,
                                         tracking_uid)

OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "sr_writer"
MODEL = ModelIdentity(name="nodule-resnet18", version="1.2.0", weights_sha256="ab" * 32)
LOCATION = Location(row=100.0, col=170.0, radius=14.0)
SIZE = 256


def make_source(size: int = SIZE) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["sr_writer test source", str(size)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "SN-TEST-001"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["sr_writer test study"])
    ds.StudyDate, ds.StudyTime = "20240315", "101500"
    ds.StudyID, ds.AccessionNumber = "1", "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["sr_writer test series"])
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Modality = "DX"
    ds.Manufacturer, ds.ManufacturerModelName = "Phantom", "Synthetic DX"
    ds.InstitutionName = "Test Hospital"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = ds.PixelSpacing = [0.7, 0.7]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    yy, xx = np.mgrid[:size, :size]
    ds.PixelData = ((np.sin(xx / 9.0) + 1) * 1500 + yy).astype(np.uint16).tobytes()
    return ds


def make_inputs(source: pydicom.Dataset, *, positive: bool,
                model: ModelIdentity = MODEL) -> tuple[PreparedImage, Prediction]:
    size = source.Rows
    scale = size / SIZE
    yy, xx = np.mgrid[:size, :size]
    display = (40 + 150 * np.exp(-((xx - size / 2) ** 2) / (2 * (size / 4) ** 2))).astype(np.uint8)
    location = Location(LOCATION.row * scale, LOCATION.col * scale, LOCATION.radius * scale)
    heat = np.exp(-((yy - location.row) ** 2 + (xx - location.col) ** 2) / (2 * (size / 10) ** 2))
    image = PreparedImage(sop_instance_uid=source.SOPInstanceUID, display=display,
                          model_input=display.astype(np.float32) / 255,
                          pixel_spacing_mm=(0.7 / scale, 0.7 / scale))
    prediction = Prediction(
        probability=0.87 if positive else 0.08, uncertainty=0.05 if positive else 0.21,
        positive=positive, review=not positive, location=location if positive else None,
        heatmap=(heat if positive else heat * 0.3).astype(np.float32),
        embedding=np.ones(8, np.float32) / np.sqrt(8), model=model,
    )
    return image, prediction


SIMILAR = (SimilarCase("20230102", 0.91, "nodule confirmed", 0.93),
           SimilarCase("20221111", 0.64, None, 0.81))


@pytest.fixture(scope="module")
def source() -> pydicom.Dataset:
    return make_source()


@pytest.fixture(scope="module", params=[True, False], ids=["positive", "negative"])
def encoded(request, source) -> tuple[bool, Prediction, ResultObjects]:
    image, prediction = make_inputs(source, positive=request.param)
    results = encode_results(source, image, prediction, review=not request.param,
                             similar_cases=SIMILAR if request.param else (),
                             institution_name="SmartNodule Node")
    return request.param, prediction, results


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _reread(ds: pydicom.Dataset, tmp_path: Path, name: str) -> pydicom.Dataset:
    return pydicom.dcmread(_save(ds, tmp_path / name))


def test_same_patient_and_study_own_series(encoded, source, tmp_path):
    _, _, results = encoded
    numbers = set()
    for index, ds in enumerate(results.all()):
        back = _reread(ds, tmp_path, f"{index}.dcm")
        assert back.StudyInstanceUID == source.StudyInstanceUID
        assert back.PatientID == source.PatientID
        assert back.PatientName == source.PatientName
        assert back.AccessionNumber == source.AccessionNumber
        assert back.SeriesInstanceUID != source.SeriesInstanceUID
        assert back.Manufacturer == "SmartNodule"
        assert "not for primary diagnosis" in back.SeriesDescription
        numbers.add(back.SeriesNumber)
    assert numbers == ({9901, 9902, 9903, 9904} if results.gsps is not None else {9901, 9902, 9903})


def test_sr_content(encoded, source, tmp_path):
    positive, prediction, results = encoded
    sr = hd.sr.srread(_save(results.sr, tmp_path / "sr.dcm"))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.ContentDate and sr.ContentTime
    assert source.SOPInstanceUID in sr.get_evidence()[0]

    # The image-level result: TID 1500 "Qualitative Evaluations", in every SR.
    [evaluations] = [item for item in sr.ContentSequence
                     if item.ConceptNameCodeSequence[0].CodeValue == QUALITATIVE_EVALUATIONS.value]
    finding, review = evaluations.ContentSequence
    assert _code(finding.ConceptNameCodeSequence) == NODULE
    assert _code(finding.ConceptCodeSequence) == (PRESENT if positive else ABSENT)
    assert _numbers(finding) == {PROBABILITY.meaning: (round(prediction.probability * 100, 1), "%"),
                                 UNCERTAINTY.meaning: (round(prediction.uncertainty * 100, 1), "%")}
    assert _code(review.ConceptNameCodeSequence) == EXPERT_REVIEW
    assert _code(review.ConceptCodeSequence) == (NO if positive else YES)  # the fixture reviews negatives

    groups = sr.content.get_image_measurement_groups()
    assert sr.content.get_planar_roi_measurement_groups() == []
    if not positive:
        assert groups == []  # OHIF makes a measurement of every group; a negative has nothing to draw
        return
    [group] = groups
    assert group.tracking_identifier == ROI_TRACKING_ID
    assert ROI_TRACKING_ID.startswith("Cornerstone3DTools@^0.1.0:CircleROI:")
    assert group.tracking_uid == tracking_uid(source, prediction, ROI_TRACKING_ID)
    assert group.finding_type == NODULE
    assert [site.value for site in group.finding_sites] == [LUNG]
    assert _texts(group, "111001") == [MODEL.name]  # Algorithm Name
    assert _texts(group, "111003") == [MODEL.version]  # Algorithm Version
    assert _texts(group, "111002") == [f"weights_sha256={MODEL.weights_sha256}"]  # Parameters
    [present] = group.get_qualitative_evaluations(name=NODULE)
    assert present.value == PRESENT
    # The first NUM is the probability, INFERRED FROM the circle: cornerstone takes its geometry from there.
    probability, uncertainty = [item for item in group[0].ContentSequence if item.ValueType == "NUM"]
    assert _code(probability.ConceptNameCodeSequence) == PROBABILITY
    assert _code(uncertainty.ConceptNameCodeSequence) == UNCERTAINTY
    [measured] = group.get_measurements(name=PROBABILITY)
    assert measured.value == pytest.approx(87.0) and measured.unit.value == "%"
    [circle] = [item for item in probability.ContentSequence if item.ValueType == "SCOORD"]
    assert circle.RelationshipType == "INFERRED FROM" and circle.GraphicType == "CIRCLE"
    centre, edge = np.reshape(circle.GraphicData, (2, 2))
    # DICOM pixel convention: the nodule centred on pixel index (row 100, column 170) is at (170.5, 100.5).
    assert tuple(centre) == pytest.approx((LOCATION.col + 0.5, LOCATION.row + 0.5))
    assert tuple(edge) == pytest.approx((LOCATION.col + 0.5 + LOCATION.radius, LOCATION.row + 0.5))
    assert circle.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def _code(sequence) -> Code:
    item = sequence[0]
    return Code(item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning)


def _numbers(item) -> dict[str, tuple[float, str]]:
    """Concept meaning -> (value, UCUM unit) of the NUM children of `item`."""
    return {child.ConceptNameCodeSequence[0].CodeMeaning:
            (float(child.MeasuredValueSequence[0].NumericValue),
             child.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)
            for child in item.ContentSequence if child.ValueType == "NUM"}


def _texts(group: hd.sr.Template, code: str) -> list[str]:
    """Values of the TEXT items coded DCM `code` directly under the group's container."""
    return [item.TextValue for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == code]


def test_uids_deterministic_per_model_version(source):
    image, prediction = make_inputs(source, positive=True)
    first = encode_results(source, image, prediction, review=False)
    again = encode_results(source, image, prediction, review=False)
    newer = dataclasses.replace(prediction, model=dataclasses.replace(MODEL, version="1.3.0"))
    other = encode_results(source, image, newer, review=False)
    uids = [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in first.all()]
    assert uids == [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in again.all()]
    every = {uid for pair in uids for uid in pair}
    assert len(every) == 8  # SR, heatmap, PDF and GSPS: series and instance each
    assert every.isdisjoint({uid for ds in other.all() for uid in (ds.SeriesInstanceUID, ds.SOPInstanceUID)})


def test_heatmap_secondary_capture(encoded, source, tmp_path):
    positive, _, results = encoded
    back = _reread(results.heatmap, tmp_path, "sc.dcm")
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3
    assert back.BurnedInAnnotation == "YES"
    assert back.PatientOrientation == source.PatientOrientation
    pixels = back.pixel_array
    assert pixels.shape[2] == 3 and max(pixels.shape[:2]) <= 1024
    _write_png(pixels, OUTPUT / f"heatmap-{'positive' if positive else 'negative'}.png")


def test_heatmap_of_large_image_is_at_most_1024(tmp_path):
    big = make_source(2048)
    image, prediction = make_inputs(big, positive=True)
    results = encode_results(big, image, prediction, review=True)
    assert max(results.heatmap.Rows, results.heatmap.Columns) <= 1024
    assert _circle_centre(results.sr) == pytest.approx((prediction.location.col + 0.5, prediction.location.row + 0.5))


def test_pdf(encoded, source, tmp_path):
    positive, _, results = encoded
    back = _reread(results.pdf, tmp_path, "pdf.dcm")
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1"
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert back.BurnedInAnnotation == "YES"
    pdf = back.EncapsulatedDocument[:back.EncapsulatedDocumentLength]
    assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF")
    name = f"report-{'positive' if positive else 'negative'}"
    (OUTPUT / f"{name}.pdf").write_bytes(pdf)
    subprocess.run([require_binary("pdftoppm"), "-r", "60", "-png", "-f", "1", "-l", "1", "-singlefile",
                    str(OUTPUT / f"{name}.pdf"), str(OUTPUT / f"{name}-page1")], check=True)
    assert (OUTPUT / f"{name}-page1.png").stat().st_size > 0


def test_render_pdf_matches_encapsulated_content(source):
    image, prediction = make_inputs(source, positive=True)
    pdf = render_pdf(source, image, prediction, review=True, similar_cases=SIMILAR)
    assert pdf.startswith(b"%PDF")


def test_dcmtk_reads_all_objects(encoded, tmp_path):
    positive, prediction, results = encoded
    sr = _save(results.sr, tmp_path / "sr.dcm")
    html = subprocess.run([require_binary("dsr2html"), str(sr)], capture_output=True, text=True)
    assert html.returncode == 0, html.stderr
    text = re.sub(r"<[^>]+>", "", html.stdout)
    assert "SmartNodule" in text
    # Concept names with values rounded to 0.1 and their unit, never "0.86967758012219 1".
    assert f"Probability = {prediction.probability * 100:.1f} %" in text
    assert f"Model uncertainty = {prediction.uncertainty * 100:.1f} %" in text
    assert not re.search(r"\b0\.\d{4,}", text)
    for name, ds in results.named().items():
        dump = subprocess.run([require_binary("dcmdump"), str(_save(ds, tmp_path / f"{name}.dcm"))],
                              capture_output=True, text=True)
        assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr


def test_dciodvfy(encoded, tmp_path):
    _, _, results = encoded
    for name, ds in results.named().items():
        check = subprocess.run([require_binary("dciodvfy"), str(_save(ds, tmp_path / f"{name}.dcm"))],
                               capture_output=True, text=True)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], (name, errors)


def _write_png(rgb: np.ndarray, path: Path) -> None:
    import cv2
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def test_header_only_source_without_orientation_or_imager_spacing(tmp_path):
    """A CR read without pixels, lacking Patient Orientation and Imager Pixel Spacing."""
    full = make_source()
    full.SOPClassUID = full.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR
    full.Modality = "CR"
    del full.PatientOrientation, full.ImagerPixelSpacing, full.PixelSpacing
    source = pydicom.dcmread(_save(full, tmp_path / "cr.dcm"), stop_before_pixels=True)
    image, prediction = make_inputs(source, positive=True)
    results = encode_results(source, image, prediction, review=False)
    assert results.heatmap.PatientOrientation == ""
    assert _circle_centre(hd.sr.srread(_save(results.sr, tmp_path / "sr.dcm"))) \
        == pytest.approx((LOCATION.col + 0.5, LOCATION.row + 0.5))
    assert results.gsps is not None and results.gsps.BodyPartExamined == results.heatmap.BodyPartExamined == "CHEST"


def _circle_centre(sr: pydicom.Dataset) -> tuple[float, float]:
    """(column, row) of the centre of the SR's nodule circle."""
    [group] = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    [circle] = [item for num in group[0].ContentSequence if num.ValueType == "NUM"
                for item in getattr(num, "ContentSequence", []) if item.ValueType == "SCOORD"]
    return tuple(circle.GraphicData[:2])
