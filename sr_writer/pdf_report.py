"""The human-readable report: a one-page A4 PDF (reportlab) and its Encapsulated PDF wrapper.

Owns what a clinician reads: patient and study header from the DICOM, the image
and the heatmap side by side (drawn by `sr_writer.heatmap.render_overlay`, with
the side markers), the finding in numbers and in plain language with its place
as side and lung zone, the operating threshold, the similar cases, the model's
identity, training data and intended use, and the time it was produced with its
time zone. The page is one frame that shrinks its content to fit, so the report
is always one page. `sr_writer.encode.render_pdf` validates its inputs and calls
`render_report_pdf`.

Similar cases are listed without thumbnails: they are other patients' images,
and this report is filed in this patient's study.
"""
from __future__ import annotations

import datetime
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import Image, KeepInFrame, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from inference.types import Location, PreparedImage, Prediction
from sr_writer.heatmap import DISCLAIMER, percent, render_overlay
from sr_writer.structured_report import MANUFACTURER
from sr_writer.uids import OutputUids

if TYPE_CHECKING:
    from sr_writer.encode import SimilarCase

PDF_SERIES_NUMBER = 9903
PDF_SERIES_DESCRIPTION = "AI nodule report (not for primary diagnosis)"
DOCUMENT_TITLE = "AI lung nodule report (not for primary diagnosis)"
DIAGNOSTIC_IMAGING_REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging study")
TRAINING_DATA = "synthetic chest phantoms only (no real radiographs)"
INTENDED_USE = "research; not for diagnosis"
ZONES = ("upper", "middle", "lower")
_PANEL_PIXELS = 600
_PANEL_HEIGHT = 72 * mm
_MARGIN = 15 * mm
_FOUR_COLUMNS = (30 * mm, 60 * mm, 30 * mm, 60 * mm)


def render_report_pdf(source: pydicom.Dataset, image: PreparedImage, prediction: Prediction, *,
               review: bool, similar_cases: Sequence[SimilarCase] = (),
               institution_name: str | None = None,
               now: datetime.datetime | None = None) -> bytes:
    """The report as PDF bytes, one page; inputs are validated by `sr_writer.encode`.

    `now` (default: the current local time with its zone) is the time printed as produced.
    """
    styles = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=styles["BodyText"], fontSize=9, leading=11)
    heading = ParagraphStyle("heading", parent=styles["Heading3"], spaceBefore=5, spaceAfter=2)

    def para(text: str) -> Paragraph:
        return Paragraph(escape(text), body)

    model = prediction.model
    story: list = [
        Paragraph("AI lung nodule report", styles["Title"]),
        Paragraph(f"<b>{escape(DISCLAIMER)}</b>", ParagraphStyle("warning", parent=body, fontSize=10,
                                                                  textColor=colors.darkred, alignment=1)),
        Spacer(1, 2 * mm),
        _table(_pairs(_header_rows(source, institution_name)), body, col_widths=_FOUR_COLUMNS),
        Spacer(1, 2 * mm),
        _images(source, image, prediction, body),
        Paragraph("Result", heading),
        _table(_pairs(_result_rows(source, image, prediction, review)), body, col_widths=_FOUR_COLUMNS),
        Paragraph("What this result means", heading),
        para(_meaning(prediction, review)),
        para("This result comes from a computer program, not from a doctor. It can miss nodules "
             "and it can mark normal structures (vessels, nipples, bones, devices) as nodules. "
             "A radiologist reads the image itself and decides. The heatmap contours show where "
             "the program looked, not the outline of a lesion."),
    ]
    if similar_cases:
        story += [
            Paragraph("Similar past cases", heading),
            _table([("Received", "AI probability", "Expert verdict", "Similarity")]
                   + [(_date(case.received_on), percent(case.probability),
                       case.verdict or "not reviewed", f"{case.similarity:.2f}")
                      for case in similar_cases],
                   body, col_widths=(44 * mm, 40 * mm, 56 * mm, 40 * mm), header=True),
        ]
    story += [
        Paragraph("Model", heading),
        _table(_pairs([("Name", model.name), ("Version", model.version),
                       ("Weights SHA-256", model.weights_sha256[:16] + "..."),
                       ("Produced", produced_at(now)),
                       ("Training data", TRAINING_DATA), ("Intended use", INTENDED_USE)]),
               body, col_widths=_FOUR_COLUMNS),
        Spacer(1, 2 * mm),
        para(f"{MANUFACTURER} - {DISCLAIMER}"),
    ]
    width, height = A4
    buffer = io.BytesIO()
    SimpleDocTemplate(buffer, pagesize=A4, title=DOCUMENT_TITLE, author=MANUFACTURER,
                      leftMargin=_MARGIN, rightMargin=_MARGIN, topMargin=_MARGIN, bottomMargin=_MARGIN
                      ).build([KeepInFrame(width - 2 * _MARGIN - 12, height - 2 * _MARGIN - 12, story,
                                           mode="shrink")])
    return buffer.getvalue()


