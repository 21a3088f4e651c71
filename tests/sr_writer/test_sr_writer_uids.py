"""Deterministic output UIDs under the site's root (`sr_writer.uids`, `results.uid_root`)."""
from __future__ import annotations

import itertools

import pytest

from config.settings import MAX_UID_ROOT_LENGTH as SETTINGS_MAX_ROOT, ResultsSettings, SettingsError, load_settings
from sr_writer.uids import DEFAULT_UID_ROOT, KINDS, MAX_UID_ROOT_LENGTH, derive_uid, device_uid, is_uid, output_uids

SOURCE = "1.2.826.0.1.3680043.8.498.1234567890"
SITE_ROOT = "1.2.999.77"


def test_same_inputs_same_uids():
    assert output_uids(SOURCE, "1.0.0", "sr") == output_uids(SOURCE, "1.0.0", "sr")


def test_every_kind_version_and_source_differs():
    uids = [output_uids(source, version, kind)
            for source, version, kind in itertools.product((SOURCE, SOURCE + ".1"), ("1.0.0", "1.0.1"), KINDS)]
    every = [uid for pair in uids for uid in (pair.series_instance_uid, pair.sop_instance_uid)]
    assert len(set(every)) == len(every)
    assert all(is_uid(uid) and uid.startswith(DEFAULT_UID_ROOT + ".") for uid in every)
    assert not any(uid.startswith("1.2.826.0.1.3680043.8.498.") for uid in every)  # not pydicom's shared root


def test_site_root_is_used_for_every_uid():
    pair = output_uids(SOURCE, "1.0.0", "gsps", uid_root=SITE_ROOT)
    tracking = derive_uid(SOURCE, "1.0.0", "sr", "tracking:x", uid_root=SITE_ROOT)
    device = device_uid("m", "1.0.0", "ab" * 32, uid_root=SITE_ROOT)
    for uid in (pair.series_instance_uid, pair.sop_instance_uid, tracking, device):
        assert uid.startswith(SITE_ROOT + ".") and is_uid(uid) and len(uid) == 64
    assert pair != output_uids(SOURCE, "1.0.0", "gsps")


def test_longest_root_leaves_room_for_the_suffix():
    root = "1." + "2" * (MAX_UID_ROOT_LENGTH - 2)
    uid = output_uids(SOURCE, "1.0.0", "sr", uid_root=root).sop_instance_uid
    assert is_uid(uid) and len(uid) - len(root) - 1 >= 19


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


@pytest.mark.parametrize("root", ["1.2.", "01.2", "1..2", "1.2.x", "1." + "2" * MAX_UID_ROOT_LENGTH, ""])
def test_bad_root_is_refused_by_writer_and_settings(root):
    with pytest.raises(ValueError, match="uid_root"):
        output_uids(SOURCE, "1.0.0", "sr", uid_root=root)
    with pytest.raises(SettingsError, match="results.uid_root"):
        load_settings(None, results={"uid_root": root})


def test_settings_default_is_the_writers_default():
    assert ResultsSettings().uid_root == load_settings().results.uid_root == DEFAULT_UID_ROOT
    assert SETTINGS_MAX_ROOT == MAX_UID_ROOT_LENGTH
    assert load_settings(None, results={"uid_root": SITE_ROOT}).results.uid_root == SITE_ROOT
