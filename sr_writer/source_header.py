"""Tolerant reading of a source image's header for the result objects: a clean copy, and warnings that name tags.

Owns what the SR, heatmap and PDF may copy from a source image (patient, study,
equipment and every other text attribute at any depth): real modalities send
invalid dates, missing Type 2 attributes, odd character sets, and highdicom and
dciodvfy refuse them. `clean_header(source)` returns a copy in which every text
value is valid for its VR, plus one warning per repair that names the keyword,
the tag and the problem, never the value (warnings go to the job row and the
audit log; at most MAX_WARNINGS). The source itself is never changed, and pixels, private elements,
UIDs and binary values are passed on as they are.

Rules, by VR (a value that no rule repairs is left empty: zero length is valid
for Type 2 and 3 attributes, and keeps the positions of a multi-valued one):
- absent Patient's Name, Patient ID, Birth Date, Sex, Study Date, Study Time,
  Referring Physician's Name, Study ID, Accession Number (Type 2 in the IODs we
  write): added empty;
- more values than the data dictionary's VM "1" allows: the first is kept;
- DA: `YYYY-MM-DD`, `YYYY/MM/DD`, `YYYY.MM.DD` become `YYYYMMDD`; eight digits
  followed by junk keep the eight digits; day-first and impossible dates are left out;
- TM: colons removed; a fraction of more than six digits is cut to six; hours
  over 23, minutes over 59, seconds over 60 are left out;
- DT: ISO 8601 separators (`-`, `:`, `T`, space) removed, then checked like DA and TM;
- PN: more than three component groups keep the first three; more than five
  components join the extra ones to the fifth (suffix) with spaces; a group is
  cut to 64 characters;
- CS: upper-cased; Patient's Sex `MALE`, `FEMALE`, `OTHER` become `M`, `F`, `O`
  and any other value is left out; characters other than A-Z, 0-9, space and `_`,
  or more than 16 characters, leave the value out;
- DS: a comma decimal becomes a point; a number of more than 16 characters is
  written again in 16; anything that is not a finite number is left out;
- IS: anything but an integer in the 32-bit range is left out;
- AS: a bare number of 1-3 digits is taken as years (`57` -> `057Y`); lower-case units upper-cased;
- AE, LO, SH, UC, PN, CS: control characters removed (LT, ST, UT keep CR, LF,
  FF and TAB); too long: identifiers (keywords ending in ID, IDs or Number) are
  left out, since a cut identifier names someone else; other text is cut to the VR's length;
- Specific Character Set: values are read with the source's character set, any
  defined term pydicom decodes (ISO 2022 IR 87 and the other code extensions
  included); with no Specific Character Set, or a term DICOM does not define,
  non-ASCII text is read as UTF-8 when its bytes are valid UTF-8, else as ISO_IR 100.
  The copy declares ISO_IR 192 (UTF-8) when any text is non-ASCII, and no
  Specific Character Set (the default repertoire) otherwise.
"""
from __future__ import annotations

import calendar
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import pydicom
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.datadict import dictionary_VM, keyword_for_tag
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName, format_number_as_ds

