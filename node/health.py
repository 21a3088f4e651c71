"""The node's health as an administrator sees it: one snapshot for the health page, /api/health, /healthz and /metrics.

Everything is read from the database and the machine. One collection (about a
dozen queries) is reused for `web.health_cache_s` seconds by `CachedHealth`, so
the cost of /healthz, /metrics and the health pages is bounded however often
they are called; concurrent requests wait for the collection in progress. The
node is `degraded` when a job waits in FAILED_DELIVERY or the data folder's
disk is almost full.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import psutil
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from config.settings import Settings
from inference.types import ModelIdentity
from node.store.db import Delivery, DeliveryState, Job, JobState, utcnow
from node.store.review import open_reviews
from node.store.runs import latest_drift

DISK_LOW_FRACTION = 0.05
LATENCY_WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class DestinationFailures:
    """Failed deliveries to one destination: the jobs to re-send and the last error."""

    destination: str
    jobs: list[int]
    last_error: str | None


@dataclass(frozen=True)
class Health:
    status: str  # "ok" or "degraded"
    problems: list[str]
    ae_title: str
    port: int
    model: str | None
    jobs_by_state: dict[str, int]
    not_processed: dict[str, int]  # "SKIPPED lateral_view" -> count
    queue_depth: int
    oldest_waiting_s: float | None
    open_reviews: int
    latency_count: int
    latency_median_s: float | None
    latency_p95_s: float | None
    delivery_failures: list[DestinationFailures]
    usage_by_calling_ae: dict[str, int]
    disk_free_bytes: int
    disk_total_bytes: int
    cpu_percent: float
    memory_percent: float
    process_rss_bytes: int
    gpu: str | None = field(default=None)
    drift: str | None = field(default=None)  # the last drift check: outcome, when, breaches


def collect_health(settings: Settings, sessions: sessionmaker, identity: ModelIdentity | None = None) -> Health:
    """A snapshot of the node; `identity` is the model in service (else the latest job's)."""
    now = utcnow()
    waiting = [JobState.RECEIVED, JobState.RUNNING, JobState.DELIVERING]
    if settings.destinations:  # without destinations ENCODED is where results stay
        waiting.append(JobState.ENCODED)
    with sessions() as session:
        by_state = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        reasons = session.execute(select(Job.state, Job.reason).where(
            Job.state.in_([JobState.SKIPPED, JobState.REJECTED]))).all()
        oldest = session.scalar(select(func.min(Job.received_at)).where(Job.state.in_(waiting)))
        latencies = [(finished - received).total_seconds() for received, finished in session.execute(
            select(Job.received_at, Job.finished_at).where(
                Job.state == JobState.SENT, Job.finished_at >= now - LATENCY_WINDOW)).all()]
        failures = session.execute(
            select(Delivery.destination, Delivery.job_id, Delivery.last_error)
            .join(Job).where(Delivery.state == DeliveryState.FAILED, Job.state == JobState.FAILED_DELIVERY)
            .order_by(Delivery.destination, Delivery.job_id)).all()
        usage = dict(session.execute(select(Job.calling_aet, func.count()).group_by(Job.calling_aet)
                                     .order_by(Job.calling_aet)).all())
        latest = session.execute(select(Job.model_name, Job.model_version).where(Job.model_version.is_not(None))
                                 .order_by(Job.encoded_at.desc(), Job.id.desc()).limit(1)).first()
        reviews = open_reviews(session)
    not_processed: dict[str, int] = {}
    for state, reason in reasons:
        key = f"{state.value} {(reason or 'unknown').split(':', 1)[0]}"
        not_processed[key] = not_processed.get(key, 0) + 1
    destinations: dict[str, DestinationFailures] = {}
    for destination, job_id, error in failures:
        entry = destinations.setdefault(destination, DestinationFailures(destination, [], error))
        entry.jobs.append(job_id)
    disk = shutil.disk_usage(settings.node.data_dir if settings.node.data_dir.exists() else ".")
    problems = []
    if by_state.get(JobState.FAILED_DELIVERY):
        problems.append(f"{by_state[JobState.FAILED_DELIVERY]} job(s) failed delivery")
    if disk.free < DISK_LOW_FRACTION * disk.total:
        problems.append("disk of the data folder almost full")
    model = f"{identity.name} {identity.version}" if identity else (
        f"{latest.model_name} {latest.model_version}" if latest else None)
    return Health(
        status="degraded" if problems else "ok", problems=problems,
        ae_title=settings.node.ae_title, port=settings.node.port, model=model,
        jobs_by_state={state.value: by_state.get(state, 0) for state in JobState},
        not_processed=dict(sorted(not_processed.items())),
        queue_depth=sum(by_state.get(state, 0) for state in waiting),
        oldest_waiting_s=(now - oldest).total_seconds() if oldest else None,
        open_reviews=reviews,
        latency_count=len(latencies),
        latency_median_s=float(np.median(latencies)) if latencies else None,
        latency_p95_s=float(np.percentile(latencies, 95)) if latencies else None,
        delivery_failures=list(destinations.values()),
        usage_by_calling_ae=usage,
        disk_free_bytes=disk.free, disk_total_bytes=disk.total,
        cpu_percent=psutil.cpu_percent(interval=None), memory_percent=psutil.virtual_memory().percent,
        process_rss_bytes=psutil.Process().memory_info().rss,
        gpu=_gpu(),
        drift=_last_drift(sessions),
    )


def _last_drift(sessions: sessionmaker) -> str | None:
    run = latest_drift(sessions)
    if run is None:
        return None
    when = run["finished_at"].strftime("%Y-%m-%d %H:%M UTC")
    breaches = run["summary"].get("breaches") or []
    return f"{run['outcome']} ({when})" + (": " + "; ".join(breaches) if breaches else "")


def _gpu() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return f"{torch.cuda.get_device_name()} ({(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB in use)"


class CachedHealth:
    """`collect_health` at most once per `ttl_s` (0: every call); `invalidate()` after a change the next
    reader must see. A failed collection is not kept."""

    def __init__(self, settings: Settings, sessions: sessionmaker, identity: ModelIdentity | None, ttl_s: float
                 ) -> None:
        self._args, self._ttl = (settings, sessions, identity), ttl_s
        self._lock = threading.Lock()
        self._health: Health | None = None
        self._at = 0.0

    def __call__(self) -> Health:
        with self._lock:
            if self._health is None or time.monotonic() - self._at >= self._ttl:
                self._health = collect_health(*self._args)
                self._at = time.monotonic()
            return self._health

    def invalidate(self) -> None:
        with self._lock:
            self._health = None


class HealthCollector:
    """prometheus-client collector: gauges from `health()` (a `CachedHealth`) on every scrape."""

    def __init__(self, health: Callable[[], Health]) -> None:
        self._health = health

    def collect(self) -> Iterator[GaugeMetricFamily]:
        health = self._health()
        jobs = GaugeMetricFamily("smartnodule_jobs", "Jobs by state", labels=["state"])
        for state, count in health.jobs_by_state.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily("smartnodule_queue_depth", "Jobs waiting to be processed or delivered",
                                value=health.queue_depth)
        yield GaugeMetricFamily("smartnodule_oldest_waiting_seconds", "Age of the oldest waiting job",
                                value=health.oldest_waiting_s or 0.0)
        yield GaugeMetricFamily("smartnodule_open_reviews", "Flagged jobs without a final verdict",
                                value=health.open_reviews)
        failed = GaugeMetricFamily("smartnodule_deliveries_failed", "Failed deliveries by destination",
                                   labels=["destination"])
        for entry in health.delivery_failures:
            failed.add_metric([entry.destination], len(entry.jobs))
        yield failed
        yield GaugeMetricFamily("smartnodule_disk_free_bytes", "Free disk of the data folder",
                                value=health.disk_free_bytes)
        yield GaugeMetricFamily("smartnodule_up", "1 when the node is ok, 0 when degraded",
                                value=1.0 if health.status == "ok" else 0.0)
