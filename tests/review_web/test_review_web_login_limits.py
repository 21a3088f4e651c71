"""Login limits that an attacker cannot step around: per username from any address, per address over any
usernames, in total; X-Forwarded-For only from trusted proxies; field and body limits before any hash or log
line; password hashing in threads behind a cap; the limiter's memory bounded."""
from __future__ import annotations

import threading
import time
from ipaddress import ip_network

import anyio
import pytest
from fastapi.testclient import TestClient

from config.settings import WebSettings
from node.audit import AUDIT_FILE, configure_logging
from review_web.app import create_app
from review_web.security import HashGate, HashingBusy, LoginLimiter, client_address
from review_web.server import UVICORN_OPTIONS
from tests.review_web.conftest import PASSWORD, csrf_of

WRONG = "wrong password!!"


def app_with(node, **web):
    settings = node.settings.model_copy(update={"web": node.settings.web.model_copy(update=web)})
    return create_app(settings, node.sessions, node.index)


def attempt(app, username: str, password: str = PASSWORD, address: str = "192.0.2.10", forwarded: str | None = None,
            proxy: str | None = None) -> int:
    client = TestClient(app, base_url="http://127.0.0.1", client=(proxy or address, 40000))
    csrf = csrf_of(client.get("/login").text)
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    return client.post("/login", data={"username": username, "password": password, "csrf_token": csrf},
                       headers=headers, follow_redirects=False).status_code


def test_a_forged_forwarded_for_header_is_ignored(node):
    app = app_with(node)  # login_max_attempts = 3, no trusted proxies
    for i in range(3):
        assert attempt(app, "admin", WRONG, address="127.0.0.1", forwarded=f"203.0.113.{i}") == 401
    assert attempt(app, "admin", address="127.0.0.1", forwarded="203.0.113.99") == 429
    assert client_address("127.0.0.1", "203.0.113.7", []) == "127.0.0.1"
    assert UVICORN_OPTIONS["proxy_headers"] is False


def test_forwarded_for_is_believed_from_a_trusted_proxy_only():
    trusted = [ip_network("10.0.0.0/8")]
    assert client_address("10.1.2.3", "203.0.113.7", trusted) == "203.0.113.7"
    assert client_address("10.1.2.3", "198.51.100.1, 203.0.113.7, 10.9.9.9", trusted) == "203.0.113.7"
    assert client_address("10.1.2.3", "not-an-address", trusted) == "10.1.2.3"
    assert client_address("192.0.2.1", "203.0.113.7", trusted) == "192.0.2.1"


def test_the_lock_holds_across_addresses_per_username(node):
    app = app_with(node, trusted_proxies=[ip_network("10.0.0.0/8")])
    for i in range(3):
        assert attempt(app, "admin", WRONG, proxy="10.0.0.2", forwarded=f"203.0.113.{i}") == 401
    assert attempt(app, "admin", proxy="10.0.0.2", forwarded="198.51.100.77") == 429
    assert attempt(app, "admin", address="192.0.2.200") == 429
    assert attempt(app, "reviewer", address="192.0.2.200") == 303


def test_one_password_across_many_usernames_is_limited(node):
    app = app_with(node, login_max_attempts_per_address=4)
    results = [attempt(app, f"user{i}", WRONG, address="192.0.2.5") for i in range(6)]
    assert results == [401] * 4 + [429] * 2
    assert attempt(app, "reviewer", address="192.0.2.6") == 303  # another address is not blocked

    app = app_with(node, login_max_attempts_total=5, login_tracked_max=100)
    results = [attempt(app, f"user{i}", WRONG, address=f"192.0.2.{i + 1}") for i in range(7)]
    assert results == [401] * 5 + [429] * 2
    assert attempt(app, "reviewer", address="192.0.2.99") == 429  # everyone waits while the flood lasts


def server_lines(log_dir) -> list[str]:
    """The audit lines the server wrote (the test client's own httpx lines left out)."""
    return [line for line in (log_dir / AUDIT_FILE).read_text().splitlines() if '"logger": "httpx' not in line]


def test_a_one_megabyte_username_is_refused_without_growing_the_audit_log(node):
    log_dir = node.settings.log_dir
    configure_logging(log_dir)
    try:
        app = app_with(node)
        client = TestClient(app, base_url="http://127.0.0.1")
        csrf = csrf_of(client.get("/login").text)
        before = server_lines(log_dir)
        huge = client.post("/login", data={"username": "x" * (1 << 20), "password": WRONG, "csrf_token": csrf})
        long_name = client.post("/login", data={"username": "x" * 65, "password": WRONG, "csrf_token": csrf})
        long_password = client.post("/login", data={"username": "admin", "password": "p" * 1025,
                                                     "csrf_token": csrf})
        after = server_lines(log_dir)
    finally:
        configure_logging(None)
    assert (huge.status_code, long_name.status_code, long_password.status_code) == (413, 422, 422)
    assert len(after) - len(before) <= 1 and "x" * 65 not in "".join(after)


def test_the_limiter_memory_is_bounded():
    limiter = LoginLimiter(per_user=3, per_address=10, total=10**6, window_s=300, tracked_max=100)
    for i in range(5000):
        limiter.failed(f"198.51.100.{i % 250}", f"user{i}")
    assert len(limiter) == 100


def test_password_checks_run_in_threads_at_most_n_at_once():
    gate, running, peak, lock = HashGate(concurrency=2, queue_max=3), [0], [0], threading.Lock()
    main_thread = threading.get_ident()

    def check() -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return threading.get_ident()

    outcomes: list = []

    async def one() -> None:
        try:
            outcomes.append(await gate.run(check))
        except HashingBusy:
            outcomes.append("busy")

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(one)

    anyio.run(main)
    assert peak[0] == 2
    assert outcomes.count("busy") == 3  # 2 hashing + 3 waiting admitted, the rest refused at once
    assert main_thread not in outcomes


def test_tracked_max_must_cover_the_total_limit():
    with pytest.raises(ValueError, match="login_tracked_max"):
        WebSettings(login_max_attempts_total=1000, login_tracked_max=1999)
