"""Settings of the result objects each destination receives, and the files the Deliverer picks for it."""
from __future__ import annotations

import pytest

from config.settings import SettingsError, load_settings
from node.pipeline import chosen_files

PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def test_defaults_send_everything_a_result_has():
    [destination] = load_settings().destinations  # config/node.toml
    assert destination.objects == ["sr", "gsps", "heatmap", "pdf"]
    assert destination.negatives == ["sr", "heatmap", "pdf"]
    [bare] = load_settings(None, destinations=[PACS]).destinations  # keys left out: the same defaults
    assert (bare.objects, bare.negatives) == (destination.objects, destination.negatives)


@pytest.mark.parametrize("values, message", [
    ({"objects": ["sr", "dicom-seg"]}, "destinations.0.objects.1"),
    ({"objects": []}, "destinations.0.objects"),
    ({"negatives": ["gsps"]}, "negative result has no presentation state"),
    ({"objects": ["sr"], "negatives": ["pdf"]}, "not in objects: pdf"),
])
def test_bad_choice_names_the_setting(values, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(None, destinations=[{**PACS, **values}])


def test_chosen_files_follow_the_destination_and_the_result(tmp_path):
    [destination] = load_settings(None, destinations=[{**PACS, "objects": ["sr", "gsps", "pdf"],
                                                       "negatives": ["sr"]}]).destinations
    assert chosen_files(tmp_path, destination, positive=True) == [tmp_path / f"{n}.dcm" for n in ("sr", "gsps", "pdf")]
    assert chosen_files(tmp_path, destination, positive=False) == [tmp_path / "sr.dcm"]
    [silent] = load_settings(None, destinations=[{**PACS, "negatives": []}]).destinations
    assert chosen_files(tmp_path, silent, positive=False) == []
