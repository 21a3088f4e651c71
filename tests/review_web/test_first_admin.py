"""The first administrator from `web.admin_password_file` (compose: a Docker secret read by the web role's start):
made only while no user exists, its password never logged, an unusable file refused with the setting named; and
the web role started with the variable compose sets lets that administrator log in."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from config.settings import SettingsError, load_settings
from node.audit import AUDIT_FILE, configure_logging
from node.orthanc_peer import free_port
from node.store.db import open_database
from node.store.review import Role, User
from review_web.first_admin import ensure_first_admin
from review_web.security import check_password
from tests.conftest import wait_for
from tests.review_web.test_review_web_commands import _answers

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "a first admin password from a secret"


@pytest.fixture
def node(tmp_path):
    secret = tmp_path / "admin-password"
    secret.write_text(PASSWORD + "\n")  # as `echo ... > file` leaves it
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\naccept_any_calling_ae = true\n'
                      f'[web]\nadmin_password_file = "{secret}"\n')
    settings = load_settings(config)
    settings.node.data_dir.mkdir()
    configure_logging(settings.log_dir, audit_settings=settings.audit)
    yield settings, open_database(settings.database_url), secret
    configure_logging(None)


def users(sessions) -> list[User]:
    with sessions() as session:
        return list(session.scalars(select(User)))


def test_the_first_admin_is_made_once_and_its_password_is_never_logged(node):
    settings, sessions, secret = node
    assert ensure_first_admin(settings, sessions) is True
    [admin] = users(sessions)
    assert admin.username == "admin" and admin.role is Role.ADMIN and check_password(admin, PASSWORD)
    secret.write_text("another password, changed later\n")
    assert ensure_first_admin(settings, sessions) is False  # users exist: the file is not read again
    [same] = users(sessions)
    assert check_password(same, PASSWORD)
    configure_logging(None)  # flushes the audit file
    audit = (settings.log_dir / AUDIT_FILE).read_text()
    assert '"event": "user_added"' in audit and '"actor": "web.admin_password_file"' in audit
    assert PASSWORD not in audit and "another password" not in audit


def test_no_file_no_admin_and_an_unusable_file_is_refused_naming_the_setting(node, tmp_path):
    settings, sessions, secret = node
    assert ensure_first_admin(settings.model_copy(update={"web": settings.web.model_copy(
        update={"admin_password_file": None})}), sessions) is False
    secret.write_text("short\n")
    with pytest.raises(SettingsError) as refused:
        ensure_first_admin(settings, sessions)
    assert str(refused.value) == f"web.admin_password_file {secret}: password must have 12 to 1024 characters"
    secret.chmod(0o000)
    if not os.access(secret, os.R_OK):  # root reads it anyway
        with pytest.raises(SettingsError, match=r"web.admin_password_file .* cannot be read \(Permission denied\)"):
            ensure_first_admin(settings, sessions)
    assert users(sessions) == []
    with pytest.raises(SettingsError, match="web.admin_password_file: admin_password_file .* does not exist"):
        load_settings(None, web={"admin_password_file": str(tmp_path / "missing")})


@pytest.mark.integration  # the web role as a process (uvicorn)
def test_the_web_role_makes_the_admin_from_the_variable_compose_sets(tmp_path):
    port = free_port()
    secret = tmp_path / "admin-password"
    secret.write_text(PASSWORD + "\n")
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\naccept_any_calling_ae = true\n'
                      f'[web]\nenabled = true\nport = {port}\nsecret_key = "{"k" * 48}"\n')
    environment = {k: v for k, v in os.environ.items() if not k.upper().startswith("SMARTNODULE_")}
    environment.update(PYTHONPATH=str(ROOT), SMARTNODULE_WEB__ADMIN_PASSWORD_FILE=str(secret))
    server = subprocess.Popen([sys.executable, "-m", "node.cli", "web", "--config", str(config)], env=environment,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(f"{address}/healthz"), 120, message="the web role")
        browser = requests.Session()
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', browser.get(f"{address}/login", timeout=30).text)
        health = browser.post(f"{address}/login", timeout=60,
                              data={"username": "admin", "password": PASSWORD, "csrf_token": csrf.group(1)})
        assert health.status_code == 200 and health.url == f"{address}/health"
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0 and PASSWORD not in output
