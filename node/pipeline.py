"""The life of a job after it is received: process (validate, prepare, predict, explain, encode) and deliver.

`Processor` turns a claimed RUNNING job into ENCODED result files or a SKIPPED /
REJECTED / FAILED outcome; `Deliverer` sends a claimed DELIVERING job's results to
every destination with retries and exponential backoff, each destination only the
result objects it chose (`objects`, and `negatives` for a result without a nodule).
"""
from __future__ import annotations

import json
import shutil
import time
from io import BytesIO
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import numpy as np
import structlog
from sqlalchemy.orm import sessionmaker

from config.settings import RESULT_OBJECTS, Destination, Settings
from inference.predictor import Detector
from inference.preprocess import read_dataset
from inference.types import NotApplicable, Unreadable
from node import metrics
from node.store.db import DeliveryState, Job, JobState, utcnow
from node.store.jobs import Claim, TransitionError, ensure_deliveries, transition
from node.scu import AssociationFailed, send_files
from node.store.spool import checked_uid, under, write_atomic
from node.tls import client_context
from node.cases import similar_cases
from retrieval.index import CaseIndex
from sr_writer.encode import encode_results
from sr_writer.heatmap import EXPLANATION_FILE, explanation_png
from sr_writer.source_header import clean_header

log = structlog.get_logger(__name__)
RETURN_TO_CALLER = "calling-ae"  # the delivery row of `delivery.return_to_calling_ae`


