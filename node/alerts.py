"""Alerts to administrators: a JSON webhook and/or an e-mail when the node needs attention.

Owns the alert conditions and their delivery. Conditions, checked on the
health snapshot every `alerts.check_interval_s`: jobs that failed delivery to a
destination (`failed_jobs_per_destination`), too many waiting jobs
(`queue_depth_max`), little free disk (`disk_free_min_gb`). An alert still true
is sent again after `repeat_after_s`. A failed send is logged, never raised.
"""
from __future__ import annotations

import json
import smtplib
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from email.message import EmailMessage

import structlog
from sqlalchemy.orm import sessionmaker

from config.settings import Settings
from node.health import Health, collect_health

log = structlog.get_logger(__name__)

SEND_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Alert:
    """One condition that needs an administrator; `key` identifies it for repeat suppression."""

    key: str
    summary: str
    detail: str


def evaluate(settings: Settings, health: Health) -> list[Alert]:
    """The alert conditions that hold in `health`."""
    limits = settings.alerts
    alerts = [Alert(f"delivery_failed:{entry.destination}",
                    f"{len(entry.jobs)} job(s) failed delivery to {entry.destination}",
                    f"jobs {', '.join(map(str, entry.jobs))}; last error: {entry.last_error or 'unknown'}")
              for entry in health.delivery_failures if len(entry.jobs) >= limits.failed_jobs_per_destination]
    if health.queue_depth > limits.queue_depth_max:
        oldest = f"{health.oldest_waiting_s / 60:.0f} min" if health.oldest_waiting_s else "unknown"
        alerts.append(Alert("queue_depth", f"{health.queue_depth} jobs waiting (limit {limits.queue_depth_max})",
                            f"oldest waiting job: {oldest}"))
    free_gb = health.disk_free_bytes / 2**30
    if free_gb < limits.disk_free_min_gb:
        alerts.append(Alert("disk_low", f"{free_gb:.1f} GiB free on the data folder's disk",
                            f"limit {limits.disk_free_min_gb} GiB of {health.disk_total_bytes / 2**30:.0f} GiB"))
    return alerts


class Alerter:
    """Checks the conditions and sends what is new (or due again); `start()` does so periodically."""

    def __init__(self, settings: Settings, sessions: sessionmaker) -> None:
        self._settings, self._sessions = settings, sessions
        self._sent_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)

    def check(self) -> list[Alert]:
        """Evaluate now and send the alerts due; returns them."""
        now = time.monotonic()
        due = [alert for alert in evaluate(self._settings, collect_health(self._settings, self._sessions))
               if now - self._sent_at.get(alert.key, -float("inf")) >= self._settings.alerts.repeat_after_s]
        for alert in due:
            self.send(alert)
            self._sent_at[alert.key] = now
        return due

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=SEND_TIMEOUT_S * 2)

    def _run(self) -> None:
        while not self._stop.wait(self._settings.alerts.check_interval_s):
            try:
                self.check()
            except Exception as exc:
                log.error("alert_check_failed", error=f"{type(exc).__name__}: {exc}"[:300])

    def send(self, alert: Alert) -> None:
        config, node = self._settings.alerts, self._settings.node.ae_title
        if config.webhook_url:
            body = json.dumps({"node": node, **asdict(alert)}).encode()
            request = urllib.request.Request(config.webhook_url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=SEND_TIMEOUT_S) as response:
                    response.read()
                log.info("alert_sent", alert=alert.key, channel="webhook")
            except OSError as exc:
                log.error("alert_send_failed", alert=alert.key, channel="webhook", error=str(exc)[:300])
        if config.mail_to:
            message = EmailMessage()
            message["Subject"] = f"[{node}] {alert.summary}"
            message["From"], message["To"] = config.mail_from, ", ".join(config.mail_to)
            message.set_content(f"{alert.summary}\n\n{alert.detail}\n\nNode: {node}\n")
            try:
                with smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=SEND_TIMEOUT_S) as smtp:
                    smtp.send_message(message)
                log.info("alert_sent", alert=alert.key, channel="mail")
            except OSError as exc:  # smtplib.SMTPException included
                log.error("alert_send_failed", alert=alert.key, channel="mail", error=str(exc)[:300])
