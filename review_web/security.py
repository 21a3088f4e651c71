"""Who may use the web app and how requests are protected: passwords, API tokens, CSRF, login limits, headers.

Passwords are stored as argon2id hashes; API tokens are random 256-bit strings
stored as SHA-256 (a token is looked up by its hash). CSRF tokens live in the
signed session cookie and must come back with every form post.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from review_web.models import Role, User

MIN_PASSWORD_LENGTH = 12
MIN_SECRET_KEY_LENGTH = 32
SECURITY_HEADERS = (
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'; "
     b"base-uri 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def check_password(user: User | None, password: str) -> bool:
    """True when `password` is `user`'s; without a user a hash is still computed (same timing)."""
    try:
        return _hasher.verify(user.password_hash if user else _DUMMY_HASH, password) and user is not None
    except (VerificationError, InvalidHashError):
        return False


_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(session: Session, username: str, role: Role, password: str) -> str:
    """Add a user; returns their API token (shown once, only its hash is stored)."""
    if not username or len(username) > 64 or not username.isprintable() or username.strip() != username:
        raise ValueError(f"username must be 1-64 printable characters without surrounding spaces, got {username!r}")
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise ValueError(f"username {username!r} already exists")
    token = secrets.token_urlsafe(32)
    session.add(User(username=username, role=role, password_hash=hash_password(password),
                     api_token_hash=token_hash(token)))
    return token


def user_by_token(session: Session, token: str) -> User | None:
    return session.scalar(select(User).where(User.api_token_hash == token_hash(token)))


def csrf_token(session: dict) -> str:
    """The session's CSRF token, created on first use."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def csrf_valid(session: dict, submitted: str | None) -> bool:
    expected = session.get("csrf")
    return bool(expected and submitted) and hmac.compare_digest(expected, submitted)


class LoginLimiter:
    """At most `max_attempts` failed logins per (client IP, username) within `window_s`."""

    def __init__(self, max_attempts: int, window_s: float) -> None:
        self._max, self._window = max_attempts, window_s
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, ip: str, username: str) -> bool:
        with self._lock:
            return len(self._recent((ip, username))) >= self._max

    def failed(self, ip: str, username: str) -> None:
        with self._lock:
            self._recent((ip, username)).append(time.monotonic())

    def succeeded(self, ip: str, username: str) -> None:
        with self._lock:
            self._failures.pop((ip, username), None)

    def _recent(self, key: tuple[str, str]) -> deque[float]:
        failures = self._failures.setdefault(key, deque())
        while failures and failures[0] < time.monotonic() - self._window:
            failures.popleft()
        return failures


class SecurityHeaders:
    """ASGI middleware adding `SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)