class StageTimer:
    """Seconds spent per pipeline stage, kept on the job row."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 4)

    def json(self) -> str:
        return json.dumps(self.seconds)


def backoff_s(attempt: int, initial: float, ceiling: float) -> float:
    """Exponential backoff after the `attempt`-th failure (1-based)."""
    return min(ceiling, initial * 2 ** (attempt - 1))


class ModelInService(Protocol):
    """The model for the next job. A worker calls it once per job, so a promoted or rolled-back model takes
    effect between jobs without a restart."""

    def __call__(self) -> Detector: ...


class Processor:
    """Validate, prepare, predict, explain and encode one claimed job."""

    def __init__(self, settings: Settings, sessions: sessionmaker, detector: ModelInService,
                 index: CaseIndex) -> None:
        self._settings = settings
        self._sessions = sessions
        self._detector = detector
        self._index = index

    def run(self, claim: Claim) -> JobState:
        with self._sessions() as session:
            job = session.get(Job, claim.job_id)
            spool_path, sop_uid, version = Path(job.spool_path), job.sop_instance_uid, job.version
            queued_s = (utcnow() - job.received_at).total_seconds()
        bound = log.bind(job_id=claim.job_id, sop_instance_uid=sop_uid, attempt=claim.attempt)
        timer = StageTimer()
        timer.seconds["queued"] = round(queued_s, 4)
        detector = self._detector()
        metrics.model_in_service(detector.identity)
        try:
            with timer.stage("read"):
                source = read_dataset(spool_path)
            with timer.stage("preprocess"):
                image = detector.prepare(source)
            with timer.stage("predict"):
                prediction = detector.predict(image)
            with timer.stage("similar"):
                similar = similar_cases(self._sessions, self._index, prediction.embedding,
                                        self._settings.retrieval.k, exclude_job_id=claim.job_id)
            with timer.stage("encode"):
                header = clean_header(source)  # messy patient and study attributes: repaired or left out, never fatal
                if header.warnings:
                    bound.warning("source_header_repaired", warnings=list(header.warnings))
                results = encode_results(header.dataset, image, prediction, review=prediction.review,
                                         similar_cases=similar, uid_root=self._settings.results.uid_root)
                folder = results_folder(self._settings.results_dir, sop_uid, version, claim.attempt)
                for name, dataset in results.named().items():
                    write_atomic(folder / f"{name}.dcm", _encode_file(dataset))
                write_atomic(folder / EXPLANATION_FILE, explanation_png(prediction.heatmap))  # for the review page
        except NotApplicable as exc:
            return self._finish(claim, JobState.SKIPPED, bound, reason=exc.reason, timer=timer)
        except Unreadable as exc:
            return self._finish(claim, JobState.REJECTED, bound, reason=exc.reason, timer=timer)
        except Exception as exc:
            # The exception's text may quote header values: the log and the reason name its class only.
            bound.exception("processing_failed", error=type(exc).__name__)
            if claim.attempt >= self._settings.worker.max_attempts:
                return self._finish(claim, JobState.FAILED, bound, reason=f"processing_error: {type(exc).__name__}",
                                    timer=timer)
            delay = backoff_s(claim.attempt, self._settings.delivery.backoff_initial_s, 60.0)
            return self._finish(claim, JobState.RECEIVED, bound, reason=f"retrying: {type(exc).__name__}",
                                timer=timer, next_attempt_at=utcnow() + timedelta(seconds=delay))
        model = prediction.model
        try:
            self._encoded(claim, folder, image, prediction, timer, header.warnings)
        except TransitionError:
            shutil.rmtree(folder, ignore_errors=True)
            bound.warning("stale_result_discarded", reason="lease lost while processing")
            raise
        self._index.add(claim.job_id, prediction.embedding)
        metrics.stages(timer.seconds)
        if not delivery_names(self._settings):  # no destination: ENCODED is where the job ends
            metrics.finished(JobState.ENCODED)
        bound.info("job_encoded", probability=round(float(prediction.probability), 4),
                   uncertainty=round(float(prediction.uncertainty), 4), positive=bool(prediction.positive),
                   review=bool(prediction.review), model_version=model.version, seconds=timer.seconds)
        return JobState.ENCODED

    def _encoded(self, claim: Claim, folder: Path, image, prediction, timer: StageTimer,
                 header_warnings: tuple[str, ...]) -> None:
        """RUNNING -> ENCODED with the prediction, in one transaction that also checks the lease."""
        model, location = prediction.model, prediction.location
        with self._sessions.begin() as session:
            job = transition(
                session, claim.job_id, claim, JobState.ENCODED,
                reason=None, encoded_at=utcnow(), next_attempt_at=utcnow(), results_dir=str(folder),
                model_name=model.name, model_version=model.version, model_sha256=model.weights_sha256,
                probability=float(prediction.probability), uncertainty=float(prediction.uncertainty),
                positive=bool(prediction.positive), review_required=bool(prediction.review),
                location_row=location.row if location else None,
                location_col=location.col if location else None,
                location_radius=location.radius if location else None,
                embedding=np.asarray(prediction.embedding, dtype=np.float32).tobytes(),
                quality_flags=",".join(image.quality_flags) or None,
                review_reasons=",".join(prediction.review_reasons) or None,
                ood_score=prediction.ood_score,
                stage_seconds=timer.json(),
                header_warnings=json.dumps(header_warnings) if header_warnings else None,
            )
            ensure_deliveries(session, job, delivery_names(self._settings))

    def _finish(self, claim: Claim, state: JobState, bound, *, reason: str, timer: StageTimer, **values) -> JobState:
        with self._sessions.begin() as session:
            terminal = {} if state is JobState.RECEIVED else {"finished_at": utcnow()}
            transition(session, claim.job_id, claim, state, reason=reason, stage_seconds=timer.json(), **terminal, **values)
        metrics.stages(timer.seconds)
        if terminal:
            metrics.finished(state)
        bound.info(f"job_{state.value.lower()}", reason=reason)
        return state


def results_folder(results_dir: Path, sop_uid: str, version: int, attempt: int) -> Path:
    """`<results>/<sop>/attempt-N` (`v<V>-attempt-N` for a later version of the instance), under the results root.

    One folder per attempt and version: a worker whose lease expired, or that was busy
    with an earlier version, never touches the files of the one that holds the job.
    """
    name = f"attempt-{attempt}" if version == 1 else f"v{version}-attempt-{attempt}"
    return under(results_dir, results_dir / checked_uid(sop_uid, "SOP Instance UID") / name)


def delivery_names(settings: Settings) -> list[str]:
    """The deliveries every job's results need: each destination, and the caller when configured."""
    names = [d.name for d in settings.destinations]
    return names + [RETURN_TO_CALLER] if settings.delivery.return_to_calling_ae else names


def chosen_files(folder: Path, destination: Destination, *, positive: bool) -> list[Path]:
    """The result files (`<name>.dcm`) of a job that `destination` receives, in RESULT_OBJECTS order.

    A missing file is not skipped: sending it fails, and the delivery with it (fail closed).
    """
    return [folder / f"{name}.dcm" for name in RESULT_OBJECTS if destination.wants(name, positive=positive)]


