"""Deterministic output UIDs (`sr_writer.uids`)."""
from __future__ import annotations

import itertools

import pytest

from sr_writer.uids import KINDS, derive_uid, output_uids

SOURCE = "1.2.826.0.1.3680043.8.498.1234567890"


def test_same_inputs_same_uids():
    assert output_uids(SOURCE, "1.0.0", "sr") == output_uids(SOURCE, "1.0.0", "sr")


def test_every_kind_version_and_source_differs():
    uids = [output_uids(source, version, kind)
            for source, version, kind in itertools.product((SOURCE, SOURCE + ".1"), ("1.0.0", "1.0.1"), KINDS)]
    every = [uid for pair in uids for uid in (pair.series_instance_uid, pair.sop_instance_uid)]
    assert len(set(every)) == len(every)
    assert all(len(uid) <= 64 and uid.startswith("1.2.826.0.1.3680043.8.498.") for uid in every)


def test_tracking_uid_differs_from_object_uids():
    pair = output_uids(SOURCE, "1.0.0", "sr")
    tracking = derive_uid(SOURCE, "1.0.0", "sr", "tracking:nodule 1")
    assert tracking not in (pair.series_instance_uid, pair.sop_instance_uid)


@pytest.mark.parametrize("source, version, kind, name", [
    ("not-a-uid", "1.0.0", "sr", "source_sop_instance_uid"),
    ("1." * 40 + "1", "1.0.0", "sr", "source_sop_instance_uid"),
    (SOURCE, "", "sr", "model_version"),
    (SOURCE, "1.0.0", "segmentation", "kind"),
])
def test_bad_input_names_the_parameter(source, version, kind, name):
    with pytest.raises(ValueError, match=name):
        output_uids(source, version, kind)
