"""The TID 1500 Comprehensive 3D SR of one prediction (IHE AI Results), laid out for OHIF.

Owns the coded content of the report: device observer, procedure reported, image
library, the image-level result and, for a positive finding, the measurement
group that viewers draw.

Layout, and why (OHIF v3's SR code, `@ohif/extension-cornerstone-dicom-sr` with
`@cornerstonejs/adapters`, is the reader; tests/viewers/ohif runs it on our SRs):
- OHIF turns every TID 1501 measurement group into a measurement and reads the
  coordinates of each unguarded, so a group without coordinates breaks the whole
  SR. The image-level result (nodule present or absent, probability, uncertainty,
  expert review) therefore lives in the report-level "Qualitative Evaluations"
  container of TID 1500, and a negative SR has no measurement group at all.
- A positive finding is one TID 1501 group whose Tracking Identifier follows the
  cornerstone convention (`Cornerstone3DTools@^0.1.0:CircleROI:<our id>`) and whose
  first NUM, the probability, is INFERRED FROM the CIRCLE around the nodule: OHIF
  draws the circle, labels it with the concept names and values, and can hydrate
  it as an editable CircleROI measurement.
- Values are percent (UCUM `%`) rounded to 0.1, so viewers and `dsr2html` show
  "87.0 %" rather than "0.86967758012219 1".
- Coordinates follow DICOM's pixel convention: the centre of the first pixel is
  (0.5, 0.5), so a nodule centred on pixel index (row r, column c) is at column
  c + 0.5, row r + 0.5.
"""
from __future__ import annotations

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.types import REVIEW_REASON_CODES, Location, Prediction
from sr_writer.uids import DEFAULT_UID_ROOT, OutputUids, derive_uid, device_uid

MANUFACTURER = "SmartNodule"
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "AI nodule detection (not for primary diagnosis)"

# Local coding scheme for concepts no standard terminology names.
LOCAL_SCHEME = "99SMNOD"
LOCAL_SCHEME_NAME = "SmartNodule local codes"

PROCEDURE_CHEST_XR = Code("399208008", "SCT", "Plain chest X-ray")
NODULE = codes.SCT.Nodule  # SCT 27925004
LUNG = codes.SCT.Lung  # SCT 39607008
PRESENT = codes.SCT.Present  # SCT 52101004
ABSENT = codes.SCT.Absent  # SCT 272519000
YES = codes.SCT.Yes  # SCT 373066001
NO = codes.SCT.No  # SCT 373067005
PROBABILITY = codes.DCM.Probability  # DCM 122157
PERCENT = Code("%", "UCUM", "percent")
UNCERTAINTY = Code("UNCERTAINTY", LOCAL_SCHEME, "Model uncertainty")
EXPERT_REVIEW = Code("EXPERTREVIEW", LOCAL_SCHEME, "Sent for expert review")
REVIEW_REASON = Code("REVIEWREASON", LOCAL_SCHEME, "Reason for expert review")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 report level
CIRCLE_ROI_TRACKING_PREFIX = "Cornerstone3DTools@^0.1.0:CircleROI"  # cornerstone's CircleROI tool
ROI_TRACKING_ID = f"{CIRCLE_ROI_TRACKING_PREFIX}:SmartNodule nodule 1"


def build_sr(source: pydicom.Dataset, prediction: Prediction, *, review: bool, uids: OutputUids,
             institution_name: str | None, uid_root: str = DEFAULT_UID_ROOT) -> hd.sr.Comprehensive3DSR:
    """The SR for `prediction` on `source`; inputs are validated by the caller."""
    model = prediction.model
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model.name, model.version, model.weights_sha256, uid_root=uid_root),
            name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=model.name,
            serial_number=model.weights_sha256[:16],
        ),
    )
    # highdicom builds TID 1500 only with row 6 (Imaging Measurements) and at least one group; a
    # negative SR has no group, so its container is built around a placeholder and then removed,
    # leaving row 12 (Qualitative Evaluations) alone, as TID 1500 allows.
    group = _nodule_group(source, prediction, review=review, uid_root=uid_root) if prediction.positive \
        else hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(identifier="placeholder"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CHEST_XR,
        imaging_measurements=[group],
        referenced_images=[_library_view(source)],
    )
    content = report[0]
    if not prediction.positive:
        content.ContentSequence = hd.sr.ContentSequence(
            [item for item in content.ContentSequence if item.name != codes.DCM.ImagingMeasurements])
    content.ContentSequence.append(_image_result(prediction, review=review))
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=content,
        series_instance_uid=uids.series_instance_uid, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, institution_name=institution_name,
        is_complete=True, is_final=True, is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=model.name, software_versions=model.version,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME, name=LOCAL_SCHEME_NAME, responsible_organization=MANUFACTURER)],
    )