def _encode_file(dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Deliverer:
    """Send a claimed job's results to every destination still pending."""

    def __init__(self, settings: Settings, sessions: sessionmaker) -> None:
        self._settings = settings
        self._sessions = sessions
        self._destinations: dict[str, Destination] = {d.name: d for d in settings.destinations}
        self._tls = client_context(settings.tls) if any(d.tls for d in settings.destinations) or any(
            s.tls for s in settings.sources) else None
        metrics.destinations_known(delivery_names(settings))

    def run(self, claim: Claim) -> JobState:
        with self._sessions() as session:
            job = session.get(Job, claim.job_id)
            folder, positive = Path(job.results_dir), bool(job.positive)
            pending = [d.destination for d in job.deliveries if d.state is not DeliveryState.SENT]
            sop_uid, caller = job.sop_instance_uid, (job.calling_aet, job.calling_host)
        bound = log.bind(job_id=claim.job_id, sop_instance_uid=sop_uid, attempt=claim.attempt)
        timer = StageTimer()
        with timer.stage("deliver"):
            outcomes = {}
            for name in pending:
                destination = self._resolve(name, *caller)
                files = [] if destination is None else chosen_files(folder, destination, positive=positive)
                outcomes[name] = self._deliver_to(destination, name, files, bound)
        delivery = self._settings.delivery
        with self._sessions.begin() as session:
            job = session.get(Job, claim.job_id)
            job.stage_seconds = json.dumps({**json.loads(job.stage_seconds or "{}"), **timer.seconds})
            for row in job.deliveries:
                if row.destination in outcomes:
                    ok, status, error = outcomes[row.destination]
                    row.attempts += 1
                    row.last_status, row.last_error = status, error
                    row.state = DeliveryState.SENT if ok else DeliveryState.FAILED
                    row.sent_at = utcnow() if ok else row.sent_at
            if all(row.state is DeliveryState.SENT for row in job.deliveries):
                transition(session, claim.job_id, claim, JobState.SENT, reason=None, finished_at=utcnow())
                state = JobState.SENT
            elif claim.attempt >= delivery.max_attempts:
                failed = ", ".join(f"{r.destination}: {r.last_error}" for r in job.deliveries if r.state is not DeliveryState.SENT)
                transition(session, claim.job_id, claim, JobState.FAILED_DELIVERY, reason=failed[:500], finished_at=utcnow())
                state = JobState.FAILED_DELIVERY
            else:
                delay = backoff_s(claim.attempt, delivery.backoff_initial_s, delivery.backoff_max_s)
                transition(session, claim.job_id, claim, JobState.ENCODED,
                           next_attempt_at=utcnow() + timedelta(seconds=delay))
                state = JobState.ENCODED
        metrics.stages(timer.seconds)
        for name, (ok, _, _) in outcomes.items():
            metrics.delivered(name, ok)
        if state is not JobState.ENCODED:
            metrics.finished(state)
        bound.info("job_delivery_finished", state=state.value)
        return state

    def _resolve(self, name: str, calling_aet: str, calling_host: str | None) -> Destination | None:
        """The peer behind a delivery row: a configured destination, or the calling AE at its source port."""
        if name != RETURN_TO_CALLER:
            return self._destinations.get(name)
        source = self._settings.source(calling_aet)
        if source is None or source.port is None or not calling_host:
            return None
        return Destination(name=name, ae_title=calling_aet, host=calling_host, port=source.port, tls=source.tls)

    def _deliver_to(self, destination: Destination | None, name: str, files: list[Path], bound
                    ) -> tuple[bool, str, str | None]:
        if destination is None:
            bound.error("result_delivery_failed", destination=name, error="destination not configured")
            return False, "unknown", "destination not configured"
        if not files:
            bound.info("result_delivery_skipped", destination=name, reason="destination chose none of the results")
            return True, "none", None
        try:
            results = send_files(files, host=destination.host, port=destination.port,
                                 called_aet=destination.ae_title, calling_aet=self._settings.node.ae_title,
                                 timeout_s=self._settings.delivery.timeout_s,
                                 tls=self._tls if destination.tls else None)
        except (AssociationFailed, OSError) as exc:
            bound.warning("result_delivery_failed", destination=name, error=str(exc))
            return False, "association", str(exc)
        for result in results:
            event = "result_delivered" if result.stored and not result.warning else \
                "result_delivered_with_warning" if result.stored else "result_delivery_failed"
            bound.info(event, destination=name, sent_sop_instance_uid=result.sop_instance_uid,
                       status=None if result.status is None else f"0x{result.status:04X}", comment=result.comment)
        failed = [r for r in results if not r.stored]
        if failed:
            first = failed[0]
            status = "none" if first.status is None else f"0x{first.status:04X}"
            return False, status, f"{len(failed)} of {len(results)} refused ({status} {first.comment})".strip()
        return True, "0x0000", None
