"""The web app through FastAPI's TestClient: login, CSRF, rate limit, headers, pages, API, health, metrics."""
from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from node.store.db import Job, JobState
from review_web.app import create_app
from node.store.review import Role, Verdict, decide
from tests.review_web.conftest import PASSWORD, csrf_of


@pytest.fixture
def client(node) -> TestClient:
    return TestClient(create_app(node.settings, node.sessions, node.index), base_url="http://127.0.0.1")


def login(client: TestClient, username: str, password: str = PASSWORD):
    csrf = csrf_of(client.get("/login").text)
    return client.post("/login", data={"username": username, "password": password, "csrf_token": csrf},
                       follow_redirects=False)


def test_anonymous_visitors_are_sent_to_login(client, node):
    for path in ("/queue", f"/cases/{node.job_ids[0]}", f"/cases/{node.job_ids[0]}/report.pdf", "/health"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login", path
    assert client.get("/api/queue").status_code == 401
    assert client.get("/api/queue", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_login_sets_a_strict_http_only_session_and_audits(client):
    with capture_logs() as events:
        response = login(client, "reviewer")
    assert response.status_code == 303 and response.headers["location"] == "/queue"
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    assert any(e["event"] == "login_succeeded" and e["username"] == "reviewer" for e in events)
    page = client.get("/queue")
    assert page.status_code == 200 and "Review queue" in page.text
    headers = page.headers
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


def test_wrong_password_fails_and_logins_are_rate_limited(client):
    with capture_logs() as events:
        for _ in range(3):
            assert login(client, "reviewer", "wrong password!!").status_code == 401
        blocked = login(client, "reviewer")  # right password, but too many failures
    assert blocked.status_code == 429 and "Too many failed attempts" in blocked.text
    failed = [e for e in events if e["event"] == "login_failed"]
    assert [e["reason"] for e in failed] == ["wrong_credentials"] * 3 + ["rate_limited"]
    assert login(client, "admin").status_code == 303  # another username is not blocked


def test_posts_without_csrf_token_are_refused(client, node):
    response = client.post("/login", data={"username": "reviewer", "password": PASSWORD}, follow_redirects=False)
    assert response.status_code == 403
    login(client, "reviewer")
    job_id = node.job_ids[0]
    for data in ({"nodule": "present"}, {"nodule": "present", "csrf_token": "forged"}):
        assert client.post(f"/cases/{job_id}/verdict", data=data, follow_redirects=False).status_code == 403
    with node.sessions() as session:
        assert session.query(Verdict).count() == 0


def test_verdicts_follow_the_double_read_rule(client, node):
    job_id = node.job_ids[0]
    login(client, "reviewer")
    page = client.get(f"/cases/{job_id}")
    assert page.status_code == 200 and "PHANTOM^" in page.text and "Similar past cases" in page.text
    with capture_logs() as events:
        response = client.post(f"/cases/{job_id}/verdict", follow_redirects=False, data={
            "nodule": "present", "row": "200", "col": "150", "comment": "left upper", "csrf_token": csrf_of(page.text)})
    assert response.status_code == 303 and response.headers["location"] == "/queue"
    recorded = [e for e in events if e["event"] == "verdict_recorded"]
    assert recorded and recorded[0]["job_id"] == job_id and recorded[0]["reviewer"] == "reviewer"
    queue = client.get("/queue").text
    assert f'href="/cases/{job_id}"' not in queue and f'href="/cases/{node.job_ids[1]}"' in queue

    api = {"Authorization": f"Bearer {node.tokens['reviewer2']}"}
    assert job_id in [item["job_id"] for item in client.get("/api/queue", headers=api).json()]
    second = TestClient(client.app, base_url="http://127.0.0.1")
    login(second, "reviewer2")
    csrf = csrf_of(second.get(f"/cases/{job_id}").text)
    second.post(f"/cases/{job_id}/verdict", data={"nodule": "absent", "csrf_token": csrf})
    assert job_id not in [item["job_id"] for item in client.get("/api/queue", headers=api).json()]
    judge = {"Authorization": f"Bearer {node.tokens['adjudicator']}"}
    waiting = {item["job_id"]: item for item in client.get("/api/queue", headers=judge).json()}
    assert waiting[job_id]["review_status"] == "needs adjudication"

    third = TestClient(client.app, base_url="http://127.0.0.1")
    login(third, "adjudicator")
    csrf = csrf_of(third.get(f"/cases/{job_id}").text)
    third.post(f"/cases/{job_id}/verdict", data={"nodule": "absent", "csrf_token": csrf})
    study = client.get(f"/api/studies/{_study(node, job_id)}/jobs", headers=api).json()
    assert [(j["job_id"], j["review_status"], j["verdict"]) for j in study] == [(job_id, "final", "absent")]
    for not_a_uid in ("1.02.3", "1..2", "1.2.", "9" * 65):  # the spool's UID grammar (PS3.5 9.1), not just digits and dots
        assert client.get(f"/api/studies/{not_a_uid}/jobs", headers=api).status_code == 422, not_a_uid


def _study(node, job_id: int) -> str:
    with node.sessions() as session:
        return session.get(Job, job_id).study_instance_uid


def _read(reviewer: str, present: bool, i: int, role: Role = Role.REVIEWER) -> Verdict:
    from datetime import datetime, timezone

    return Verdict(id=i, job_id=1, reviewer=reviewer, role=role, nodule_present=present,
                   created_at=datetime(2026, 1, 1, i, tzinfo=timezone.utc))


def test_final_verdict_rule():
    assert decide([]).status.value == "unread"
    single = decide([_read("a", True, 1)])
    assert single.status.value == "provisional" and single.label is None and single.nodule_present is True
    assert decide([_read("a", True, 1), _read("b", True, 2)]).label == "present"
    assert decide([_read("a", True, 1), _read("b", False, 2)]).status.value == "needs adjudication"
    adjudicated = decide([_read("a", True, 1), _read("b", False, 2), _read("j", True, 3, Role.ADJUDICATOR)])
    assert adjudicated.status.value == "final" and adjudicated.label == "present"
    assert decide([_read("j", False, 1, Role.ADJUDICATOR)]).status.value == "provisional"


def test_case_images_report_and_similar_cases(client, node):
    login(client, "reviewer")
    job_id = node.job_ids[0]
    image = cv2.imdecode(np.frombuffer(client.get(f"/cases/{job_id}/image.png").content, np.uint8),
                         cv2.IMREAD_UNCHANGED)
    overlay = cv2.imdecode(np.frombuffer(client.get(f"/cases/{job_id}/overlay.png").content, np.uint8),
                           cv2.IMREAD_UNCHANGED)
    assert image.shape == (512, 512) and overlay.shape == (512, 512, 4)
    alpha = overlay[..., 3]
    assert 0.002 < (alpha > 0).mean() < 0.3  # the warm Grad-CAM blob and the circle, not the whole image
    rows, cols = np.nonzero(alpha)
    assert abs(np.median(rows) - 180) < 40 and abs(np.median(cols) - 150) < 40
    pdf = client.get(f"/cases/{job_id}/report.pdf")
    assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF")
    assert pdf.content.rstrip().endswith(b"%%EOF")
    similar = client.get(f"/api/jobs/{job_id}/similar").json()
    assert len(similar) == len(node.job_ids) - 1  # every other processed case (k = 5)
    assert job_id not in [s["job_id"] for s in similar]
    assert similar == sorted(similar, key=lambda s: -s["similarity"])
    assert client.get("/cases/999999").status_code == 404


def test_health_page_api_healthz_metrics_and_resend(client, node):
    reviewer = {"Authorization": f"Bearer {node.tokens['reviewer']}"}
    admin = {"Authorization": f"Bearer {node.tokens['admin']}"}
    assert client.get("/api/health", headers=reviewer).status_code == 403
    health = client.get("/api/health", headers=admin).json()
    assert health["jobs_by_state"]["SENT"] == 4 and health["jobs_by_state"]["FAILED_DELIVERY"] == 1
    assert health["not_processed"] == {"SKIPPED lateral_view": 1}
    assert health["status"] == "degraded" and health["open_reviews"] == 3
    assert health["latency_count"] == 4 and health["latency_median_s"] == pytest.approx(120, abs=1)
    assert health["usage_by_calling_ae"] == {"DX_ROOM1": 4, "ORTHANC": 2}
    assert health["delivery_failures"] == [{"destination": "pacs", "jobs": [node.job_ids[4]],
                                            "last_error": "association rejected"}]
    assert health["model"] == "nodulenet 1.2.0"
    assert client.get("/healthz").json() == {"status": "degraded", "queue_depth": 0,
                                             "problems": ["1 job(s) failed delivery"]}
    metrics = client.get("/metrics").text
    assert 'smartnodule_jobs{state="SENT"} 4.0' in metrics
    assert 'smartnodule_jobs_failed_delivery{destination="pacs"} 1.0' in metrics
    assert 'smartnodule_queue_depth{state="RECEIVED"} 0.0' in metrics and "smartnodule_healthy 0.0" in metrics
    assert "smartnodule_jobs_finished_total{" in metrics  # this process's node.metrics, as on metrics.port

    login(client, "reviewer")
    assert client.get("/health").status_code == 403
    client.cookies.clear()
    login(client, "admin")
    page = client.get("/health")
    assert page.status_code == 200 and "association rejected" in page.text
    assert 'id="last-24-hours"' in page.text and "<polyline points=" in page.text
    assert re.search(r'id="cpu">(measuring…|\d+ %)</dd>', page.text)
    failed_job = node.job_ids[4]
    with capture_logs() as events:
        response = client.post(f"/health/resend/{failed_job}", data={"csrf_token": csrf_of(page.text)},
                               follow_redirects=False)
    assert response.status_code == 303
    assert any(e["event"] == "delivery_requeued" and e["job_id"] == failed_job for e in events)
    with node.sessions() as session:
        assert session.get(Job, failed_job).state is JobState.ENCODED
    assert client.get("/healthz").json()["status"] == "ok"


def test_openapi_describes_the_api(client):
    paths = client.get("/api/openapi.json").json()["paths"]
    assert {"/api/studies/{study_instance_uid}/jobs", "/api/queue", "/api/jobs/{job_id}/similar",
            "/api/health"} <= set(paths)
    assert not any(p.startswith("/cases") for p in paths)


def test_app_refuses_a_short_secret_key(node):
    settings = node.settings.model_copy(update={"web": node.settings.web.model_copy(update={"secret_key": "short"})})
    with pytest.raises(ValueError, match="web.secret_key"):
        create_app(settings, node.sessions)


def test_healthz_and_metrics_share_one_collection_within_the_cache_time(client, node, monkeypatch):
    import node.health as health_module

    collections = []
    real = health_module.collect_health
    monkeypatch.setattr(health_module, "collect_health", lambda *args: collections.append(1) or real(*args))
    app = create_app(node.settings, node.sessions, node.index)  # web.health_cache_s = 5
    fresh = TestClient(app, base_url="http://127.0.0.1")
    assert fresh.get("/healthz").status_code == 200
    assert "smartnodule_queue_depth" in fresh.get("/metrics").text
    assert fresh.get("/healthz").status_code == 200
    assert len(collections) == 1
    app.state.web.health.invalidate()
    fresh.get("/metrics")
    assert len(collections) == 2
    uncached = node.settings.model_copy(update={"web": node.settings.web.model_copy(update={"health_cache_s": 0})})
    plain = TestClient(create_app(uncached, node.sessions, node.index), base_url="http://127.0.0.1")
    plain.get("/healthz")
    plain.get("/healthz")
    assert len(collections) == 4
