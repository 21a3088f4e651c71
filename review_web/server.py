"""The web app served by uvicorn in a daemon thread of the node process (`smartnodule run` with web.enabled)."""
from __future__ import annotations

import threading
import time
from typing import TypedDict

import structlog
import uvicorn
from sqlalchemy.orm import sessionmaker

from config.settings import Settings
from inference.types import ModelIdentity
from retrieval.index import CaseIndex
from review_web.app import create_app

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 30.0
# uvicorn would believe X-Forwarded-For from 127.0.0.1 (proxy_headers); the app decides itself, from
# web.trusted_proxies only (review_web.security.client_address).
class UvicornOptions(TypedDict):
    """The keyword arguments both ways of serving the app give uvicorn (`uvicorn.Config`, `uvicorn.run`)."""

    log_config: None
    access_log: bool
    log_level: str
    proxy_headers: bool
    server_header: bool


UVICORN_OPTIONS = UvicornOptions(log_config=None, access_log=False, log_level="warning", proxy_headers=False,
                                 server_header=False)


class WebServer:
    """`start()` serves the app on web.host:web.port and returns once it accepts connections; `stop()` ends it."""

    def __init__(self, settings: Settings, sessions: sessionmaker, index: CaseIndex | None = None,
                 identity: ModelIdentity | None = None) -> None:
        app = create_app(settings, sessions, index, identity)
        self._host, self._port = settings.web.host, settings.web.port
        self._server = uvicorn.Server(uvicorn.Config(app, host=self._host, port=self._port, **UVICORN_OPTIONS))
        self._thread = threading.Thread(target=self._server.run, name="review-web", daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the web app could not listen on {self._host}:{self._port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the web app did not start on {self._host}:{self._port} "
                                   f"within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        log.info("web_app_started", host=self._host, port=self._port)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        log.info("web_app_stopped", host=self._host, port=self._port)