def percent(value: float) -> float:
    """A probability or uncertainty in [0, 1] as percent, rounded to 0.1."""
    return round(float(value) * 100, 1)


def _image_result(prediction: Prediction, *, review: bool) -> hd.sr.ContainerContentItem:
    """TID 1500 "Qualitative Evaluations": nodule present/absent with probability and uncertainty, review and
    each reason for it (out of distribution, portable AP view, ...)."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    finding = hd.sr.CodeContentItem(name=NODULE, value=PRESENT if prediction.positive else ABSENT,
                                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    finding.ContentSequence = hd.sr.ContentSequence([
        hd.sr.NumContentItem(name=name, value=percent(value), unit=PERCENT,
                             relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES)
        for name, value in ((PROBABILITY, prediction.probability), (UNCERTAINTY, prediction.uncertainty))
    ])
    container.ContentSequence = hd.sr.ContentSequence([
        finding,
        hd.sr.CodeContentItem(name=EXPERT_REVIEW, value=YES if review else NO,
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        *(hd.sr.CodeContentItem(name=REVIEW_REASON, value=_reason_code(reason),
                                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
          for reason in prediction.review_reasons),
    ])
    return container


def _nodule_group(source: pydicom.Dataset, prediction: Prediction, *, review: bool,
                  uid_root: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of the nodule: the probability INFERRED FROM the circle, then the uncertainty."""
    if prediction.location is None:
        raise ValueError("a positive prediction has a location")
    model = prediction.model
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, manufacturer=MANUFACTURER,
        parameters=[f"weights_sha256={model.weights_sha256}"],
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(source, prediction, ROI_TRACKING_ID, uid_root=uid_root), identifier=ROI_TRACKING_ID),
        finding_type=NODULE,
        finding_sites=[hd.sr.FindingSite(LUNG)],
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=percent(prediction.probability), unit=PERCENT,
                              referenced_coordinates=[nodule_coordinates(source, prediction.location)]),
            hd.sr.Measurement(name=UNCERTAINTY, value=percent(prediction.uncertainty), unit=PERCENT),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(NODULE, PRESENT),
            hd.sr.QualitativeEvaluation(EXPERT_REVIEW, YES if review else NO),
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _reason_code(reason: str) -> Code:
    """The local code of a review reason (inference.types.REVIEW_REASON_CODES)."""
    value, meaning = REVIEW_REASON_CODES[reason]
    return Code(value, LOCAL_SCHEME, meaning)


def tracking_uid(source: pydicom.Dataset, prediction: Prediction, identifier: str, *,
                 uid_root: str = DEFAULT_UID_ROOT) -> str:
    """Deterministic Tracking UID of the finding called `identifier` in this SR."""
    return derive_uid(source.SOPInstanceUID, prediction.model.version, "sr", f"tracking:{identifier}",
                      uid_root=uid_root)


def circle_points(location: Location) -> np.ndarray:
    """Centre and one point on the circumference, (column, row), in DICOM's pixel convention.

    The centre of the first pixel is (0.5, 0.5) in SR SCOORD and in presentation
    state PIXEL units alike, so pixel index (r, c) is at (c + 0.5, r + 0.5).
    """
    col, row = location.col + 0.5, location.row + 0.5
    return np.array([[col, row], [col + location.radius, row]], dtype=float)


def nodule_coordinates(source: pydicom.Dataset, location: Location) -> hd.sr.CoordinatesForMeasurement:
    """The CIRCLE around the finding, as the coordinates a measurement is INFERRED FROM."""
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE, graphic_data=circle_points(location),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source))


def _library_view(source: pydicom.Dataset) -> pydicom.Dataset:
    """The header attributes the Image Library entry (TID 1601-1603) describes.

    highdicom adds the projection radiography descriptors (TID 1603) when the
    modality is a projection one and then needs Patient Orientation and Imager
    Pixel Spacing; an image without both gets the general descriptors only.
    """
    view = pydicom.Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        if keyword in source:
            view[keyword] = source[keyword]
    orientation = source.get("PatientOrientation")
    spacing = source.get("ImagerPixelSpacing") or source.get("PixelSpacing")
    has_projection_descriptors = (orientation is not None and len(orientation) == 2
                                  and spacing is not None and len(spacing) == 2)
    if has_projection_descriptors:
        view.PatientOrientation = orientation
        view.ImagerPixelSpacing = spacing
        view.Modality = source.Modality
    else:
        view.Modality = "OT"  # steers highdicom past TID 1603; the coded modality comes from the SOP class
    return view