def produced_at(now: datetime.datetime | None = None) -> str:
    """'YYYY-MM-DD HH:MM ZONE (UTC+hh:mm)' of `now` (default, or a naive `now`: in the local zone)."""
    now = now if now is not None and now.tzinfo is not None else (now or datetime.datetime.now()).astimezone()
    offset = now.strftime("%z")
    return f"{now:%Y-%m-%d %H:%M} {now.tzname()} (UTC{offset[:3]}:{offset[3:]})"


def finding_place(location: Location, shape: tuple[int, int], patient_orientation: Sequence[str] | None,
                  lung_rows: tuple[float, float] | None) -> tuple[str, tuple[str, ...]]:
    """The finding's side and lung zone in words, and notes on what they assume.

    Side: which half of the image the centre lies in, turned into the patient's
    side by Patient Orientation (its first value is the patient direction of the
    image's left-to-right); without it a PA view is assumed (the image's left is
    the patient's right), and the note says so. Zone: the upper, middle or lower
    third of the lung field's height (`lung_rows`), or of the image's height when
    the lung field is not known.
    """
    rows, cols = shape
    notes: list[str] = []
    rightwards = str(patient_orientation[0]).upper() if patient_orientation and len(patient_orientation) == 2 else ""
    downwards = str(patient_orientation[1]).upper() if patient_orientation and len(patient_orientation) == 2 else ""
    if "L" in rightwards or "R" in rightwards:
        image_left_is = "right" if "L" in rightwards else "left"
    elif rightwards:
        image_left_is = None  # a lateral view: left-to-right runs front to back
    else:
        image_left_is = "right"
        notes.append("side assumes a PA view (the source has no Patient Orientation)")
    on_image_left = location.col < (cols - 1) / 2
    if image_left_is is None:
        side = "side not determined (lateral view)"
    else:
        side = image_left_is if on_image_left else {"right": "left", "left": "right"}[image_left_is]
        side = f"patient's {side} lung"
    top, bottom = lung_rows if lung_rows is not None else (0.0, rows - 1.0)
    if lung_rows is None:
        notes.append("zone in thirds of the image height (no lung field found)")
    fraction = min(max((location.row - top) / max(bottom - top, 1.0), 0.0), 1.0)
    if "H" in downwards:  # the image's top is the patient's feet
        fraction = 1.0 - fraction
    zone = ZONES[min(int(fraction * 3), 2)]
    return f"{side}, {zone} zone", tuple(notes)


def build_pdf_document(source: pydicom.Dataset, pdf: bytes, *, uids: OutputUids,
                       prediction: Prediction, institution_name: str | None) -> hd.SOPClass:
    """Encapsulated PDF Storage instance of `pdf` in the source's patient and study."""
    now = datetime.datetime.now()
    document = hd.SOPClass(
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=uids.series_instance_uid, series_number=PDF_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid, sop_class_uid=EncapsulatedPDFStorage,
        instance_number=1, modality="DOC", manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=PDF_SERIES_DESCRIPTION,
        manufacturer_model_name=prediction.model.name,
        software_versions=prediction.model.version,
        institution_name=institution_name,
        content_date=now.date(), content_time=now.time(),
        specific_character_set=source.get("SpecificCharacterSet"),
    )
    document.copy_patient_and_study_information(source)
    document.ConversionType = "SYN"
    document.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    document.BurnedInAnnotation = "YES"
    document.DocumentTitle = DOCUMENT_TITLE
    document.ConceptNameCodeSequence = [DIAGNOSTIC_IMAGING_REPORT]
    document.MIMETypeOfEncapsulatedDocument = "application/pdf"
    referenced = pydicom.Dataset()
    referenced.ReferencedSOPClassUID = source.SOPClassUID
    referenced.ReferencedSOPInstanceUID = source.SOPInstanceUID
    document.SourceInstanceSequence = [referenced]
    # OB values have even length: pad with a NUL and state the true length.
    document.EncapsulatedDocument = pdf + b"\0" * (len(pdf) % 2)
    document.EncapsulatedDocumentLength = len(pdf)
    return document


