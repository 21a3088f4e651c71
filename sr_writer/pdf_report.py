"""The human-readable report: an A4 PDF (reportlab) and its Encapsulated PDF wrapper.

Owns what a clinician reads: patient and study header from the DICOM, the image
and the heatmap side by side, the finding in numbers and in plain language, the
similar cases, the model identity and the limits of the result.
`sr_writer.encode.render_pdf` validates its inputs and calls `render_report_pdf`.
"""
from __future__ import annotations

import datetime
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import (Image, KeepTogether, Paragraph, SimpleDocTemplate, Spacer, Table,
                                TableStyle)

from inference.types import PreparedImage, Prediction
from sr_writer.heatmap import DISCLAIMER, render_overlay
from sr_writer.structured_report import MANUFACTURER
from sr_writer.uids import OutputUids

if TYPE_CHECKING:
    from sr_writer.encode import SimilarCase

PDF_SERIES_NUMBER = 9903
PDF_SERIES_DESCRIPTION = "AI nodule report (not for primary diagnosis)"
DOCUMENT_TITLE = "AI lung nodule report (not for primary diagnosis)"
DIAGNOSTIC_IMAGING_REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic imaging study")
_PANEL_PIXELS = 700
_PANEL_WIDTH = 80 * mm


def render_report_pdf(source: pydicom.Dataset, image: PreparedImage, prediction: Prediction, *,
               review: bool, similar_cases: Sequence[SimilarCase] = (),
               institution_name: str | None = None) -> bytes:
    """The report as PDF bytes; inputs are validated by `sr_writer.encode`."""
    styles = getSampleStyleSheet()
    body, small = styles["BodyText"], styles["Italic"]

    def para(text: str, style=body) -> Paragraph:
        return Paragraph(escape(text), style)

    model = prediction.model
    story: list = [
        Paragraph("AI lung nodule report", styles["Title"]),
        Paragraph(f"<b>{escape(DISCLAIMER)}</b>", styles["Heading4"]),
        _table(_header_rows(source, institution_name), col_widths=(40 * mm, 130 * mm)),
        Spacer(1, 4 * mm),
        _images(image, prediction),
        Paragraph("Result", styles["Heading2"]),
        _table(_result_rows(image, prediction, review), col_widths=(40 * mm, 130 * mm)),
    ]
    if similar_cases:
        story += [
            Paragraph("Similar past cases", styles["Heading2"]),
            _table([("Study date", "AI probability", "Expert verdict", "Similarity")]
                   + [(_date(case.study_date), f"{case.probability:.2f}",
                       case.verdict or "not reviewed", f"{case.similarity:.2f}")
                      for case in similar_cases],
                   col_widths=(40 * mm, 40 * mm, 50 * mm, 40 * mm), header=True),
        ]
    story += [
        Paragraph("What this result means", styles["Heading2"]),
        para(_meaning(prediction, review)),
        para("This result comes from a computer program, not from a doctor. It can miss nodules "
             "and it can mark normal structures (vessels, nipples, bones, devices) as nodules. "
             "It is not for primary diagnosis: a radiologist reads the image itself and decides. "
             "The heatmap shows where the program looked, not the outline of a lesion."),
        KeepTogether([
            Paragraph("Model", styles["Heading2"]),
            _table([("Name", model.name), ("Version", model.version),
                    ("Weights SHA-256", model.weights_sha256[:16] + "..."),
                    ("Produced", datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))],
                   col_widths=(40 * mm, 130 * mm)),
            Spacer(1, 3 * mm),
            para(f"{MANUFACTURER} - {DISCLAIMER}", small),
        ]),
    ]
    buffer = io.BytesIO()
    SimpleDocTemplate(buffer, pagesize=A4, title=DOCUMENT_TITLE, author=MANUFACTURER,
                      leftMargin=18 * mm, rightMargin=18 * mm,
                      topMargin=15 * mm, bottomMargin=15 * mm).build(story)
    return buffer.getvalue()


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


def _result_rows(image: PreparedImage, prediction: Prediction,
                 review: bool) -> list[tuple[str, str]]:
    location = "none"
    if prediction.location is not None:
        loc = prediction.location
        location = f"row {loc.row:.0f}, column {loc.col:.0f} (radius {loc.radius:.0f} pixels"
        if image.pixel_spacing_mm is not None:
            location += f", about {2 * loc.radius * image.pixel_spacing_mm[0]:.0f} mm across"
        location += ")"
    return [
        ("Nodule", "PRESENT" if prediction.positive else "absent"),
        ("Probability", f"{prediction.probability:.2f} ({prediction.probability:.0%})"),
        ("Uncertainty", f"{prediction.uncertainty:.2f}"),
        ("Location", location),
        ("Expert review", "sent for expert review" if review else "not sent for review"),
    ]


def _meaning(prediction: Prediction, review: bool) -> str:
    if prediction.positive:
        text = (f"The program found a spot that looks like a lung nodule, with an estimated "
                f"probability of {prediction.probability:.0%}. It is circled in the heatmap.")
    else:
        text = (f"The program found no lung nodule; its estimated probability that one is "
                f"present is {prediction.probability:.0%}.")
    if review:
        text += " The program was unsure about this image, so it was sent to an expert for review."
    return text


def _images(image: PreparedImage, prediction: Prediction) -> Table:
    long_side = min(_PANEL_PIXELS, max(image.display.shape))
    gray = render_overlay(image.display, np.zeros_like(prediction.heatmap), None,
                          long_side=long_side)
    overlay = render_overlay(image.display, prediction.heatmap, prediction.location,
                             long_side=long_side)
    table = Table([[_jpeg(gray), _jpeg(overlay)], ["Image", "AI heatmap"]])
    table.setStyle(TableStyle([("ALIGN", (0, 0), (-1, -1), "CENTER"),
                               ("VALIGN", (0, 0), (-1, -1), "MIDDLE")]))
    return table


def _jpeg(rgb: np.ndarray) -> Image:
    """A report panel as JPEG: reportlab embeds JPEG data as it is, where PNG would be decoded and re-encoded."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise RuntimeError("JPEG encoding of a report image failed")
    rows, cols = rgb.shape[:2]
    width = _PANEL_WIDTH if cols >= rows else _PANEL_WIDTH * cols / rows
    return Image(io.BytesIO(encoded.tobytes()), width=width, height=width * rows / cols)


def _table(rows: list[tuple[str, ...]], *, col_widths: tuple[float, ...],
           header: bool = False) -> Table:
    style = getSampleStyleSheet()["BodyText"]
    table = Table([[Paragraph(escape(cell), style) for cell in row] for row in rows],
                  colWidths=col_widths)
    commands = [("GRID", (0, 0), (-1, -1), 0.3, colors.grey),
                ("VALIGN", (0, 0), (-1, -1), "TOP")]
    if header:
        commands.append(("BACKGROUND", (0, 0), (-1, 0), colors.lightgrey))
    else:
        commands.append(("BACKGROUND", (0, 0), (0, -1), colors.whitesmoke))
    table.setStyle(TableStyle(commands))
    return table


def _date(value: str) -> str:
    """DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as given."""
    value = str(value)
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value
