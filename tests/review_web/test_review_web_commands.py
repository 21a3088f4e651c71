"""`smartnodule user ...`: add stores an argon2 hash and prints a working API token; list, disable, enable, passwd,
token-rotate and token-revoke change the user, end their sessions where they should, and are audited."""
from __future__ import annotations

import argparse
import io
import json
import signal
import subprocess
import sys
import urllib.request

import pytest
from sqlalchemy import select

from config.settings import load_settings
from node.audit import AUDIT_FILE, CHECKPOINT_SUFFIX, configure_logging
from node.store.db import open_database
from node.orthanc_peer import free_port
from review_web import commands
from node.store.review import Role, User
from review_web.security import check_password, open_session, session_user, user_by_token
from tests.conftest import wait_for


@pytest.fixture(autouse=True)
def _close_audit_file():
    yield
    configure_logging(None)


def run(argv: list[str], monkeypatch, stdin: str) -> int:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return args.func(args)


def test_user_add_prints_a_working_token_once(tmp_path, monkeypatch, capsys):
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\naccept_any_calling_ae = true\n')
    argv = ["user", "add", "rita", "--role", "reviewer", "--config", str(config), "--password-stdin"]
    assert run(argv, monkeypatch, "a long enough password\n") == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    sessions = open_database(load_settings(config).database_url)
    with sessions() as session:
        user = user_by_token(session, token)
        assert user.username == "rita" and user.role is Role.REVIEWER
        assert user.password_hash.startswith("$argon2id$") and check_password(user, "a long enough password")
    assert run(argv, monkeypatch, "a long enough password\n") == 1
    assert "already exists" in capsys.readouterr().err
    assert run(["user", "add", "sam", "--role", "admin", "--config", str(config), "--password-stdin"],
               monkeypatch, "short\n") == 1
    assert "12 to 1024 characters" in capsys.readouterr().err
    with sessions() as session:
        assert session.query(User).count() == 1


def audit_events(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "var" / "logs" / AUDIT_FILE).read_text().splitlines()]


def test_user_management_commands_change_the_user_end_sessions_and_are_audited(tmp_path, monkeypatch, capsys):
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\naccept_any_calling_ae = true\n')
    c = ["--config", str(config)]
    assert run(["user", "add", "rita", "--role", "reviewer", *c, "--password-stdin"], monkeypatch,
               "a long enough password\n") == 0
    first_token = capsys.readouterr().out.strip().splitlines()[-1]
    sessions = open_database(load_settings(config).database_url)

    def user() -> User:
        with sessions() as session:
            return session.scalar(select(User).where(User.username == "rita"))

    def login() -> str:
        with sessions.begin() as session:
            return open_session(session, user())

    def alive(token: str) -> bool:
        with sessions.begin() as session:
            return session_user(session, token, 3600, 3600) is not None

    assert run(["user", "list", *c], monkeypatch, "") == 0
    assert capsys.readouterr().out.split("\t")[:4] == ["rita", "reviewer", "enabled", "token"]

    cookie = login()
    assert run(["user", "disable", "rita", *c], monkeypatch, "") == 0
    assert user().disabled and not alive(cookie)
    with sessions() as session:
        assert user_by_token(session, first_token) is None
    assert run(["user", "enable", "rita", *c], monkeypatch, "") == 0
    assert not user().disabled

    cookie = login()
    assert run(["user", "passwd", "rita", *c, "--password-stdin"], monkeypatch, "another long password\n") == 0
    assert check_password(user(), "another long password") and not alive(cookie)
    assert run(["user", "passwd", "rita", *c, "--password-stdin"], monkeypatch, "short\n") == 1
    assert check_password(user(), "another long password")

    cookie = login()
    assert run(["user", "token-rotate", "rita", *c], monkeypatch, "") == 0
    new_token = capsys.readouterr().out.strip().splitlines()[-1]
    assert not alive(cookie)
    with sessions() as session:
        assert user_by_token(session, first_token) is None and user_by_token(session, new_token).username == "rita"
    assert run(["user", "token-revoke", "rita", *c], monkeypatch, "") == 0
    with sessions() as session:
        assert user_by_token(session, new_token) is None
    assert run(["user", "disable", "nobody", *c], monkeypatch, "") == 1

    events = [e for e in audit_events(tmp_path) if e["event"].startswith("user_")]
    assert [e["event"] for e in events] == ["user_added", "user_disabled", "user_enabled", "user_password_changed",
                                           "user_token_rotated", "user_token_revoked"]
    assert all(e["username"] == "rita" and e["actor"] for e in events)
    assert [e["sessions_ended"] for e in events[1:]] == [1, 0, 1, 1, 0]
    assert not any(first_token in json.dumps(e) or new_token in json.dumps(e) for e in audit_events(tmp_path))


@pytest.mark.integration
def test_the_web_role_stopped_by_sigterm_closes_the_audit_file_with_a_checkpoint(tmp_path):
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\naccept_any_calling_ae = true\n'
                      f'[web]\nenabled = true\nport = {port}\nsecret_key = "{"k" * 48}"\n')
    server = subprocess.Popen([sys.executable, "-m", "node.cli", "web", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), 120, message="the web role")
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    log = tmp_path / "var" / "logs" / AUDIT_FILE
    last = json.loads(log.read_text().splitlines()[-1])
    assert json.loads(log.with_name(AUDIT_FILE + CHECKPOINT_SUFFIX).read_text())["seq"] == last["seq"]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False
