"""Why a case waits for review (#17: out of distribution, portable AP, ...) shows in the queue and on the case."""
from __future__ import annotations

from fastapi.testclient import TestClient

from node.store.db import Job
from review_web.app import create_app
from tests.review_web.test_review_web_app import login


def test_queue_and_case_page_show_the_review_reasons(node) -> None:
    with node.sessions.begin() as session:
        session.get(Job, node.job_ids[0]).review_reasons = "out_of_distribution,ap_view"
    client = TestClient(create_app(node.settings, node.sessions, node.index), base_url="http://127.0.0.1")
    login(client, "reviewer")
    queue = client.get("/queue").text
    assert "Why review" in queue and "out_of_distribution, ap_view" in queue
    case = client.get(f"/cases/{node.job_ids[0]}").text
    assert "out_of_distribution, ap_view" in case
    assert "out_of_distribution" not in client.get(f"/cases/{node.job_ids[1]}").text
