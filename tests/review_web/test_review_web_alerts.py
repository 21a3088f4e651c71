"""Alerts reach a webhook receiver and an SMTP receiver on 127.0.0.1, once per condition."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller

from config.settings import AlertSettings
from node.orthanc_peer import free_port
from node.alerts import Alerter


@pytest.fixture
def webhook():
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    server.shutdown()
    server.server_close()


@pytest.fixture
def smtp():
    messages: list = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            messages.append(envelope)
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller.port, messages
    controller.stop()


def test_alerts_by_webhook_and_mail_once_per_condition(node, webhook, smtp):
    url, posted = webhook
    port, mails = smtp
    alerts = AlertSettings(webhook_url=url, smtp_host="127.0.0.1", smtp_port=port, mail_from="node@example.org",
                           mail_to=["admin@example.org"], disk_free_min_gb=1e9)  # any disk is "low"
    alerter = Alerter(node.settings.model_copy(update={"alerts": alerts}), node.sessions)
    sent = alerter.check()
    assert sorted(a.key for a in sent) == ["delivery_failed:pacs", "disk_low"]
    assert sorted(p["key"] for p in posted) == ["delivery_failed:pacs", "disk_low"]
    failed = next(p for p in posted if p["key"] == "delivery_failed:pacs")
    assert failed["node"] == "SMARTNODULE" and "association rejected" in failed["detail"]
    assert [m.rcpt_tos for m in mails] == [["admin@example.org"]] * 2
    assert b"Subject: [SMARTNODULE] 1 job(s) failed delivery to pacs" in b"".join(m.content for m in mails)
    assert alerter.check() == []  # still true, but not due again yet
    assert len(posted) == 2 and len(mails) == 2


def test_unreachable_receivers_are_logged_not_raised(node):
    alerts = AlertSettings(webhook_url=f"http://127.0.0.1:{free_port()}/", smtp_host="127.0.0.1",
                           smtp_port=free_port(), mail_from="node@example.org", mail_to=["admin@example.org"])
    alerter = Alerter(node.settings.model_copy(update={"alerts": alerts}), node.sessions)
    assert [a.key for a in alerter.check()] == ["delivery_failed:pacs"]


def test_mail_needs_a_relay_and_sender():
    with pytest.raises(ValueError, match="mail_to needs smtp_host and mail_from"):
        AlertSettings(mail_to=["admin@example.org"])
