"""Review reasons end to end: C-STORE into a running node, the job row says why the read went to review."""
from __future__ import annotations

import pydicom
import pytest

from inference.training import eval_family as ef
from inference.training.phantoms import generate_phantom, phantom_dataset
from node.store.db import JobState
from node.scu import send_files
from tests.conftest import finished_jobs, wait_for

pytestmark = pytest.mark.integration


def test_out_of_distribution_and_portable_ap_images_reach_review_with_their_reasons(make_settings, running_node,
                                                                                     tmp_path) -> None:
    node = running_node(make_settings())
    abdomen = ef.case_dataset(ef.make_abdomen(ef.SEED_BASE + 910_000, 512), body_part="CHEST")
    ap = phantom_dataset(generate_phantom(9_300, size=512, nodule=False), view_position="AP")
    paths = []
    for name, ds in (("abdomen.dcm", abdomen), ("ap.dcm", ap)):
        ds.save_as(tmp_path / name, enforce_file_format=True)
        paths.append(tmp_path / name)
    results = send_files(paths, host="127.0.0.1", port=node.settings.node.port, called_aet="SMARTNODULE",
                         calling_aet="STORESCU")
    assert all(r.status == 0x0000 for r in results), results
    jobs = wait_for(lambda: finished_jobs(node.sessions, 2), 180, message="both jobs processed")
    by_uid = {j.sop_instance_uid: j for j in jobs}
    odd, portable = by_uid[abdomen.SOPInstanceUID], by_uid[ap.SOPInstanceUID]
    assert odd.state is JobState.ENCODED and odd.review_required
    assert "out_of_distribution" in odd.review_reasons.split(",") and odd.ood_score > 0
    assert portable.state is JobState.ENCODED and portable.review_required
    assert "ap_view" in portable.review_reasons.split(",")
    assert pydicom.dcmread(f"{odd.results_dir}/sr.dcm").SOPClassUID  # results were written as for any read
