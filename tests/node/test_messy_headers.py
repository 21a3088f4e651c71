"""The messy-header corpus through a running node into a real Orthanc: every case comes back as SR, heatmap and
PDF, each passing dciodvfy, and the job names the repaired attributes (tests/data/make_messy_corpus.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread

from node.store.db import TERMINAL, JobState
from node.pipeline import chosen_files
from tests.conftest import audit_events, finished_jobs, wait_for
from tests.data.make_messy_corpus import build_corpus
from tests.faults.suite import storescu
from tests.node.test_end_to_end import orthanc  # noqa: F401  (fixture)
from tests.sr_writer.test_source_header import dciodvfy_errors

pytestmark = pytest.mark.integration


def test_messy_headers_come_back_as_sr_heatmap_and_pdf_that_pass_dciodvfy(
        orthanc, make_settings, running_node, tmp_path):  # noqa: F811  (fixture imported above)
    settings = make_settings(node={"port": orthanc.node_port}, destinations=[orthanc.destination()])
    node = running_node(settings)
    cases = build_corpus(tmp_path / "messy")
    sent = storescu({case.sop_instance_uid: case.path for case in cases}, settings.node.port)
    assert sent.acknowledged == {case.sop_instance_uid for case in cases}, sent.statuses
    jobs = wait_for(lambda: finished_jobs(node.sessions, len(cases), TERMINAL), 900, 0.5,
                    message="every messy case to be delivered")
    by_uid = {job.sop_instance_uid: job for job in jobs}
    assert set(by_uid) == {case.sop_instance_uid for case in cases}

    problems: dict[str, list[str]] = {}
    for case in cases:
        job = by_uid[case.sop_instance_uid]
        found = problems.setdefault(case.name, [])
        if job.state is not JobState.SENT:
            found.append(f"{job.state.value}: {job.reason}")
            continue
        named = {warning.split(" ")[0] for warning in json.loads(job.header_warnings or "[]")}
        found += [f"no header warning for {keyword}" for keyword in case.warned if keyword not in named]
        for path in chosen_files(Path(job.results_dir), settings.destinations[0], positive=bool(job.positive)):
            kind = path.stem
            if not orthanc.client.instances.lookup(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)):
                found.append(f"{kind} is not in Orthanc")
            found += [f"{kind}: {line}" for line in dciodvfy_errors(path)]
    assert {name: found for name, found in problems.items() if found} == {}

    repaired = [e for e in audit_events(settings) if e["event"] == "source_header_repaired"]
    assert {e["sop_instance_uid"] for e in repaired} == \
        {case.sop_instance_uid for case in cases if case.warned}
