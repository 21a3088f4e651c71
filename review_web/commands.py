"""Owns the web subcommands of the `smartnodule` CLI: `web` (the app alone) and
`user add|list|disable|enable|passwd|token-rotate|token-revoke`.

`node/cli.py` calls `register(subparsers)`; each subcommand sets `func`,
which takes the parsed namespace and returns the exit status. Every change to
a user is an audit event naming the operating-system account that made it
(`actor`); disable, passwd and token-rotate also end the user's web sessions.
"""
from __future__ import annotations

import argparse
import getpass
import signal
import sys
from pathlib import Path

import structlog

from config.settings import CONFIG_HELP
from node.store.roles import Role

log = structlog.get_logger(__name__)


def register(subparsers) -> None:
    """Add `web` and `user add` to an argparse subparsers object."""
    p = subparsers.add_parser("web", help="run the review and health web app alone")
    p.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    p.set_defaults(func=cmd_web)

    p = subparsers.add_parser("user", help="manage web app users")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", help="one of the actions below")
    add = _user_action(actions, "add", "add a user; prints their API token once", cmd_user_add)
    add.add_argument("--role", required=True, choices=[role.value for role in Role],
                     help="reviewer or adjudicator (read the review queue; an adjudicator settles disagreements), "
                          "or admin (health page, resend)")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    listing = actions.add_parser("list", help="users, their roles, whether disabled and whether they have a token")
    listing.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    listing.set_defaults(func=cmd_user_list)
    _user_action(actions, "disable", "refuse the user's logins and token; end their sessions", cmd_user_disable)
    _user_action(actions, "enable", "allow a disabled user again", cmd_user_enable)
    passwd = _user_action(actions, "passwd", "set a new password; ends the user's sessions", cmd_user_passwd)
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    _user_action(actions, "token-rotate", "replace the API token (printed once); ends the user's sessions",
                 cmd_user_token_rotate)
    _user_action(actions, "token-revoke", "remove the API token", cmd_user_token_revoke)


def _user_action(actions, name: str, help_text: str, func) -> argparse.ArgumentParser:
    parser = actions.add_parser(name, help=help_text)
    parser.add_argument("username", help="the login name")
    parser.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    parser.set_defaults(func=func)
    return parser


def _open(config: Path | None, *, create: bool = False):
    """node.command_setup.open_for_command, imported when a command runs (building the parser loads no database)."""
    from node.command_setup import open_for_command

    return open_for_command(config, create=create)


def cmd_web(args: argparse.Namespace) -> int:
    """The web role: the app, and the alerts (sent from this role only, so replicas of the others do not repeat
    them)."""
    import uvicorn

    from node.alerts import Alerter
    from node.cases import rebuild_index
    from node.metrics import serve_metrics
    from retrieval.index import CaseIndex
    from review_web.app import create_app
    from review_web.first_admin import ensure_first_admin
    from review_web.server import UVICORN_OPTIONS

    settings, sessions = _open(args.config, create=True)
    ensure_first_admin(settings, sessions)
    index = CaseIndex.from_settings(settings)
    if len(index) == 0:
        rebuild_index(sessions, index)
    try:
        app = create_app(settings, sessions, index)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve_metrics(settings, sessions)  # [metrics] port (the app's /metrics shows the same); ends with the process
    alerter = Alerter(settings, sessions) if settings.alerts.webhook_url or settings.alerts.mail_to else None
    if alerter is not None:
        alerter.start()
    # uvicorn raises the stop signal again after its graceful shutdown; handled here, the command returns and
    # logging closes the audit file (writing its checkpoint) instead of the process dying on the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run(app, host=settings.web.host, port=settings.web.port, **UVICORN_OPTIONS)
    finally:
        if alerter is not None:
            alerter.stop()
    return 0


def _new_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass(f"Password for {args.username}: ")
    if getpass.getpass("Repeat the password: ") != password:
        print("error: the passwords differ", file=sys.stderr)
        return None
    return password


def add_user(sessions, username: str, role: Role, password: str, actor: str) -> str:
    """`user add` (and the demo's reviewer): create the user, audited; returns the API token, which is shown once.
    Raises ValueError for a taken or invalid username or an invalid password."""
    from review_web.security import create_user

    with sessions.begin() as session:
        token = create_user(session, username, role, password)
    log.info("user_added", username=username, role=role.value, actor=actor)
    return token


def cmd_user_add(args: argparse.Namespace) -> int:
    password = _new_password(args)
    if password is None:
        return 1
    _, sessions = _open(args.config, create=True)
    try:
        token = add_user(sessions, args.username, Role(args.role), password, actor=getpass.getuser())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"user {args.username} ({args.role}) added. API token (shown once, keep it safe):\n{token}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from node.store.review import User

    _, sessions = _open(args.config)
    with sessions() as session:
        for user in session.scalars(select(User).order_by(User.username)):
            print(f"{user.username}\t{user.role.value}\t{'disabled' if user.disabled else 'enabled'}\t"
                  f"{'token' if user.api_token_hash else 'no token'}\t{user.created_at:%Y-%m-%d}")
    return 0


def _change_user(args: argparse.Namespace, change, event: str, end_sessions: bool) -> int:
    """Apply `change(user)` to the named user (its return value is printed), end their sessions if asked, audit."""
    from sqlalchemy import select

    from node.store.review import User
    from review_web.security import end_all_sessions

    _, sessions = _open(args.config)
    try:
        with sessions.begin() as session:
            user = session.scalar(select(User).where(User.username == args.username))
            if user is None:
                print(f"error: no user {args.username!r}", file=sys.stderr)
                return 1
            shown = change(user)
            ended = end_all_sessions(session, user) if end_sessions else 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info(event, username=args.username, sessions_ended=ended, actor=getpass.getuser())
    print(f"{event.replace('_', ' ')}: {args.username}" + (f"\n{shown}" if shown else ""))
    return 0


def _set(**values):
    def change(user) -> None:
        for key, value in values.items():
            setattr(user, key, value)
    return change


def cmd_user_disable(args: argparse.Namespace) -> int:
    return _change_user(args, _set(disabled=True), "user_disabled", end_sessions=True)


def cmd_user_enable(args: argparse.Namespace) -> int:
    return _change_user(args, _set(disabled=False), "user_enabled", end_sessions=False)


def cmd_user_passwd(args: argparse.Namespace) -> int:
    from review_web.security import hash_password

    password = _new_password(args)
    if password is None:
        return 1
    return _change_user(args, lambda user: setattr(user, "password_hash", hash_password(password)),
                        "user_password_changed", end_sessions=True)


def cmd_user_token_rotate(args: argparse.Namespace) -> int:
    from review_web.security import new_api_token

    def rotate(user) -> str:
        return f"API token (shown once, keep it safe):\n{new_api_token(user)}"

    return _change_user(args, rotate, "user_token_rotated", end_sessions=True)


def cmd_user_token_revoke(args: argparse.Namespace) -> int:
    return _change_user(args, _set(api_token_hash=None), "user_token_revoked", end_sessions=False)
