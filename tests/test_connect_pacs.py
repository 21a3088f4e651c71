"""README "Connect your PACS", the Orthanc recipe as written, against a real Orthanc and the running node.

The node is registered through Orthanc's REST API (`PUT /modalities/smartnodule`),
checked with `POST /modalities/smartnodule/echo`, and the shipped Lua rule
(docker/orthanc/route-to-smartnodule.lua) forwards an uploaded DX to it. The
results must appear in the source study as the README's series, and must not be
forwarded back to the node.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from node.store.db import JobState
from node.orthanc_peer import OrthancPeer, free_port, orthanc_available
from sr_writer.heatmap import EXPLANATION_FILE, EXPLANATION_MAX_SIDE, read_explanation_png
from tests.conftest import finished_jobs, wait_for
from tests.test_conformance_statement import README, table

pytestmark = pytest.mark.integration
LUA_ROUTE = Path(__file__).resolve().parents[1] / "docker" / "orthanc" / "route-to-smartnodule.lua"


def test_orthanc_recipe_routes_cr_dx_and_receives_the_result_series(tmp_path, make_settings, running_node,
                                                                     phantom_files):
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (make test installs it as root)")
    node_port = free_port()
    with OrthancPeer(tmp_path / "orthanc", lua_scripts=(LUA_ROUTE,)) as orthanc:
        node = running_node(make_settings(node={"port": node_port}, destinations=[orthanc.destination()]))
        registered = requests.put(f"{orthanc.url}/modalities/smartnodule", timeout=10,
                                  json={"AET": "SMARTNODULE", "Host": "127.0.0.1", "Port": node_port})
        assert registered.ok, registered.text
        echo = requests.post(f"{orthanc.url}/modalities/smartnodule/echo", data="{}", timeout=30)
        assert echo.ok, echo.text

        client = orthanc.client
        every = {(r["Series"], r["Modality"], r["Series description"]) for r in table("result-series", README)}
        # One phantom with a nodule and one without: every processed image gets the README's series,
        # the presentation state (PR) only when the model found a nodule.
        with_nodule = [p for p in phantom_files if "no nodule" not in dcmread(p, stop_before_pixels=True).ImageComments]
        without = [p for p in phantom_files if p not in with_nodule]
        sent = [with_nodule[0], without[0]]
        for count, path in enumerate(sent, start=1):
            source = dcmread(path)
            assert source.Modality in ("CR", "DX")
            [instance_id] = client.upload_file(str(path))  # stored through REST: the Lua rule forwards it
            study_id = client.instances.get_parent_study_id(instance_id)
            jobs = wait_for(lambda: finished_jobs(node.sessions, count, {JobState.SENT, JobState.FAILED_DELIVERY,
                                                                         JobState.FAILED, JobState.REJECTED}), 120,
                            message="the routed image's job to be delivered")
            # The first image's results (SR, OT, DOC), stored in Orthanc before the second image
            # was, went through the same Lua rule first: had it forwarded them, they would be jobs here.
            assert [job.sop_instance_uid for job in jobs] == [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                                                              for p in sent[:count]]
            assert jobs[-1].state is JobState.SENT, jobs[-1].reason
            assert jobs[-1].calling_aet == "ORTHANC"
            # The worker keeps the explanation map beside the results, for the review page's overlay.
            kept = read_explanation_png((Path(jobs[-1].results_dir) / EXPLANATION_FILE).read_bytes())
            assert max(kept.shape) == min(EXPLANATION_MAX_SIDE, max(source.Rows, source.Columns))

            expected = every if jobs[-1].positive else {row for row in every if row[1] != "PR"}

            def result_series():
                series = [client.get(f"series/{s}").json()["MainDicomTags"]
                          for s in client.studies.get_series_ids(study_id)]
                found = {(tags.get("SeriesNumber"), tags.get("Modality"), tags.get("SeriesDescription"))
                         for tags in series if tags.get("Modality") != source.Modality}
                return found if found == expected else None

            wait_for(result_series, 30, message="the README's result series in the source study")
