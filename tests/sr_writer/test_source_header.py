"""`sr_writer.source_header.clean_header` on the messy-header corpus and on single rules: the outputs built from
the clean copy pass dciodvfy, the warnings name each repaired attribute and quote no value."""
from __future__ import annotations

import subprocess
import warnings

import pydicom
import pytest

from inference.preprocess import read_dataset
from sr_writer.encode import encode_results
from sr_writer.source_header import MAX_WARNINGS, UTF8, clean_header
from tests.conftest import require_binary
from tests.data.make_messy_corpus import JAPANESE_NAME, build_corpus, put_raw
from tests.sr_writer.test_sr_writer_encode import _save, make_inputs, make_source

CORPUS = {case.name: case for case in build_corpus()}


def dciodvfy_errors(path) -> list[str]:
    """dciodvfy's error lines, less General Series Laterality (Type 2C: it wants it for any body part,
    the standard only for paired ones; the heatmap's owner decides, see test_sr_writer_encode)."""
    check = subprocess.run([require_binary("/usr/bin/dciodvfy"), str(path)], capture_output=True, text=True)
    return [line for line in (check.stdout + check.stderr).splitlines()
            if line.startswith("Error") and "<Laterality>" not in line]


def raw_values(path) -> set[str]:
    """Every text value of the file as written, to look for in the warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    return {str(e.value) for e in ds.iterall() if e.VR in ("DA", "TM", "DT", "PN", "LO", "SH", "CS", "DS", "AS")
            and len(str(e.value)) >= 3}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_messy_case_is_cleaned_and_its_outputs_pass_dciodvfy(name, tmp_path):
    case = CORPUS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = read_dataset(case.path)
        header = clean_header(source)
        image, prediction = make_inputs(header.dataset, positive=True)
        results = encode_results(header.dataset, image, prediction, review=False)
    named = {warning.split(" ")[0] for warning in header.warnings}
    assert set(case.warned) <= named, header.warnings
    if not case.warned:
        assert header.warnings == (), header.warnings
    for warning in header.warnings:
        assert not [v for v in raw_values(case.path) if v in warning], f"a warning quotes a value: {warning}"
    for kind, dataset in zip(("sr", "heatmap", "pdf"), results.all()):
        assert dciodvfy_errors(_save(dataset, tmp_path / f"{kind}.dcm")) == [], kind


def test_source_is_not_changed():
    source = read_dataset(CORPUS["birth_date_dashes"].path)
    clean_header(source)
    assert "PatientBirthDate" in source and source.PatientBirthDate == "1957-03-14"
    assert clean_header(source).dataset.PatientBirthDate == "19570314"


@pytest.mark.parametrize("keyword, given, expected", [
    ("PatientBirthDate", "1957-3-4", "19570304"),
    ("PatientBirthDate", "1957.03.14", "19570314"),
    ("PatientBirthDate", "14/03/1957", ""),
    ("PatientBirthDate", "19570230", ""),
    ("StudyTime", "8:05", "0805"),
    ("StudyTime", "083015.5", "083015.5"),
    ("StudyTime", "240000", ""),
    ("AcquisitionDateTime", "2024-01-05 08:30:15.25+01:00", "20240105083015.25+0100"),
    ("AcquisitionDateTime", "20240105083015", "20240105083015"),
    ("AcquisitionDateTime", "2024-13-05T08:30", ""),
    ("PatientName", "A^B^C^D^E^F^G", "A^B^C^D^E F G"),
    ("PatientName", "X" * 70, "X" * 64),
    ("PatientSex", "female", "F"),
    ("PatientSex", "U", ""),
    ("BodyPartExamined", "chest-wall", ""),
    ("PatientWeight", "72.123456789012345678", "72.1234567890124"),  # rounded
    ("PatientWeight", "heavy", ""),
    ("PatientAge", "5m", "005M"),
    ("StudyDescription", "line\x01one", "lineone"),
    ("StudyID", "1234567890ABCDEFG", ""),
    ("StationName", "CHEST-ROOM-2-WEST", "CHEST-ROOM-2-WES"),
])
def test_rule(keyword, given, expected):
    source = make_source()
    put_raw(source, keyword, pydicom.datadict.dictionary_VR(keyword), given.encode())
    header = clean_header(source)
    assert str(header.dataset[keyword].value) == expected
    assert (given == expected) == (not header.warnings), header.warnings


def test_japanese_name_is_kept_and_written_as_utf8(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = clean_header(read_dataset(CORPUS["charset_iso2022_ir87"].path))
        image, prediction = make_inputs(header.dataset, positive=False)
        results = encode_results(header.dataset, image, prediction, review=False)
    for dataset in results.all():
        written = pydicom.dcmread(_save(dataset, tmp_path / "out.dcm"))
        assert written.SpecificCharacterSet == UTF8
        assert str(written.PatientName) == JAPANESE_NAME


def test_absent_character_set_with_utf8_bytes_is_read_as_utf8():
    header = clean_header(read_dataset(CORPUS["charset_absent_utf8"].path))
    assert str(header.dataset.PatientName) == "MÜLLER^JÜRGEN"
    assert header.dataset.SpecificCharacterSet == UTF8


def test_ascii_header_declares_no_character_set():
    header = clean_header(read_dataset(CORPUS["clean"].path))
    assert "SpecificCharacterSet" not in header.dataset


def test_warnings_are_bounded():
    source = make_source()
    items = []
    for _ in range(120):
        items.append(pydicom.Dataset())
        put_raw(items[-1], "ContentDate", "DA", b"1-2-3")
    source.ReferencedImageSequence = items
    warnings = clean_header(source).warnings
    assert len(warnings) == MAX_WARNINGS and warnings[-1] == "71 more warnings left out"
    assert warnings[0] == "ReferencedImageSequence[0].ContentDate (0008,0023): not a valid date, left empty"
