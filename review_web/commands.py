"""Owns the web subcommands of the `smartnodule` CLI: `web` (the app alone) and `user add`.

`node/cli.py` calls `register(subparsers)`; each subcommand sets `func`,
which takes the parsed namespace and returns the exit status.
"""
from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

import structlog

from review_web.models import Role

log = structlog.get_logger(__name__)


def register(subparsers) -> None:
    """Add `web` and `user add` to an argparse subparsers object."""
    p = subparsers.add_parser("web", help="run the review and health web app alone")
    p.add_argument("--config", type=Path, default=None, help="settings file (default: config/node.toml)")
    p.set_defaults(func=cmd_web)

    p = subparsers.add_parser("user", help="manage web app users")
    actions = p.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a user; prints their API token once")
    add.add_argument("username")
    add.add_argument("--role", required=True, choices=[role.value for role in Role])
    add.add_argument("--config", type=Path, default=None, help="settings file (default: config/node.toml)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.set_defaults(func=cmd_user_add)


def _open(config: Path | None):
    """Settings, logging and the database (with the review tables: review_web.models is imported above)."""
    from config.settings import load_settings
    from node.audit import configure_logging
    from node.db import open_database

    settings = load_settings(config)
    settings.node.data_dir.mkdir(parents=True, exist_ok=True)
    configure_logging(settings.log_dir)
    return settings, open_database(settings.database_url)


def cmd_web(args: argparse.Namespace) -> int:
    import uvicorn

    from retrieval.index import CaseIndex
    from review_web.app import create_app
    from review_web.server import UVICORN_OPTIONS

    settings, sessions = _open(args.config)
    index = CaseIndex.from_settings(settings)
    if len(index) == 0:
        index.rebuild(sessions)
    try:
        app = create_app(settings, sessions, index)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.web.host, port=settings.web.port, **UVICORN_OPTIONS)
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    from review_web.security import create_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.username}: ")
        if getpass.getpass("Repeat the password: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 1
    settings, sessions = _open(args.config)
    try:
        with sessions.begin() as session:
            token = create_user(session, args.username, Role(args.role), password)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info("user_added", username=args.username, role=args.role)
    print(f"user {args.username} ({args.role}) added. API token (shown once, keep it safe):\n{token}")
    return 0
