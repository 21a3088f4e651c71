"""The PDF report read back with poppler (pdfinfo, pdftotext, pdftoppm): one page, the place in words, threshold, time zone."""
from __future__ import annotations

import dataclasses
import datetime
import re
import subprocess
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from inference.types import Location
from sr_writer.encode import SimilarCase, render_pdf
from sr_writer.heatmap import percent
from sr_writer.pdf_report import INTENDED_USE, TRAINING_DATA, finding_place, produced_at
from tests.conftest import require_binary
from tests.sr_writer.test_sr_writer_encode import OUTPUT, make_inputs, make_source

FIVE_SIMILAR = tuple(SimilarCase(f"2026-11-0{i}", 0.5 + i / 20, "present" if i % 2 else None, 0.9 - i / 50)
                     for i in range(1, 6))


def _text(pdf: bytes, name: str) -> str:
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.pdf"
    path.write_bytes(pdf)
    subprocess.run([require_binary("pdftoppm"), "-r", "70", "-png", "-singlefile", str(path),
                    str(OUTPUT / f"{name}-page")], check=True)
    info = subprocess.run([require_binary("pdfinfo"), str(path)], capture_output=True, text=True, check=True)
    assert re.search(r"^Pages:\s+1$", info.stdout, re.MULTILINE), info.stdout
    text = subprocess.run([require_binary("pdftotext"), str(path), "-"], capture_output=True,
                          text=True, check=True).stdout
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("positive", [True, False], ids=["positive", "negative"])
def test_one_page_with_place_threshold_time_zone_and_model_limits(positive):
    source = make_source()
    source.InstitutionName = "A long institution name that needs two lines in its cell, 64 ch"
    image, prediction = make_inputs(source, positive=positive)
    # LOCATION (row 100, column 170 of 256): the image's right half, so the patient's left in a PA view.
    prediction = dataclasses.replace(prediction, threshold=0.61, lung_rows=(20.0, 230.0))
    text = _text(render_pdf(source, image, prediction, review=True, similar_cases=FIVE_SIMILAR),
                 f"report-one-page-{'positive' if positive else 'negative'}")
    assert "Operating threshold 61% (present at or above)" in text
    assert re.search(r"Produced \d{4}-\d\d-\d\d \d\d:\d\d \S+ \(UTC[+-]\d\d:\d\d\)", text), text
    assert TRAINING_DATA.split(" (")[0] in text and INTENDED_USE in text
    assert "trained on synthetic images; not for diagnosis" in text
    assert "2026-11-05" in text  # the last of five similar cases still on the page
    if positive:
        assert "Location patient's left lung, middle zone" in text
        assert not re.search(r"\b(row|column)\b", text)  # no pixel rows and columns any more
    else:
        assert "Location none" in text


@pytest.mark.parametrize("orientation, col, side", [
    (("L", "F"), 40, "patient's right lung"),  # PA: the image's left is the patient's right
    (("L", "F"), 200, "patient's left lung"),
    (("R", "F"), 40, "patient's left lung"),  # AP / flipped
    (("A", "F"), 40, "side not determined (lateral view)"),
])
def test_side_follows_patient_orientation(orientation, col, side):
    place, notes = finding_place(Location(row=128, col=col, radius=5), (256, 256), orientation, (0.0, 255.0))
    assert place == f"{side}, middle zone" and notes == ()


def test_without_orientation_a_pa_view_is_assumed_and_said():
    place, notes = finding_place(Location(row=10, col=40, radius=5), (256, 256), None, None)
    assert place == "patient's right lung, upper zone"
    assert notes == ("side assumes a PA view (the source has no Patient Orientation)",
                     "zone in thirds of the image height (no lung field found)")


@pytest.mark.parametrize("row, zone", [(60, "upper"), (110, "middle"), (170, "lower"), (250, "lower")])
def test_zone_is_a_third_of_the_lung_field(row, zone):
    place, _ = finding_place(Location(row=row, col=40, radius=5), (256, 256), ("L", "F"), (40.0, 190.0))
    assert place.endswith(f"{zone} zone")
    upside_down, _ = finding_place(Location(row=row, col=40, radius=5), (256, 256), ("L", "H"), (40.0, 190.0))
    assert upside_down.endswith(f"{ {'upper': 'lower', 'middle': 'middle', 'lower': 'upper'}[zone]} zone")


@pytest.mark.parametrize("probability, text", [(0.998, ">99%"), (0.87, "87%"), (0.004, "<1%"), (0.0, "<1%")])
def test_percent_never_reads_as_certainty(probability, text):
    assert percent(probability) == text


def test_produced_at_names_the_zone_and_offset():
    winter = datetime.datetime(2026, 1, 15, 9, 30, tzinfo=ZoneInfo("Europe/Zurich"))
    assert produced_at(winter) == "2026-01-15 09:30 CET (UTC+01:00)"
    assert produced_at(winter.astimezone(datetime.timezone.utc)) == "2026-01-15 08:30 UTC (UTC+00:00)"


def test_detector_reports_the_lung_field_rows_the_zone_is_taken_from():
    """The shipped model's lung field on a phantom spans the phantom's own lung mask rows (within 5 %)."""
    from inference.training.phantoms import generate_phantom, phantom_dataset
    from inference.predictor import Detector

    detector = Detector.load(device="cpu", threads=1)
    phantom = generate_phantom(778001, 1024)
    prediction = detector.predict(detector.prepare(phantom_dataset(phantom)))
    truth = [int(r) for r in np.nonzero(phantom.lung_mask.any(axis=1))[0][[0, -1]]]
    assert prediction.lung_rows is not None
    assert prediction.lung_rows == pytest.approx(truth, abs=0.05 * 1024)
