"""The node's health as an administrator sees it: one snapshot for the health page, /api/health, /healthz and /metrics.

Everything is read from the database and the machine. One collection (about a
dozen queries) is reused for `web.health_cache_s` seconds by `CachedHealth`, so
the cost of /healthz, /metrics and the health pages is bounded however often
they are called; concurrent requests wait for the collection in progress. The
node is `degraded` when a job waits in FAILED_DELIVERY or the data folder's
disk is almost full. `history` gives the health page the last 24 hours by hour
(received, queue depth, latency), from the newest `HISTORY_JOBS` job rows only.

CPU: `psutil.cpu_percent(interval=None)` compares with the previous call of the
same thread (psutil 7 keys its reference by thread id), so a first call answers 0.0;
the web app's sync routes run on a pool of threads, and the health page showed
"CPU 0 %" on every load (measured: 0 % at once and 2 s later with a core busy).
`CPU` is one daemon thread that measures fixed
`CPU_SAMPLE_S` windows instead: the figure means "the last 5 s" however often the
page is read, and is None (shown as "measuring") only in the first second after
the web app or metrics listener started.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import psutil
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from config.settings import Settings
from inference.types import ModelIdentity
from node.store.db import Delivery, DeliveryState, Job, JobState, utcnow
from node.store.review import open_reviews
from node.store.runs import RunOutcome, SchedulerRun, latest_drift

DISK_LOW_FRACTION = 0.05
LATENCY_WINDOW = timedelta(hours=1)
CPU_SAMPLE_S = 5.0
HISTORY_JOBS = 20000  # the health page's 24 hours are read from at most this many newest job rows


class CpuSampler:
    """System CPU use over the last `CPU_SAMPLE_S`, measured by one daemon thread started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._percent: float | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._sample, name="cpu-sampler", daemon=True)
                self._thread.start()

    def percent(self) -> float | None:
        self.start()
        return self._percent

    def _sample(self) -> None:
        interval = 1.0  # a first figure soon after start, then steady windows
        while True:
            self._percent = psutil.cpu_percent(interval=interval)
            interval = CPU_SAMPLE_S


CPU = CpuSampler()


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
    queue_by_state: dict[str, int]  # the waiting states (RECEIVED, RUNNING, DELIVERING, ENCODED with destinations)
    oldest_waiting_s: float | None
    open_reviews: int
    latency_count: int
    latency_median_s: float | None
    latency_p95_s: float | None
    delivery_failures: list[DestinationFailures]
    usage_by_calling_ae: dict[str, int]
    disk_free_bytes: int
    disk_total_bytes: int
    cpu_percent: float | None  # None: the first sample is not taken yet
    memory_percent: float
    process_rss_bytes: int
    gpu: str | None = field(default=None)
    drift: str | None = field(default=None)  # the last drift check: outcome, when, breaches
    drift_psi: dict[str, float] = field(default_factory=dict)  # the last judged drift check's PSI per figure
    drift_breaches: int | None = field(default=None)  # ... and its breaches (None: never ran)
    scheduler_last_success: dict[str, float] = field(default_factory=dict)  # job -> Unix time of its last ok/breach


def waiting_states(settings: Settings) -> list[JobState]:
    """The states of jobs still to be processed or delivered (without destinations ENCODED is where results stay)."""
    waiting = [JobState.RECEIVED, JobState.RUNNING, JobState.DELIVERING]
    return waiting + [JobState.ENCODED] if settings.destinations else waiting


def collect_health(settings: Settings, sessions: sessionmaker, identity: ModelIdentity | None = None) -> Health:
    """A snapshot of the node; `identity` is the model in service (else the latest job's)."""
    now = utcnow()
    waiting = waiting_states(settings)
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
        successes = session.execute(select(SchedulerRun.job, func.max(SchedulerRun.finished_at))
                                    .where(SchedulerRun.outcome.in_([RunOutcome.OK, RunOutcome.BREACH]))
                                    .group_by(SchedulerRun.job)).all()
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
    drift = latest_drift(sessions)
    return Health(
        status="degraded" if problems else "ok", problems=problems,
        ae_title=settings.node.ae_title, port=settings.node.port, model=model,
        jobs_by_state={state.value: by_state.get(state, 0) for state in JobState},
        not_processed=dict(sorted(not_processed.items())),
        queue_depth=sum(by_state.get(state, 0) for state in waiting),
        queue_by_state={state.value: by_state.get(state, 0) for state in waiting},
        oldest_waiting_s=(now - oldest).total_seconds() if oldest else None,
        open_reviews=reviews,
        latency_count=len(latencies),
        latency_median_s=float(np.median(latencies)) if latencies else None,
        latency_p95_s=float(np.percentile(latencies, 95)) if latencies else None,
        delivery_failures=list(destinations.values()),
        usage_by_calling_ae=usage,
        disk_free_bytes=disk.free, disk_total_bytes=disk.total,
        cpu_percent=CPU.percent(), memory_percent=psutil.virtual_memory().percent,
        process_rss_bytes=psutil.Process().memory_info().rss,
        gpu=_gpu(),
        drift=_drift_line(drift),
        drift_psi={name: figures["psi"] for name, figures in (drift["summary"].get("figures") or {}).items()
                   if isinstance(figures, dict) and "psi" in figures} if drift else {},
        drift_breaches=len(drift["summary"].get("breaches") or []) if drift else None,
        scheduler_last_success={job: at.timestamp() for job, at in successes if at is not None},
    )


