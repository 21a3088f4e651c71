"""Server-side sessions and roles: a copied cookie dies with logout, password change and disable; idle and absolute
timeouts; only reviewers and adjudicators record verdicts; every read of patient data is audited with the user."""
from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from structlog.testing import capture_logs

from node.store.db import Job, utcnow
from review_web.app import create_app
from node.store.review import NotAReader, Role, User, Verdict, WebSession, final_verdict, record_verdict
from review_web.security import end_all_sessions, hash_password
from tests.review_web.conftest import csrf_of
from tests.review_web.test_review_web_app import login


@pytest.fixture
def app(node):
    return create_app(node.settings, node.sessions, node.index)


def logged_in(app, username: str) -> TestClient:
    client = TestClient(app, base_url="http://127.0.0.1")
    assert login(client, username).status_code == 303
    return client


def copy_of(client: TestClient, app) -> TestClient:
    """Another browser holding a copy of `client`'s session cookie."""
    thief = TestClient(app, base_url="http://127.0.0.1")
    thief.cookies.set("smartnodule_session", client.cookies["smartnodule_session"])
    return thief


def status(client: TestClient, path: str = "/queue") -> int:
    return client.get(path, follow_redirects=False).status_code


def test_a_cookie_copied_before_logout_is_refused_after_it(app, node):
    client = logged_in(app, "reviewer")
    thief = copy_of(client, app)
    assert status(thief) == 200
    other = logged_in(app, "reviewer")  # the same user in a second browser
    csrf = csrf_of(client.get("/queue").text)
    assert client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    assert status(thief) == 303 and status(client) == 303
    assert status(other) == 200  # only the session that logged out ended
    with node.sessions() as session:
        assert session.query(WebSession).count() == 1


def _change(node, username: str, **values) -> None:
    with node.sessions.begin() as session:
        user = session.scalar(select(User).where(User.username == username))
        for key, value in values.items():
            setattr(user, key, value)
        end_all_sessions(session, user)


def test_password_change_and_disable_end_every_copy(app, node):
    client = logged_in(app, "reviewer")
    thief = copy_of(client, app)
    _change(node, "reviewer", password_hash=hash_password("another long password"))
    assert status(thief) == 303 and status(client) == 303

    client = logged_in(app, "reviewer2")
    thief = copy_of(client, app)
    bearer = {"Authorization": f"Bearer {node.tokens['reviewer2']}"}
    assert client.get("/api/queue", headers=bearer).status_code == 200
    _change(node, "reviewer2", disabled=True)
    assert status(thief) == 303 and status(client) == 303
    assert TestClient(app).get("/api/queue", headers=bearer).status_code == 401
    assert login(TestClient(app, base_url="http://127.0.0.1"), "reviewer2").status_code == 401


@pytest.mark.parametrize("column, limit", [("last_seen_at", "session_idle_s"), ("created_at", "session_max_age_s")])
def test_idle_and_absolute_timeouts(app, node, column, limit):
    client = logged_in(app, "reviewer")
    assert status(client) == 200
    with node.sessions.begin() as session:
        session.execute(update(WebSession).values(
            {column: utcnow() - timedelta(seconds=getattr(node.settings.web, limit) + 1)}))
    assert status(client) == 303
    with node.sessions() as session:
        assert session.query(WebSession).count() == 0


def test_a_request_keeps_an_idle_session_alive(app, node):
    client = logged_in(app, "reviewer")
    almost = utcnow() - timedelta(seconds=node.settings.web.session_idle_s - 5)
    with node.sessions.begin() as session:
        session.execute(update(WebSession).values(last_seen_at=almost))
    assert status(client) == 200
    with node.sessions() as session:
        assert session.scalar(select(WebSession.last_seen_at)) > almost + timedelta(seconds=4)


def test_an_administrator_verdict_is_refused_and_never_final(app, node):
    job_id = node.job_ids[0]
    admin = logged_in(app, "admin")
    csrf = csrf_of(admin.get(f"/cases/{job_id}").text)
    response = admin.post(f"/cases/{job_id}/verdict", data={"nodule": "absent", "csrf_token": csrf},
                          follow_redirects=False)
    assert response.status_code == 403
    reviewer = logged_in(app, "reviewer")
    csrf = csrf_of(reviewer.get(f"/cases/{job_id}").text)
    reviewer.post(f"/cases/{job_id}/verdict", data={"nodule": "absent", "csrf_token": csrf})
    with node.sessions.begin() as session:
        assert session.query(Verdict).count() == 1
        assert final_verdict(session, job_id).status.value == "provisional"
        admin_user = session.scalar(select(User).where(User.role == Role.ADMIN))
        with pytest.raises(NotAReader):
            record_verdict(session, job_id, admin_user, nodule_present=False, location=None, comment=None)
        # a verdict row written by an administrator before this rule (or by hand) does not count either
        session.add(Verdict(job_id=job_id, reviewer="admin", role=Role.ADMIN, nodule_present=False,
                            created_at=utcnow()))
        session.flush()
        assert final_verdict(session, job_id).status.value == "provisional"
    queue = admin.get("/api/queue", headers={"Authorization": f"Bearer {node.tokens['admin']}"})
    assert queue.json() == []


def test_a_session_for_an_unknown_id_is_refused(app, node):
    client = logged_in(app, "reviewer")
    with node.sessions.begin() as session:
        session.execute(update(WebSession).values(id_hash="0" * 64))
    assert status(client) == 303


def test_every_read_of_patient_data_is_audited_with_the_user(app, node):
    job_id = node.job_ids[0]
    client = logged_in(app, "reviewer")
    bearer = {"Authorization": f"Bearer {node.tokens['reviewer2']}"}
    with node.sessions() as session:
        study = session.get(Job, job_id).study_instance_uid
    with capture_logs() as events:
        for path in ("", "/image.png", "/overlay.png", "/pixels.raw", "/report.pdf"):
            assert client.get(f"/cases/{job_id}{path}").status_code == 200
        assert client.get("/queue").status_code == 200  # accession numbers: a read of patient data
        for path in ("/api/queue", f"/api/jobs/{job_id}/similar", f"/api/studies/{study}/jobs"):
            assert client.get(path, headers=bearer).status_code == 200
        assert client.get("/cases/999999").status_code == 404  # nothing read, nothing audited
    viewed = [e for e in events if e["event"] == "patient_data_viewed"]
    assert [(e["username"], e["what"]) for e in viewed] == [
        ("reviewer", "case_page"), ("reviewer", "image"), ("reviewer", "overlay"), ("reviewer", "pixels"),
        ("reviewer", "report_pdf"), ("reviewer", "queue_page"),
        ("reviewer2", "api_queue"), ("reviewer2", "api_similar"), ("reviewer2", "api_study_jobs")]
    assert all(e.get("job_id", job_id) == job_id for e in viewed)
    assert job_id in viewed[-1]["job_ids"]
