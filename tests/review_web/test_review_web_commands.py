"""`smartnodule user add`: the user is stored with an argon2 hash and the printed API token works."""
from __future__ import annotations

import argparse
import io

from config.settings import load_settings
from node.db import open_database
from review_web import commands
from review_web.models import Role, User
from review_web.security import check_password, user_by_token


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
    assert "at least 12 characters" in capsys.readouterr().err
    with sessions() as session:
        assert session.query(User).count() == 1
