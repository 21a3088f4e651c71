"""Headers as real devices write them: Presentation LUT Shape, and the quality flags that send a read to review."""
from __future__ import annotations

import numpy as np
import pytest

from config.settings import load_settings
from inference.training.phantoms import generate_phantom, phantom_dataset
from inference.predictor import REVIEW_FLAGS, ReviewPolicy
from inference.preprocess import prepare

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(9_400, size=512, nodule=False, bits_stored=15)


def _cr_monochrome1(phantom, lut_shape: str | None):
    """A 15-bit CR in MONOCHROME1 as a CR reader writes it; `lut_shape` None leaves the attribute out."""
    ds = phantom_dataset(phantom, monochrome1=True, modality="CR")
    if lut_shape is None:
        del ds.PresentationLUTShape
    else:
        ds.PresentationLUTShape = lut_shape
    return ds


def test_monochrome1_with_inverse_is_inverted_once(phantom) -> None:
    reference = prepare(phantom_dataset(phantom)).display.astype(int)
    for shape in ("INVERSE", None):
        image = prepare(_cr_monochrome1(phantom, shape))
        assert np.abs(image.display.astype(int) - reference).max() <= 2, shape
        assert "presentation_lut_inverse" not in image.quality_flags


def test_monochrome2_with_inverse_is_shown_inverted(phantom) -> None:
    plain = phantom_dataset(phantom)
    inverse = phantom_dataset(phantom)
    inverse.PresentationLUTShape = "INVERSE"
    a, b = prepare(plain), prepare(inverse)
    assert np.abs((255 - a.display.astype(int)) - b.display.astype(int)).max() <= 1
    assert "presentation_lut_inverse" in b.quality_flags
    assert np.allclose(1.0 - a.model_input[a.model_input > 0].mean(), b.model_input[b.model_input > 0].mean(), atol=0.1)


def test_portable_ap_without_spacing_gets_both_reasons(phantom) -> None:
    ds = phantom_dataset(phantom, view_position="AP", modality="CR")
    del ds.PixelSpacing
    del ds.ImagerPixelSpacing
    ds.StationName, ds.ProtocolName = "MOBILE DR 2", "CHEST AP PORTABLE"
    image = prepare(ds)
    reasons = ReviewPolicy().reasons(0.01, 0.6, 0.0, False, image.quality_flags)
    assert set(reasons) == {"ap_view", "no_pixel_spacing"}


def test_secondary_capture_of_a_chest_film_gets_its_reason(phantom) -> None:
    ds = phantom_dataset(phantom)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SC_STORAGE
    ds.Modality, ds.ConversionType = "OT", "DF"
    del ds.ViewPosition
    image = prepare(ds)
    reasons = ReviewPolicy().reasons(0.01, 0.6, 0.0, True, image.quality_flags)
    assert reasons[0] == "out_of_distribution" and "secondary_capture" in reasons
    assert "view_position_missing" not in reasons  # a flag the policy does not name stays a flag


def test_a_clean_pa_is_not_sent_to_review_and_the_settings_name_the_same_flags(phantom) -> None:
    assert ReviewPolicy().reasons(0.01, 0.6, 0.0, False, prepare(phantom_dataset(phantom)).quality_flags) == ()
    assert tuple(load_settings(None).model.review_flags) == REVIEW_FLAGS
    assert ReviewPolicy(flags=()).reasons(0.01, 0.6, 0.0, False, ("ap_view",)) == ()
    assert ReviewPolicy().reasons(0.62, 0.6, 0.3, False, ()) == ("near_threshold", "uncertain")


def test_every_review_reason_has_an_sr_code() -> None:
    from inference.types import REVIEW_REASON_CODES

    reasons = set(REVIEW_FLAGS) | {"near_threshold", "uncertain", "out_of_distribution"}
    assert reasons <= set(REVIEW_REASON_CODES)
    assert all(len(code) <= 16 and code.isupper() and meaning for code, meaning in REVIEW_REASON_CODES.values())
