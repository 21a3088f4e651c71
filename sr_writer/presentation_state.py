"""The Grayscale Softcopy Presentation State of a positive finding: the circle any PACS viewer draws.

Owns the presentation state object: it references the source image, keeps the
image's own modality and VOI LUT (and an INVERSE presentation LUT for
MONOCHROME1, so the image looks as the modality intended), and adds one graphic
layer with the circle around the nodule and a short text ("AI: nodule 87 %").
Many PACS viewers show GSPS annotations where they ignore SR measurements.

The same circle is also an activated bitmap overlay (group 6000) on that layer:
renderers without vector graphics draw overlays (DCMTK's `dcmp2pgm` rasterizes the
overlay but not graphic annotations; checked in the tests), and the two coincide
in viewers that draw both.

Coordinates are PIXEL units, in which the top left corner of the first pixel is
(0, 0) and its centre (0.5, 0.5), the same convention as the SR's SCOORD
(`structured_report.circle_points`). The graphic objects carry the SR finding's
tracking identifier and UID, so a reader can tie the drawing to the report.
"""
from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.pixels import pack_bits

from inference.types import Location, Prediction
from sr_writer.structured_report import MANUFACTURER, ROI_TRACKING_ID, circle_points, percent
from sr_writer.uids import OutputUids

GSPS_SERIES_NUMBER = 9904
GSPS_SERIES_DESCRIPTION = "AI nodule presentation state (not for primary diagnosis)"
CONTENT_LABEL = "SMARTNODULE_AI"
LAYER = "AI_NODULE"
LAYER_COLOUR = hd.color.CIELabColor(90.0, -60.0, 70.0)  # a bright yellow-green
LAYER_GRAY = 0xFFFF  # white on grayscale displays
OVERLAY_GROUP = 0x6000


def annotation_text(prediction: Prediction) -> str:
    """The text shown beside the circle."""
    return f"AI: nodule {percent(prediction.probability):.0f} %"


def build_gsps(source: pydicom.Dataset, prediction: Prediction, *, uids: OutputUids, tracking_uid: str,
               institution_name: str | None) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """GSPS of a positive `prediction` on `source`; inputs are validated by the caller."""
    location = prediction.location
    assert prediction.positive and location is not None  # the caller asks only for positives
    model = prediction.model
    layer = hd.pr.GraphicLayer(layer_name=LAYER, order=1, description="AI nodule finding",
                               display_color=LAYER_COLOUR)
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = LAYER_GRAY
    circle = hd.pr.GraphicObject(graphic_type=hd.pr.GraphicTypeValues.CIRCLE,
                                 graphic_data=circle_points(location),
                                 units=hd.pr.AnnotationUnitsValues.PIXEL,
                                 tracking_id=ROI_TRACKING_ID, tracking_uid=tracking_uid)
    text = hd.pr.TextObject(text_value=annotation_text(prediction), units=hd.pr.AnnotationUnitsValues.PIXEL,
                            bounding_box=_text_box(location, source.Rows, source.Columns))
    inverse = source.get("PhotometricInterpretation") == "MONOCHROME1"
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=uids.series_instance_uid, series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid, instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=model.name, software_versions=model.version,
        device_serial_number=model.weights_sha256[:16],
        content_label=CONTENT_LABEL, content_description="AI nodule finding (not for primary diagnosis)",
        graphic_layers=[layer],
        graphic_annotations=[hd.pr.GraphicAnnotation(referenced_images=[source], graphic_layer=layer,
                                                     graphic_objects=[circle], text_objects=[text])],
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE if inverse
            else hd.PresentationLUTShapeValues.IDENTITY),
        institution_name=institution_name,
        series_description=GSPS_SERIES_DESCRIPTION,
    )
    _add_circle_overlay(gsps, location, source.Rows, source.Columns)
    return gsps


def _add_circle_overlay(gsps: pydicom.Dataset, location: Location, rows: int, columns: int) -> None:
    """The circle as a graphic overlay the size of the image, shown on the annotation layer."""
    mask = np.zeros((rows, columns), dtype=np.uint8)
    (col, row), _ = circle_points(location)
    shift = 4  # sub-pixel centre: cv2 takes coordinates in 1/16 pixel, pixel centres at integers
    thickness = max(1, round(max(rows, columns) / 512))
    cv2.circle(mask, (round((col - 0.5) * 2 ** shift), round((row - 0.5) * 2 ** shift)),
               round(location.radius * 2 ** shift), 1, thickness, lineType=cv2.LINE_8, shift=shift)
    group = OVERLAY_GROUP
    gsps.add_new((group, 0x0010), "US", rows)
    gsps.add_new((group, 0x0011), "US", columns)
    gsps.add_new((group, 0x0022), "LO", "AI nodule circle")  # Overlay Description
    gsps.add_new((group, 0x0040), "CS", "G")  # Overlay Type: graphics
    gsps.add_new((group, 0x0050), "SS", [1, 1])  # Overlay Origin
    gsps.add_new((group, 0x0100), "US", 1)  # Overlay Bits Allocated
    gsps.add_new((group, 0x0102), "US", 0)  # Overlay Bit Position
    gsps.add_new((group, 0x1001), "CS", LAYER)  # Overlay Activation Layer
    gsps.add_new((group, 0x1500), "LO", "AI_NODULE")  # Overlay Label
    gsps.add_new((group, 0x3000), "OW", pack_bits(mask.ravel()))


def _text_box(location: Location, rows: int, columns: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the text: above the circle, or below it near the top edge."""
    height = max(12.0, rows / 30)
    width = min(float(columns), height * 9)
    (col, row), _ = circle_points(location)
    left = min(max(0.0, col - width / 2), columns - width)
    top = row - location.radius - height * 1.2
    if top < 0:
        top = min(row + location.radius + height * 0.2, rows - height)
    return left, top, left + width, top + height