UTF8 = "ISO_IR 192"
MAX_WARNINGS = 50  # a header with thousands of bad elements still gives a short job row and audit line
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DS": 16, "IS": 12, "LO": 64, "LT": 10240, "PN": 64, "SH": 16,
              "ST": 1024}
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"})
_LONG_TEXT = frozenset({"LT", "ST", "UT"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_LONG_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")
_SEX = {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F", "OTHER": "O"}
_CS = re.compile(r"[A-Z0-9 _]*")
_IDENTIFIER = re.compile(r"(ID|IDs|Number)$")


@dataclass(frozen=True)
class SourceHeader:
    """The cleaned copy of a source dataset and the warnings about what was repaired or left out."""

    dataset: pydicom.Dataset
    warnings: tuple[str, ...]


def clean_header(source: pydicom.Dataset) -> SourceHeader:
    """A copy of `source` whose text values are all valid for their VR (rules in the module docstring)."""
    warnings: list[str] = []
    clean = pydicom.Dataset()
    if hasattr(source, "file_meta"):
        clean.file_meta = source.file_meta
    clean.preamble = getattr(source, "preamble", None)
    recode = _recode_for(source, warnings)
    _copy_items(source, clean, "", recode, warnings)
    for keyword in TYPE_2:
        if keyword not in clean:
            clean.add_new(keyword, pydicom.datadict.dictionary_VR(keyword), "")
            warnings.append(_where("", clean[keyword].tag) + ": absent, written empty")
    if "SpecificCharacterSet" in clean:
        del clean.SpecificCharacterSet
    if any(not _text(e.value).isascii() for e in clean.iterall() if e.VR in TEXT_VRS and e.value):
        clean.SpecificCharacterSet = UTF8
    if len(warnings) > MAX_WARNINGS:
        warnings[MAX_WARNINGS - 1:] = [f"{len(warnings) - MAX_WARNINGS + 1} more warnings left out"]
    return SourceHeader(clean, tuple(warnings))


def _recode_for(source: pydicom.Dataset, warnings: list[str]) -> Callable[[str], str]:
    """How to correct text pydicom decoded as ISO_IR 100 because the character set was absent or undefined."""
    declared = source.get("SpecificCharacterSet")
    terms = [declared] if isinstance(declared, str) else list(declared or [])
    undefined = [term for term in terms if term and term.strip() not in python_encoding]
    non_ascii = [e for e in source.iterall() if e.VR in TEXT_VRS and e.value and not _text(e.value).isascii()]
    if declared is not None and not undefined or not non_ascii:
        if undefined:
            warnings.append(_where("", 0x00080005) + ": not a defined term, ignored")
        return lambda text: text
    try:
        for element in non_ascii:
            _text(element.value).encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        if declared is None:
            warnings.append(_where("", 0x00080005) + ": absent with non-ASCII text, read as ISO_IR 100")
            return lambda text: text
        warnings.append(_where("", 0x00080005) + ": not a defined term, text kept as decoded")
        return lambda text: text
    problem = "absent" if declared is None else "not a defined term"
    warnings.append(_where("", 0x00080005) + f": {problem} with non-ASCII text, read as UTF-8")
    return lambda text: text.encode("latin-1").decode("utf-8") if not text.isascii() else text


def _copy_items(source: pydicom.Dataset, target: pydicom.Dataset, path: str, recode: Callable[[str], str],
                warnings: list[str]) -> None:
    for element in source:
        if element.tag == 0x00080005 or element.tag.is_private or element.VR not in TEXT_VRS | {"SQ"}:
            target.add(element)
        elif element.VR == "SQ":
            items = []
            for index, item in enumerate(element.value):
                copied = pydicom.Dataset()
                _copy_items(item, copied, f"{path}{_name(element.tag)}[{index}].", recode, warnings)
                items.append(copied)
            target.add(DataElement(element.tag, "SQ", items))
        else:
            target.add(_clean_element(element, path, recode, warnings))


def _clean_element(element: DataElement, path: str, recode: Callable[[str], str],
                   warnings: list[str]) -> DataElement:
    where = _where(path, element.tag)
    raw = element.value
    values = [_text(v) for v in raw] if isinstance(raw, (list, MultiValue)) else \
        ([] if raw is None or raw == "" else [_text(raw)])
    values = [recode(v) for v in values]
    if len(values) > 1 and _single_valued(element.tag):
        warnings.append(f"{where}: {len(values)} values where one is allowed, first kept")
        values = values[:1]
    problems: list[str] = []
    cleaned = [_clean_value(element.VR, element.tag, v, problems) for v in values]
    for problem in dict.fromkeys(problems):
        warnings.append(f"{where}: {problem}")
    kept: list[str] | list[PersonName] = [PersonName(v) for v in cleaned] if element.VR == "PN" else cleaned
    value: object = kept[0] if len(kept) == 1 else (kept or "")
    return DataElement(element.tag, element.VR, value)


def _clean_value(vr: str, tag: int, value: str, problems: list[str]) -> str:
    """`value` valid for `vr`, or "" when no rule repairs it; each repair appends its problem."""
    control = _CONTROL_LONG_TEXT if vr in _LONG_TEXT else _CONTROL
    if control.search(value):
        value = control.sub("", value)
        problems.append("control characters removed")
    stripped = value.strip(" ")
    fixer = _FIXERS.get(vr)
    if fixer is not None:
        fixed, problem = fixer(stripped, tag)
        if problem:
            problems.append(problem)
        return fixed
    limit = MAX_LENGTH.get(vr)
    if limit is not None and len(value) > limit:
        if _IDENTIFIER.search(keyword_for_tag(tag) or ""):
            problems.append(f"identifier longer than {limit} characters, left empty")
            return ""
        problems.append(f"longer than {limit} characters, cut")
        return value[:limit].rstrip(" ")
    return value


def _date(value: str, _tag: int) -> tuple[str, str | None]:
    if not value:
        return "", None
    if re.fullmatch(r"\d{8}", value):
        return (value, None) if _valid_date(value) else ("", "not a calendar date, left empty")
    found = re.fullmatch(r"(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})", value) or \
        re.fullmatch(r"(\d{4})(\d{2})(\d{2})\D.*", value)
    if found:
        repaired = f"{found[1]}{int(found[2]):02d}{int(found[3]):02d}"
        if _valid_date(repaired):
            return repaired, "not YYYYMMDD, repaired"
    return "", "not a valid date, left empty"


def _valid_date(digits: str) -> bool:
    year, month, day = int(digits[:4]), int(digits[4:6]), int(digits[6:8])
    return 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year or 1, month)[1]


_TM = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d+))?)?)?")


