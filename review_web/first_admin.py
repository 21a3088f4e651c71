"""Owns the first administrator of a new node: made when the web app starts, from `web.admin_password_file`
(compose mounts a Docker secret there), only while no user exists.

Later starts change nothing: once anyone has an account, users are managed with `smartnodule user ...` and the
file is not read again. The password is read from the file, hashed by `review_web.security.create_user` (the code
behind `smartnodule user add`) and appears in no log, message or exception; the API token that create_user makes
is not shown (`smartnodule user token-rotate admin` makes one when needed).
"""
from __future__ import annotations

import structlog
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from config.settings import Settings, SettingsError
from node.store.review import User
from node.store.roles import Role
from review_web.security import create_user

log = structlog.get_logger(__name__)


def ensure_first_admin(settings: Settings, sessions: sessionmaker) -> bool:
    """Create the administrator `web.admin_username` when `web.admin_password_file` is set and no user exists;
    True when it was created. An unusable password file raises SettingsError naming the setting."""
    path = settings.web.admin_password_file
    if path is None:
        return False
    with sessions.begin() as session:
        if session.scalar(select(User.id).limit(1)) is not None:
            return False
        try:
            password = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"web.admin_password_file {path} cannot be read "
                                f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
        try:
            create_user(session, settings.web.admin_username, Role.ADMIN, password)
        except ValueError as exc:
            raise SettingsError(f"web.admin_password_file {path}: {exc}") from None
    log.info("user_added", username=settings.web.admin_username, role=Role.ADMIN.value,
             actor="web.admin_password_file")
    return True
