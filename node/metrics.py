"""Prometheus metrics of one node process, in every role (run, scp, worker, web, scheduler), and their listener.

Two kinds, both following Prometheus naming (base units, `_total` for counters):
- Events, counted where they happen in this process and kept in `REGISTRY` (ours, not prometheus-client's
  global one): C-STORE answers by calling AE and status (scp), jobs finished by state, seconds per pipeline
  stage and deliveries by destination and outcome (workers), the model in service.
- Gauges read from the shared database at scrape time (`node.health.HealthCollector`: queue depth by state,
  jobs that failed delivery, scheduler last success, drift PSI...): one bounded collection, reused for
  `web.health_cache_s`. Every role exports them, so dashboards and alert rules take `max()` over instances.

`serve_metrics` starts the listener on `[metrics] host:port` (every path answers the exposition); two roles on
one machine need two ports, and a port in use stops the start with one line naming `metrics.port`. Labels carry
AE titles, destination names, states, stages, job names and model identity only: never a UID or patient data.
"""
from __future__ import annotations

from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client import disable_created_metrics
from prometheus_client.registry import Collector
from sqlalchemy.orm import sessionmaker

from config.settings import Settings, SettingsError
from inference.types import ModelIdentity
from node.health import CachedHealth, HealthCollector
from node.store.db import TERMINAL, JobState

log = structlog.get_logger(__name__)

disable_created_metrics()  # no `_created` series beside every counter: dashboards and rules never read them

# Queueing can take minutes, a stage milliseconds: buckets from 10 ms to 30 min.
STAGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
FINISHED_STATES = sorted(state.value for state in TERMINAL | {JobState.ENCODED})

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, process_start_time_seconds
INSTANCES_RECEIVED = Counter(
    "smartnodule_instances_received", "C-STORE requests answered, by calling AE title and DIMSE status (0x0000: stored)",
    ["calling_ae", "status"], registry=REGISTRY)
JOBS_FINISHED = Counter(
    "smartnodule_jobs_finished", "Jobs that reached an end state (ENCODED: results kept, no destination configured)",
    ["state"], registry=REGISTRY)
STAGE_SECONDS = Histogram(
    "smartnodule_stage_seconds", "Seconds per pipeline stage (queued, read, preprocess, predict, similar, encode, deliver)",
    ["stage"], buckets=STAGE_BUCKETS, registry=REGISTRY)
DELIVERIES = Counter(
    "smartnodule_deliveries", "Delivery attempts of one job's results to one destination, by outcome (sent, failed)",
    ["destination", "status"], registry=REGISTRY)
MODEL_INFO = Gauge(
    "smartnodule_model_info", "The model in service in this process (value 1)", ["name", "version", "sha256"],
    registry=REGISTRY)
for _state in FINISHED_STATES:  # every series exists from the start, so rate() sees the first increase
    JOBS_FINISHED.labels(_state)


def received(calling_ae: str, status: int) -> None:
    """One C-STORE request answered with `status`."""
    INSTANCES_RECEIVED.labels(calling_ae, f"0x{status:04X}").inc()


def finished(state: JobState) -> None:
    JOBS_FINISHED.labels(state.value).inc()


def stages(seconds: dict[str, float]) -> None:
    """The seconds of each stage of one attempt, as written on the job row."""
    for stage, value in seconds.items():
        STAGE_SECONDS.labels(stage).observe(value)


def delivered(destination: str, ok: bool) -> None:
    DELIVERIES.labels(destination, "sent" if ok else "failed").inc()


def destinations_known(names: Iterable[str]) -> None:
    """Create the delivery series of configured destinations at zero."""
    for name in names:
        for status in ("sent", "failed"):
            DELIVERIES.labels(name, status)


def model_in_service(identity: ModelIdentity) -> None:
    """`smartnodule_model_info` names `identity`, and only it (called per job: the champion may change)."""
    labels = (identity.name, identity.version, identity.weights_sha256)
    if _IN_SERVICE.get("labels") != labels:
        MODEL_INFO.clear()
        MODEL_INFO.labels(*labels).set(1)
        _IN_SERVICE["labels"] = labels


_IN_SERVICE: dict[str, tuple[str, str, str]] = {}


class _Events(Collector):
    """This process's event metrics, inside a listener's registry."""

    def collect(self):
        return REGISTRY.collect()


class MetricsServer:
    """`start()` serves this process's metrics and the database gauges on metrics.host:metrics.port."""

    def __init__(self, settings: Settings, sessions: sessionmaker, identity: ModelIdentity | None = None) -> None:
        self._host, self._port = settings.metrics.host, settings.metrics.port
        self.registry = CollectorRegistry()
        self.registry.register(_Events())
        self.registry.register(HealthCollector(CachedHealth(settings, sessions, identity, settings.web.health_cache_s)))
        self._httpd: WSGIServer | None = None

    def start(self) -> None:
        try:
            self._httpd, _ = start_http_server(self._port, addr=self._host, registry=self.registry)
        except OSError as exc:
            raise SettingsError(
                f"metrics.port {self._port} on {self._host} cannot be used ({exc.strerror or exc}); two roles on one "
                f"machine need different ports, e.g. SMARTNODULE_METRICS__PORT={self._port + 1}") from None
        log.info("metrics_started", host=self._host, port=self._port)

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            log.info("metrics_stopped", host=self._host, port=self._port)


def serve_metrics(settings: Settings, sessions: sessionmaker, identity: ModelIdentity | None = None
                  ) -> MetricsServer | None:
    """Start the metrics listener when `[metrics] enabled`; None when it is off."""
    if not settings.metrics.enabled:
        return None
    server = MetricsServer(settings, sessions, identity)
    server.start()
    return server