def _header_rows(source: pydicom.Dataset, institution_name: str | None) -> list[tuple[str, str]]:
    name = source.get("PatientName")
    return [
        ("Patient", name.family_comma_given() if name else ""),
        ("Patient ID", str(source.get("PatientID", ""))),
        ("Birth date", _date(source.get("PatientBirthDate", ""))),
        ("Sex", str(source.get("PatientSex", ""))),
        ("Study date", _date(source.get("StudyDate", ""))),
        ("Accession", str(source.get("AccessionNumber", ""))),
        ("Institution", str(source.get("InstitutionName") or institution_name or "")),
    ]


def _result_rows(source: pydicom.Dataset, image: PreparedImage, prediction: Prediction,
                 review: bool) -> list[tuple[str, str]]:
    place, size = "none", "-"
    if prediction.location is not None:
        loc = prediction.location
        place, notes = finding_place(loc, image.display.shape, source.get("PatientOrientation"),
                                     prediction.lung_rows)
        if notes:
            place += f" ({'; '.join(notes)})"
        if image.pixel_spacing_mm is not None:
            size = f"about {2 * loc.radius * image.pixel_spacing_mm[0]:.0f} mm across"
    threshold = "not stated" if prediction.threshold is None else f"{prediction.threshold:.0%}"
    return [
        ("Nodule", "PRESENT" if prediction.positive else "absent"),
        ("Probability", percent(prediction.probability)),
        ("Operating threshold", f"{threshold} (present at or above)"),
        ("Uncertainty", f"{prediction.uncertainty:.2f}"),
        ("Location", place),
        ("Size", size),
        ("Expert review", "sent for expert review" if review else "not sent for review"),
    ]


def _meaning(prediction: Prediction, review: bool) -> str:
    if prediction.positive:
        text = (f"The program found a spot that looks like a lung nodule, with an estimated "
                f"probability of {percent(prediction.probability)}. It is circled in the heatmap.")
    else:
        text = (f"The program found no lung nodule; its estimated probability that one is "
                f"present is {percent(prediction.probability)}.")
    if review:
        text += " The program was unsure about this image, so it was sent to an expert for review."
    return text


def _images(source: pydicom.Dataset, image: PreparedImage, prediction: Prediction,
            style: ParagraphStyle) -> Table:
    long_side = min(_PANEL_PIXELS, max(image.display.shape))
    orientation = source.get("PatientOrientation")
    gray = render_overlay(image.display, np.zeros((1, 1), np.float32), None, long_side=long_side,
                          patient_orientation=orientation)
    overlay = render_overlay(image.display, prediction.heatmap, prediction.location,
                             long_side=long_side, patient_orientation=orientation)
    table = Table([[_jpeg(gray), _jpeg(overlay)],
                   [Paragraph("Image", style),
                    Paragraph("AI heatmap: Grad-CAM contours (yellow low, red high), finding circled in green",
                              style)]], colWidths=(88 * mm, 88 * mm))
    table.setStyle(TableStyle([("ALIGN", (0, 0), (-1, -1), "CENTER"),
                               ("VALIGN", (0, 0), (-1, -1), "MIDDLE")]))
    return table


def _jpeg(rgb: np.ndarray) -> Image:
    """A report panel as JPEG: reportlab embeds JPEG data as it is, where PNG would be decoded and re-encoded."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise RuntimeError("JPEG encoding of a report image failed")
    rows, cols = rgb.shape[:2]
    height = min(_PANEL_HEIGHT, 85 * mm * rows / cols)
    return Image(io.BytesIO(encoded.tobytes()), width=height * cols / rows, height=height)


def _pairs(rows: list[tuple[str, str]]) -> list[tuple[str, str, str, str]]:
    """Label-value pairs two to a row, to keep the page short."""
    padded = rows + [("", "")] * (len(rows) % 2)
    return [(*padded[i], *padded[i + 1]) for i in range(0, len(padded), 2)]


def _table(rows: Sequence[tuple[str, ...]], style: ParagraphStyle, *, col_widths: tuple[float, ...],
           header: bool = False) -> Table:
    table = Table([[Paragraph(escape(cell), style) for cell in row] for row in rows],
                  colWidths=col_widths)
    commands: list[tuple[Any, ...]] = [("GRID", (0, 0), (-1, -1), 0.3, colors.grey),
                                       ("VALIGN", (0, 0), (-1, -1), "TOP"),
                                       ("TOPPADDING", (0, 0), (-1, -1), 1), ("BOTTOMPADDING", (0, 0), (-1, -1), 2)]
    if header:
        commands.append(("BACKGROUND", (0, 0), (-1, 0), colors.lightgrey))
    else:
        commands += [("BACKGROUND", (0, 0), (0, -1), colors.whitesmoke),
                     ("BACKGROUND", (2, 0), (2, -1), colors.whitesmoke)]
    table.setStyle(TableStyle(commands))
    return table


def _date(value: str) -> str:
    """DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as given."""
    value = str(value)
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value
