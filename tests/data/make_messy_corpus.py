"""The messy-header corpus: valid chest DX images whose patient, study and equipment attributes are what real
modalities and anonymisers send, one defect per case, each to be read, repaired or left out, never fatal.

`python -m tests.data.make_messy_corpus [FOLDER]` writes it (default `tests/data/messy/`);
`build_corpus(folder)` writes it and returns the cases. Every case must end with an SR,
a heatmap and a PDF (job SENT or ENCODED). `warned` names the attribute keywords the
job's header warnings must mention (empty: nothing to repair, such as a valid
character set or a private tag). Values that no DICOM writer would produce are
written as raw bytes, so they reach the node exactly as a faulty device sends them.
"""
from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pydicom.uid import generate_uid

from inference.training.phantoms import phantom_dataset
from tests.data.make_bad_corpus import _phantom

DEFAULT_FOLDER = Path(__file__).resolve().parent / "messy"
# The example of PS3.5 H.3.1: Yamada^Tarou in alphabetic, ideographic (kanji) and phonetic (hiragana) groups.
JAPANESE_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"
# Patient data of the corpus, to look for where it must never be (logs, console, database).
PATIENT_VALUES = ("MESSY^CASE", "MESSY01", "19570314", "1957-03-14", "WELBY^MARCUS", "ACC001", "Yamada", "山田",
                  "MÜLLER", "GARCÍA", "ŞAHIN", "NOËL", "DOE^JOHN")


@dataclass(frozen=True)
class MessyCase:
    """One corpus file: what is wrong with it and the keywords its header warnings must name."""

    name: str
    path: Path
    sop_instance_uid: str
    what: str
    warned: tuple[str, ...] = ()


def put_raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put `value` into `ds` byte for byte, as a device that ignores the VR's rules would."""
    tag = Tag(tag_for_keyword(keyword))
    value += b" " * (len(value) % 2)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def _base(name: str, round_: int) -> Dataset:
    """A valid small DX chest phantom with UIDs unique to (name, round)."""
    ds = phantom_dataset(_phantom(), patient_name="MESSY^CASE", patient_id="MESSY01", accession="ACC001")
    ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "19570314", "F", "WELBY^MARCUS"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["smartnodule-messy-study", name, str(round_)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["smartnodule-messy-series", name, str(round_)])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=["smartnodule-messy-sop", name, str(round_)])
    ds.preamble = bytes(128)
    return ds


def _absent(*keywords: str) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        for keyword in keywords:
            delattr(ds, keyword)
    return edit


def _raw_values(vr_values: dict[str, tuple[str, bytes]]) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        for keyword, (vr, value) in vr_values.items():
            put_raw(ds, keyword, vr, value)
    return edit


def _text(encoding: str, charset: str | None, **values: str) -> Callable[[Dataset], None]:
    """Text values encoded in `encoding` under Specific Character Set `charset` (None: the element left out)."""
    def edit(ds: Dataset) -> None:
        if charset is None:
            del ds.SpecificCharacterSet
        else:
            put_raw(ds, "SpecificCharacterSet", "CS", charset.encode())
        for keyword, value in values.items():
            vr = "PN" if keyword.endswith("Name") and keyword != "InstitutionName" else "LO"
            put_raw(ds, keyword, vr, value.encode(encoding))
    return edit


def _japanese(ds: Dataset) -> None:
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = JAPANESE_NAME
    ds.StudyDescription = "胸部 PA"


def _private_tags(ds: Dataset) -> None:
    block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    block.add_new(0x08, "CS", "IMAGE NUM 4")
    block.add_new(0x10, "OB", bytes(range(256)) * 4)
    other = ds.private_block(0x0019, "ACME DX 1.0", create=True)
    other.add_new(0x01, "LO", "acme tube 3")
    other.add_new(0x02, "UN", b"\x01\x02\x03\x04")
    put_raw(ds, "PatientComments", "LT", b"")  # a valid empty LT beside them


def _retired(ds: Dataset) -> None:
    ds.OtherPatientIDs = ["OLD0001", "OLD0002"]  # retired in 2019 (now Other Patient IDs Sequence)
    ds.add_new(0x00200030, "DS", ["0", "0", "0"])  # Image Position (retired)
    ds.add_new(0x00080040, "US", 0)  # Data Set Type (retired)
    ds.add_new(0x00081000, "AE", "NETWORK1")  # Network ID (retired)