def _time(value: str, _tag: int) -> tuple[str, str | None]:
    if not value:
        return "", None
    problem = None
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?", value):
        hours, _, rest = value.partition(":")
        value, problem = f"{int(hours):02d}{rest.replace(':', '')}", "not HHMMSS, repaired"
    found = _TM.fullmatch(value)
    if not found or int(found[1]) > 23 or int(found[2] or 0) > 59 or int(found[3] or 0) > 60:
        return "", "not a valid time, left empty"
    if found[4] and len(found[4]) > 6:
        value, problem = value[:value.index(".") + 7], "fraction longer than six digits, cut"
    return value, problem


_DT = re.compile(r"(\d{4}(?:\d{2}(?:\d{2})?)?)(\d{2}(?:\d{2}(?:\d{2}(?:\.\d+)?)?)?)?([+-]\d{4})?")


def _datetime(value: str, tag: int) -> tuple[str, str | None]:
    if not value:
        return "", None
    problem = None
    iso = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?",
                       value)
    if iso:
        zone = {None: "", "Z": "+0000"}.get(iso[8], (iso[8] or "").replace(":", ""))
        value = "".join(part or "" for part in iso.groups()[:7]) + zone
        problem = "not YYYYMMDDHHMMSS, repaired"
    found = _DT.fullmatch(value)
    if not found:
        return "", "not a valid date-time, left empty"
    date = found[1]
    if len(date) == 8 and not _valid_date(date) or len(date) == 6 and not 1 <= int(date[4:]) <= 12:
        return "", "not a valid date-time, left empty"
    if found[2]:
        time, time_problem = _time(found[2], tag)
        if not time:
            return "", "not a valid date-time, left empty"
        if time != found[2]:
            value, problem = date + time + (found[3] or ""), time_problem
    return value, problem


def _person_name(value: str, _tag: int) -> tuple[str, str | None]:
    problem = None
    groups = value.split("=")
    if len(groups) > 3:
        groups, problem = groups[:3], "more than three component groups, first three kept"
    cleaned = []
    for group in groups:
        components = group.split("^")
        if len(components) > 5:
            components = components[:4] + [" ".join(c for c in components[4:] if c)]
            problem = problem or "more than five components, extra ones joined to the suffix"
        group = "^".join(c.strip(" ") for c in components).rstrip("^")
        if len(group) > MAX_LENGTH["PN"]:
            group, problem = group[:MAX_LENGTH["PN"]], problem or "component group longer than 64 characters, cut"
        cleaned.append(group)
    return "=".join(cleaned).rstrip("="), problem


def _code_string(value: str, tag: int) -> tuple[str, str | None]:
    upper = value.upper()
    problem = "lower case, upper-cased" if upper != value else None
    if tag == 0x00100040 and upper:  # Patient's Sex
        sex = _SEX.get(upper)
        if sex is None:
            return "", "not M, F or O, left empty"
        return sex, problem if sex == upper else "not M, F or O, mapped"
    if len(upper) > MAX_LENGTH["CS"] or not _CS.fullmatch(upper):
        return "", "not a valid code string, left empty"
    return upper, problem


def _decimal(value: str, _tag: int) -> tuple[str, str | None]:
    if not value:
        return "", None
    problem = None
    if "," in value and "." not in value:
        value, problem = value.replace(",", "."), "comma decimal, repaired"
    try:
        number = float(value)
    except ValueError:
        return "", "not a decimal number, left empty"
    if not math.isfinite(number):
        return "", "not a finite number, left empty"
    if len(value) > MAX_LENGTH["DS"]:
        value, problem = format_number_as_ds(number), "longer than 16 characters, written again"
    return value, problem


def _integer(value: str, _tag: int) -> tuple[str, str | None]:
    if not value:
        return "", None
    if re.fullmatch(r"[+-]?\d{1,11}", value) and -2**31 <= int(value) < 2**31:
        return value, None
    return "", "not an integer, left empty"


def _age(value: str, _tag: int) -> tuple[str, str | None]:
    if not value or re.fullmatch(r"\d{3}[DWMY]", value):
        return value, None
    found = re.fullmatch(r"(\d{1,3})\s*([DWMYdwmy]?)", value)
    if not found:
        return "", "not an age, left empty"
    unit = found[2].upper() or "Y"
    return f"{int(found[1]):03d}{unit}", "not nnnD/W/M/Y, repaired" + ("" if found[2] else " as years")


_FIXERS: dict[str, Callable[[str, int], tuple[str, str | None]]] = {
    "DA": _date, "TM": _time, "DT": _datetime, "PN": _person_name, "CS": _code_string,
    "DS": _decimal, "IS": _integer, "AS": _age,
}


def _single_valued(tag: int) -> bool:
    try:
        return dictionary_VM(tag) == "1"
    except KeyError:
        return False


def _text(value: object) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _where(path: str, tag: int) -> str:
    """`Keyword (gggg,eeee)`, prefixed by the sequence path of a nested element."""
    return f"{path}{_name(tag)} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
