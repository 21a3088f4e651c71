"""Each destination receives the result objects it chose (`objects`, `negatives`), checked in a real Orthanc."""
from __future__ import annotations

import collections

import pytest

from node.store.db import DeliveryState, JobState
from node.orthanc_peer import OrthancPeer, orthanc_available
from tests.conftest import finished_jobs, wait_for
from tests.node.test_delivery import push

pytestmark = pytest.mark.integration


@pytest.fixture
def pacs(tmp_path):
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (make test installs it as root)")
    peer = OrthancPeer(tmp_path / "orthanc").start()
    yield peer
    peer.stop()


def modalities_by_study(client) -> dict[str, collections.Counter]:
    found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for instance in client.get("instances").json():
        tags = client.instances.get_tags(instance)
        found[tags["StudyInstanceUID"]][tags["Modality"]] += 1
    return found


def test_destination_gets_only_its_objects(pacs, make_settings, running_node, phantom_files):
    settings = make_settings(destinations=[{**pacs.destination("pacs"), "objects": ["sr", "gsps"], "negatives": []}])
    node = running_node(settings)
    push(node, phantom_files)
    jobs = wait_for(lambda: finished_jobs(node.sessions, len(phantom_files), {JobState.SENT, JobState.FAILED_DELIVERY}),
                    240, message="every job delivered")
    assert [j.state for j in jobs] == [JobState.SENT] * len(jobs)
    assert all(d.state is DeliveryState.SENT for j in jobs for d in j.deliveries)
    positive = {j.study_instance_uid for j in jobs if j.positive}
    negative = {j.study_instance_uid for j in jobs if not j.positive}
    assert positive and negative, "the phantoms should give the model both outcomes"

    found = modalities_by_study(pacs.client)
    # Positive: the SR and the presentation state, no heatmap (SC, modality OT) and no PDF (DOC).
    assert {study: dict(counter) for study, counter in found.items()} == {study: {"SR": 1, "PR": 1} for study in positive}
    assert not negative & set(found)  # negatives = []: nothing at all