def build_corpus(folder: Path | str = DEFAULT_FOLDER, *, round_: int = 0) -> list[MessyCase]:
    """Write every case into `folder`; `round_` varies the UIDs so the corpus can be sent again as new instances."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cases: list[MessyCase] = []

    def add(name: str, what: str, edit: Callable[[Dataset], None] | None, *warned: str) -> None:
        ds = _base(name, round_)
        if edit is not None:
            edit(ds)
        path = out / f"{name}.dcm"
        with warnings.catch_warnings():  # pydicom warns about the very values this corpus is made of
            warnings.simplefilter("ignore")
            ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)
        cases.append(MessyCase(name, path, str(ds.SOPInstanceUID), what, tuple(warned)))

    add("clean", "no defect (the control)", None)
    add("birth_date_absent", "Patient's Birth Date (Type 2) absent", _absent("PatientBirthDate"), "PatientBirthDate")
    add("birth_date_dashes", "Patient's Birth Date 1957-03-14",
        _raw_values({"PatientBirthDate": ("DA", b"1957-03-14")}), "PatientBirthDate")
    add("birth_date_junk", "Patient's Birth Date with trailing junk",
        _raw_values({"PatientBirthDate": ("DA", b"19570314xx")}), "PatientBirthDate")
    add("birth_date_impossible", "Patient's Birth Date 19571314 (month 13)",
        _raw_values({"PatientBirthDate": ("DA", b"19571314")}), "PatientBirthDate")
    add("study_date_slashes", "Study Date 2024/01/05", _raw_values({"StudyDate": ("DA", b"2024/01/05")}), "StudyDate")
    add("study_date_day_first", "Study Date 05.01.2024 (day first: ambiguous, left out)",
        _raw_values({"StudyDate": ("DA", b"05.01.2024")}), "StudyDate")
    add("study_time_colons", "Study Time 08:30:15", _raw_values({"StudyTime": ("TM", b"08:30:15")}), "StudyTime")
    add("study_time_invalid", "Study Time 256199 and a seven-digit fraction in Content Time",
        _raw_values({"StudyTime": ("TM", b"256199"), "ContentTime": ("TM", b"083015.1234567")}),
        "StudyTime", "ContentTime")
    add("datetime_iso", "Acquisition DateTime 2024-01-05T08:30:15",
        _raw_values({"AcquisitionDateTime": ("DT", b"2024-01-05T08:30:15")}), "AcquisitionDateTime")
    add("study_date_absent", "Study Date and Study Time (Type 2) absent", _absent("StudyDate", "StudyTime"),
        "StudyDate", "StudyTime")
    add("patient_id_absent", "Patient ID (Type 2) absent", _absent("PatientID"), "PatientID")
    add("accession_absent", "Accession Number (Type 2) absent", _absent("AccessionNumber"), "AccessionNumber")
    add("study_id_absent", "Study ID (Type 2) absent", _absent("StudyID"), "StudyID")
    add("identity_absent", "Patient's Name, Patient's Sex and Referring Physician's Name absent",
        _absent("PatientName", "PatientSex", "ReferringPhysicianName"),
        "PatientName", "PatientSex", "ReferringPhysicianName")
    add("pn_many_groups", "Patient's Name with four component groups",
        _raw_values({"PatientName": ("PN", b"DOE^JOHN=DOE^J=DOE^JON=EXTRA")}), "PatientName")
    add("pn_many_components", "Patient's Name with seven components",
        _raw_values({"PatientName": ("PN", b"DOE^JOHN^PAUL^DR^JR^III^X")}), "PatientName")
    add("pn_two_values", "Patient's Name with two values (VM 1)",
        _raw_values({"PatientName": ("PN", b"DOE^JOHN\\SMITH^ANNA")}), "PatientName")
    add("long_values", "Patient ID 80, Accession Number 20, Study Description 100, Institution Name 90 characters",
        _raw_values({"PatientID": ("LO", b"P" * 80), "AccessionNumber": ("SH", b"A" * 20),
                     "StudyDescription": ("LO", b"CHEST PA " * 11 + b"X"),
                     "InstitutionName": ("LO", b"GENERAL HOSPITAL " * 5 + b"SOUTH")}),
        "PatientID", "AccessionNumber", "StudyDescription", "InstitutionName")
    add("nul_padded", "Patient ID and Accession Number padded with NUL bytes (pydicom reads them without)",
        _raw_values({"PatientID": ("LO", b"MESSY01\0"), "AccessionNumber": ("SH", b"ACC001\0\0")}))
    add("ds_comma", "Patient's Weight 72,5 and Patient's Size 1,78 (comma decimals)",
        _raw_values({"PatientWeight": ("DS", b"72,5"), "PatientSize": ("DS", b"1,78")}),
        "PatientWeight", "PatientSize")
    add("age_without_unit", "Patient's Age 57 (no unit)", _raw_values({"PatientAge": ("AS", b"57")}), "PatientAge")
    add("lowercase_cs", "Body Part Examined chest, View Position pa, Patient's Sex m",
        _raw_values({"BodyPartExamined": ("CS", b"chest"), "ViewPosition": ("CS", b"pa"),
                     "PatientSex": ("CS", b"m")}), "BodyPartExamined", "ViewPosition", "PatientSex")
    add("sex_male", "Patient's Sex Male", _raw_values({"PatientSex": ("CS", b"Male")}), "PatientSex")
    add("charset_latin1", "ISO_IR 100 with a Latin-1 name", _text("latin-1", "ISO_IR 100", PatientName="MÜLLER^JÜRGEN"))
    add("charset_utf8", "ISO_IR 192 with a UTF-8 name",
        _text("utf-8", "ISO_IR 192", PatientName="ŞAHIN^ÇAĞLA", StudyDescription="Тórax ПА"))
    add("charset_iso2022_ir87", "\\ISO 2022 IR 87 with the Japanese name of PS3.5 H.3.1", _japanese)
    add("charset_absent_utf8", "no Specific Character Set, UTF-8 bytes in the name",
        _text("utf-8", None, PatientName="MÜLLER^JÜRGEN"), "SpecificCharacterSet")
    add("charset_absent_latin1", "no Specific Character Set, Latin-1 bytes in the name",
        _text("latin-1", None, PatientName="GARCÍA^JOSÉ"), "SpecificCharacterSet")
    add("charset_unknown", "Specific Character Set UTF-8 (not a defined term)",
        _text("utf-8", "UTF-8", PatientName="NOËL^ZOË"), "SpecificCharacterSet")
    add("private_tags", "private blocks of two creators (CS, OB, LO, UN)", _private_tags)
    add("retired_elements", "retired Other Patient IDs, Image Position, Data Set Type, Network ID", _retired)
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=DEFAULT_FOLDER)
    args = parser.parse_args(argv)
    for case in build_corpus(args.folder):
        print(f"{case.path}\t{case.path.stat().st_size}\t{','.join(case.warned) or '-'}\t{case.what}")


if __name__ == "__main__":
    main()
