"""The TID 1500 Comprehensive 3D SR of one prediction (IHE AI Results).

Owns the coded content of the report: device observer, procedure reported, image
library, the image-level group (finding, probability, uncertainty, review) and,
for a positive finding, the planar ROI group with the circle around the nodule.
"""
from __future__ import annotations

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.types import Location, Prediction
from sr_writer.uids import OutputUids, derive_uid, device_uid

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
UNITLESS = codes.UCUM.NoUnits  # UCUM "1"
UNCERTAINTY = Code("UNCERTAINTY", LOCAL_SCHEME, "Model uncertainty")
EXPERT_REVIEW = Code("EXPERTREVIEW", LOCAL_SCHEME, "Sent for expert review")
IMAGE_TRACKING_ID = "SmartNodule image result"
ROI_TRACKING_ID = "SmartNodule nodule 1"


def build_sr(source: pydicom.Dataset, prediction: Prediction, *,
             review: bool, uids: OutputUids, institution_name: str | None) -> hd.sr.Comprehensive3DSR:
    """The SR for `prediction` on `source`; inputs are validated by the caller."""
    model = prediction.model
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, manufacturer=MANUFACTURER,
        parameters=[f"weights_sha256={model.weights_sha256}"],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model.name, model.version, model.weights_sha256),
            name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=model.name,
            serial_number=model.weights_sha256[:16],
        ),
    )
    probability = hd.sr.Measurement(name=PROBABILITY, value=float(prediction.probability),
                                    unit=UNITLESS)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations
                 | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=tracking_uid(source, prediction, IMAGE_TRACKING_ID), identifier=IMAGE_TRACKING_ID),
            finding_type=NODULE,
            finding_sites=[hd.sr.FindingSite(LUNG)],
            algorithm_id=algorithm,
            measurements=[
                probability,
                hd.sr.Measurement(name=UNCERTAINTY, value=float(prediction.uncertainty),
                                  unit=UNITLESS),
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(NODULE, PRESENT if prediction.positive else ABSENT),
                hd.sr.QualitativeEvaluation(EXPERT_REVIEW, YES if review else NO),
            ],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        )
    ]
    if prediction.positive:
        assert prediction.location is not None  # checked by the caller
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=tracking_uid(source, prediction, ROI_TRACKING_ID), identifier=ROI_TRACKING_ID),
            referenced_region=nodule_region(source, prediction.location),
            finding_type=NODULE,
            finding_sites=[hd.sr.FindingSite(LUNG)],
            algorithm_id=algorithm,
            measurements=[probability],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(NODULE, PRESENT)],
        ))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_CHEST_XR,
        imaging_measurements=groups,
        referenced_images=[_library_view(source)],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[source], content=report[0],
        series_instance_uid=uids.series_instance_uid, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, institution_name=institution_name,
        is_complete=True, is_final=True, is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=model.name, software_versions=model.version,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME, name=LOCAL_SCHEME_NAME, responsible_organization=MANUFACTURER)],
    )


def tracking_uid(source: pydicom.Dataset, prediction: Prediction, identifier: str) -> str:
    """Deterministic Tracking UID of the finding called `identifier` in this SR."""
    return derive_uid(source.SOPInstanceUID, prediction.model.version, "sr", f"tracking:{identifier}")


def nodule_region(source: pydicom.Dataset, location: Location) -> hd.sr.ImageRegion:
    """CIRCLE around the finding: centre and one point on the circumference, (column, row)."""
    data = np.array([[location.col, location.row],
                     [location.col + location.radius, location.row]], dtype=float)
    return hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.CIRCLE, graphic_data=data,
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
