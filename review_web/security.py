"""Who may use the web app and how requests are protected: passwords, API tokens, sessions, CSRF, login limits,
client addresses behind proxies, request size, headers.

Passwords are stored as argon2id hashes, checked in worker threads behind a
concurrency cap (`HashGate`); API tokens are random 256-bit strings stored as
SHA-256 (a token is looked up by its hash). A login is a row of `web_sessions`
(server-side): the signed cookie carries only its random id and the CSRF
token, so deleting the row ends every copy of the cookie. CSRF tokens must come
back with every form post.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import TypeVar, cast

import anyio
import anyio.to_thread
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.store.db import utcnow
from node.store.review import Role, User, WebSession

MIN_PASSWORD_LENGTH = 12
MAX_USERNAME_LENGTH = 64
MAX_PASSWORD_LENGTH = 1024  # longer fields are refused (422) before any hash or log line
MAX_TOKEN_LENGTH = 256
MAX_FORWARDED_HOPS = 8
SEEN_RESOLUTION_S = 30  # a session's last request time is written at most this often
T = TypeVar("T")
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
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise ValueError(f"password must have {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters")
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
    if not username or len(username) > MAX_USERNAME_LENGTH or not username.isprintable() or username.strip() != username:
        raise ValueError(f"username must be 1-64 printable characters without surrounding spaces, got {username!r}")
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise ValueError(f"username {username!r} already exists")
    user = User(username=username, role=role, password_hash=hash_password(password))
    token = new_api_token(user)
    session.add(user)
    return token


def new_api_token(user: User) -> str:
    """Give `user` a new random API token (the old one stops working); returns it, only its hash is stored."""
    token = secrets.token_urlsafe(32)
    user.api_token_hash = token_hash(token)
    return token


def user_by_token(session: Session, token: str) -> User | None:
    """The enabled user whose API token this is."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    return session.scalar(select(User).where(User.api_token_hash == token_hash(token), User.disabled.is_(False)))


def csrf_token(session: dict) -> str:
    """The session's CSRF token, created on first use."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def csrf_valid(session: dict, submitted: str | None) -> bool:
    expected = session.get("csrf")
    if not isinstance(expected, str) or not expected or not submitted:
        return False
    return hmac.compare_digest(expected, submitted)


class LoginLimiter:
    """Failed logins counted per username (from any address), per client address (any username) and in total.

    Each count is a sliding window of `window_s`. Memory is bounded: at most
    `tracked_max` usernames and addresses are remembered (least recently seen
    forgotten first; the settings keep this above twice the total limit, so
    nothing still inside a window is forgotten), each with at most its limit of
    timestamps. A success clears its username's failures, never its address's.
    """

    def __init__(self, per_user: int, per_address: int, total: int, window_s: float, tracked_max: int) -> None:
        self._limits = {"username": per_user, "address": per_address}
        self._window, self._tracked_max = window_s, tracked_max
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._total: deque[float] = deque(maxlen=total)
        self._lock = threading.Lock()

    def blocked(self, address: str, username: str) -> str | None:
        """The limit an attempt from `address` for `username` would exceed ("username", "address", "total")."""
        now = time.monotonic()
        with self._lock:
            for kind, key in (("username", username), ("address", address)):
                if len(self._recent((kind, key), now)) >= self._limits[kind]:
                    return kind
            self._expire(self._total, now)
            return "total" if len(self._total) == self._total.maxlen else None

    def failed(self, address: str, username: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (("username", username), ("address", address)):
                self._recent(key, now).append(now)
            self._total.append(now)

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(("username", username), None)

    def __len__(self) -> int:
        return len(self._failures)

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        failures = self._failures.get(key)
        if failures is None:
            failures = self._failures[key] = deque(maxlen=self._limits[key[0]])
            while len(self._failures) > self._tracked_max:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(key)
        self._expire(failures, now)
        return failures

    def _expire(self, failures: deque[float], now: float) -> None:
        while failures and failures[0] < now - self._window:
            failures.popleft()


def client_address(peer: str | None, forwarded_for: str | None, trusted: list[IPv4Network | IPv6Network]) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy, the nearest untrusted hop of
    `X-Forwarded-For` (read from the right; a hop that is not an IP address ends the walk at the proxy)."""
    if peer is None:
        return "unknown"
    if not forwarded_for or not _is_trusted(peer, trusted):
        return peer
    address = peer
    for hop in reversed(forwarded_for.split(",")[-MAX_FORWARDED_HOPS:]):
        try:
            address = str(ip_address(hop.strip()))
        except ValueError:
            return address
        if not _is_trusted(address, trusted):
            return address
    return address


def _is_trusted(address: str, trusted: list[IPv4Network | IPv6Network]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip.version == network.version and ip in network for network in trusted)


class HashingBusy(Exception):
    """More logins wait for a password hash than `password_hash_queue_max`."""


class HashGate:
    """Runs password checks in worker threads, at most `concurrency` at once (argon2 takes 64 MiB and tens of
    milliseconds each); at most `queue_max` more wait, further ones raise `HashingBusy` at once."""

    def __init__(self, concurrency: int, queue_max: int) -> None:
        self._concurrency, self._queue_max = concurrency, queue_max
        self._limiter: anyio.CapacityLimiter | None = None  # made inside the event loop, on first use
        self._admitted = 0  # hashing or waiting; only touched from the event loop's thread

    async def run(self, function: Callable[..., T], *args) -> T:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._concurrency)
        if self._admitted >= self._concurrency + self._queue_max:
            raise HashingBusy()
        self._admitted += 1
        try:
            return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)
        finally:
            self._admitted -= 1


def open_session(session: Session, user: User) -> str:
    """A new login of `user`: returns the id for the cookie (only its SHA-256 is stored); the caller commits."""
    token = secrets.token_urlsafe(32)
    session.add(WebSession(id_hash=token_hash(token), user_id=user.id, created_at=utcnow(), last_seen_at=utcnow()))
    return token


def session_user(session: Session, token: str, max_age_s: float, idle_s: float) -> User | None:
    """The enabled user of a live session; an expired (absolute or idle) session is deleted. Refreshes the
    session's last request time (at most every `SEEN_RESOLUTION_S`). The caller commits."""
    row = session.get(WebSession, token_hash(token))
    if row is None:
        return None
    now = utcnow()
    user = session.get(User, row.user_id)
    if (user is None or user.disabled or now - row.created_at > timedelta(seconds=max_age_s)
            or now - row.last_seen_at > timedelta(seconds=idle_s)):
        session.delete(row)
        return None
    if now - row.last_seen_at > timedelta(seconds=SEEN_RESOLUTION_S):
        row.last_seen_at = now
    return user


def end_session(session: Session, token: str) -> None:
    session.execute(delete(WebSession).where(WebSession.id_hash == token_hash(token)))


def end_all_sessions(session: Session, user: User) -> int:
    """End every login of `user` (password change, disable, token rotation); returns how many ended."""
    ended = cast(CursorResult, session.execute(delete(WebSession).where(WebSession.user_id == user.id)))  # DML result
    return ended.rowcount


class BodyLimit:
    """ASGI middleware refusing (413) a request body over `max_bytes` before it is read: by its Content-Length,
    or, for a chunked body, as soon as the chunks pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            await _too_large(send)
            return
        seen, started = 0, False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _TooLarge:
            if not started:
                await _too_large(send)


class _TooLarge(Exception):
    pass


async def _too_large(send: Send) -> None:
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain"), (b"connection", b"close"), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": b"request body too large"})


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
