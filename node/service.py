"""One node process: the Storage SCP, pipeline workers and a delivery worker around one database.

`smartnodule run` starts all of them; the scale-out roles start a subset. Every role serves its Prometheus
metrics on `[metrics] host:port` (node.metrics), started before the loops and the listeners, so that a
metrics port in use stops the start before anything listens or claims a job. On
start, leases held by a dead process of this host are released at once, so a
node restarted after a crash picks up its RUNNING jobs without waiting for them
to expire.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import structlog
from sqlalchemy.orm import sessionmaker

from config.settings import Settings
from inference.predictor import Detector
from node.alerts import Alerter
from node.cases import rebuild_index
from node.metrics import MetricsServer, model_in_service, serve_metrics
from node.pipeline import Deliverer, ModelInService, Processor, delivery_names
from node.scp import StorageSCP
from node.store.db import open_database
from node.store.jobs import DELIVER, PROCESS, Claim, TransitionError, claim, lease_owner, release_dead_leases
from node.store.spool import Spool
from retrieval.index import CaseIndex
from review_web.first_admin import ensure_first_admin
from review_web.server import WebServer
from scheduler.registry import ChampionWatcher
from scheduler.service import Scheduler

log = structlog.get_logger(__name__)


class ModelLoader(Protocol):
    """Loads one worker's model when the node starts (called once per worker) and returns how that worker gets
    the model for each job."""

    def __call__(self) -> ModelInService: ...


class WorkLoop(threading.Thread):
    """Claims one kind of work and runs it until stopped."""

    def __init__(self, name: str, sessions: sessionmaker, work, owner: str, lease_s: float,
                 poll_s: float, run_claim: Callable[[Claim], object], stop: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self._sessions, self._work, self._owner = sessions, work, owner
        self._lease_s, self._poll_s = lease_s, poll_s
        self._run_claim, self._stopping = run_claim, stop

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                taken = claim(self._sessions, self._work, self._owner, self._lease_s)
                if taken is None:
                    self._stopping.wait(self._poll_s)
                    continue
                self._run_claim(taken)
            except TransitionError as exc:  # our lease expired and another worker took the job
                log.warning("lease_lost", worker=self.name, error=str(exc))
            except Exception:
                log.exception("worker_loop_error", worker=self.name)
                self._stopping.wait(1.0)


class Node:
    """The node's parts in one process."""

    def __init__(self, settings: Settings, *, scp: bool = True, workers: int | None = None, scheduler: bool = True,
                 deliver: bool = True, web: bool = True, alerts: bool = True,
                 model_loader: ModelLoader | None = None) -> None:
        self.settings = settings
        for folder in (settings.node.data_dir, settings.spool_dir, settings.results_dir):
            folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.sessions = open_database(settings.database_url)
        self.index = CaseIndex.from_settings(settings)
        if len(self.index) == 0:
            rebuild_index(self.sessions, self.index)
        self.spool = Spool(settings.spool_dir)
        self.scp = StorageSCP(settings, self.sessions, self.spool) if scp else None
        self._workers = settings.worker.count if workers is None else workers
        self._deliver = deliver
        self._model_loader = model_loader or self._model_in_service
        self._stop = threading.Event()
        self._threads: list[WorkLoop] = []
        self.web: WebServer | None = None
        self.alerter: Alerter | None = None
        self.metrics: MetricsServer | None = None
        self._web, self._alerts = web and settings.web.enabled, alerts
        self._scheduler = Scheduler(settings, self.sessions, self.index) if scheduler and settings.scheduler.enabled else None

    def _model_in_service(self) -> ModelInService:
        """One worker's model: the registry's champion when the learning loop is on, else the configured card."""
        if self.settings.scheduler.enabled:
            return ChampionWatcher(self.settings).current
        detector = Detector.from_settings(self.settings.model)
        return lambda: detector

    def start(self) -> None:
        """Load the model (once per worker), start the loops, then listen."""
        release_dead_leases(self.sessions)
        if self._web:
            ensure_first_admin(self.settings, self.sessions)
        worker = self.settings.worker
        detectors = [self._model_loader() for _ in range(self._workers)]
        identity = detectors[0]().identity if detectors else None
        if identity is not None:
            model_in_service(identity)
        self.metrics = serve_metrics(self.settings, self.sessions, identity)
        for index, detector in enumerate(detectors):
            self._threads.append(WorkLoop(
                f"process-{index}", self.sessions, PROCESS, lease_owner("process", index), worker.lease_s,
                worker.poll_interval_s, Processor(self.settings, self.sessions, detector, self.index).run,
                self._stop))
        if self._deliver and delivery_names(self.settings):
            self._threads.append(WorkLoop(
                "deliver-0", self.sessions, DELIVER, lease_owner("deliver", 0),
                self.settings.delivery.timeout_s * 4, worker.poll_interval_s,
                Deliverer(self.settings, self.sessions).run, self._stop))
        for thread in self._threads:
            thread.start()
        if self.scp is not None:
            self.scp.start()
        if self._web:
            self.web = WebServer(self.settings, self.sessions, self.index, identity)
            self.web.start()
        if self._scheduler is not None:
            self._scheduler.start()
        alerts = self.settings.alerts
        if self._alerts and (alerts.webhook_url or alerts.mail_to):
            self.alerter = Alerter(self.settings, self.sessions)
            self.alerter.start()
        log.info("node_started", workers=self._workers, destinations=[d.name for d in self.settings.destinations])

    def stop(self) -> None:
        if self.scp is not None:
            self.scp.stop()
        for part in (self.web, self.alerter, self._scheduler, self.metrics):
            if part is not None:
                part.stop()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        log.info("node_stopped")