def _drift_line(run: dict | None) -> str | None:
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
        CPU.start()  # the app or listener starts now: its first page or scrape finds a measured CPU figure
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
        yield _labelled("smartnodule_jobs", "Jobs in the database by state", "state", health.jobs_by_state)
        yield _labelled("smartnodule_queue_depth", "Jobs waiting to be processed or delivered, by state", "state",
                        health.queue_by_state)
        yield GaugeMetricFamily("smartnodule_oldest_waiting_seconds", "Age of the oldest waiting job",
                                value=health.oldest_waiting_s or 0.0)
        yield GaugeMetricFamily("smartnodule_open_reviews", "Flagged jobs without a final verdict",
                                value=health.open_reviews)
        yield _labelled("smartnodule_jobs_failed_delivery", "Jobs in FAILED_DELIVERY, by the destination that failed",
                        "destination", {entry.destination: len(entry.jobs) for entry in health.delivery_failures})
        yield GaugeMetricFamily("smartnodule_disk_free_bytes", "Free disk of the data folder",
                                value=health.disk_free_bytes)
        yield GaugeMetricFamily("smartnodule_healthy", "1 when the node is ok, 0 when degraded (failed deliveries, "
                                "disk almost full)", value=1.0 if health.status == "ok" else 0.0)
        yield _labelled("smartnodule_scheduler_last_success_timestamp_seconds",
                        "Unix time a scheduled job last finished ok (or found a drift breach); the label is not `job`, "
                        "which Prometheus gives every target", "scheduled_job",
                        health.scheduler_last_success)
        yield _labelled("smartnodule_drift_psi", "Population stability index of the last drift check, by figure",
                        "figure", health.drift_psi)
        if health.drift_breaches is not None:
            yield GaugeMetricFamily("smartnodule_drift_breaches", "Breaches found by the last drift check",
                                    value=health.drift_breaches)


def _labelled(name: str, documentation: str, label: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def _left_at(row, waiting: list[JobState], settings: Settings) -> datetime | None:
    """When a job left the queue: finished (without destinations: encoded); None while it waits."""
    left = row.finished_at or (None if settings.destinations else row.encoded_at)
    return left if left is not None or row.state in waiting else row.updated_at


@dataclass(frozen=True)
class Hour:
    """One hour of the health page's last 24: instances received, queue depth at its end, receipt-to-done latency."""

    start: datetime
    received: int
    queue_depth: int
    done: int
    latency_median_s: float | None
    latency_p95_s: float | None


def history(settings: Settings, sessions: sessionmaker, hours: int = 24) -> list[Hour]:
    """The last `hours` hours, oldest first, from the newest HISTORY_JOBS job rows (one query by primary key)
    plus the count of older jobs still waiting (by the state index).

    A job leaves the queue when it is finished (without destinations: when encoded); its latency is receipt to
    that moment, counted for SENT jobs (ENCODED without destinations).
    """
    now = utcnow()
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    first = end - timedelta(hours=hours)
    kept = waiting_states(settings)
    done_state = JobState.SENT if settings.destinations else JobState.ENCODED
    with sessions() as session:
        rows = session.execute(select(Job.id, Job.state, Job.received_at, Job.encoded_at, Job.finished_at,
                                      Job.updated_at)
                               .order_by(Job.id.desc()).limit(HISTORY_JOBS)).all()
        oldest_id = rows[-1].id if rows else None
        older_waiting = session.scalar(select(func.count()).select_from(Job).where(
            Job.state.in_(kept), Job.id < oldest_id)) if len(rows) == HISTORY_JOBS else 0
    spans = [(row.received_at, _left_at(row, kept, settings), row.state) for row in rows]
    spans = [span for span in spans if span[1] is None or span[1] >= first]  # what touches the window
    result = []
    for index in range(hours):
        start = first + timedelta(hours=index)
        stop = min(start + timedelta(hours=1), now)
        latencies = [(left - received).total_seconds() for received, left, state in spans
                     if state is done_state and left is not None and start <= left < stop]
        result.append(Hour(
            start=start,
            received=sum(1 for received, _, _ in spans if start <= received < stop),
            queue_depth=older_waiting + sum(1 for received, left, _ in spans
                                            if received <= stop and (left is None or left > stop)),
            done=len(latencies),
            latency_median_s=float(np.median(latencies)) if latencies else None,
            latency_p95_s=float(np.percentile(latencies, 95)) if latencies else None))
    return result
