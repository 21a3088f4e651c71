"""The review and health web app: server-rendered pages, a small JSON API, /healthz and /metrics.

Owns the routes, who may see them and the session cookie. Pages need a login
(anonymous visitors are sent to /login); /health and /api/health need the
admin role; /healthz and /metrics are open (load balancer, Prometheus). The
API (/api/..., described at /api/openapi.json) takes the session cookie or
`Authorization: Bearer <api token>`. Every form carries the session's CSRF
token. URLs carry job ids and UIDs only, never patient data.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated

import pydicom
import structlog
from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi import Path as PathParameter
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from starlette.middleware.sessions import SessionMiddleware

from config.settings import Settings
from inference.types import ModelIdentity
from node.store import spool
from node.store.db import Job, utcnow
from node.store.jobs import TransitionError, requeue_delivery
from node.cases import similar_jobs
from retrieval.index import CaseIndex
from review_web import images, queue
from node import metrics as node_metrics
from node.health import CachedHealth, Health, HealthCollector, history
from node.store.review import PROCESSED, READING_ROLES, Role, User, current_reads, decide, final_verdict, record_verdict, review_queue
from review_web.security import (MAX_PASSWORD_LENGTH, MAX_USERNAME_LENGTH, MIN_SECRET_KEY_LENGTH, BodyLimit,
                                 HashGate, HashingBusy, LoginLimiter, SecurityHeaders, check_password, client_address,
                                 csrf_token, csrf_valid, end_session, open_session, session_user, user_by_token)
from sr_writer.encode import SimilarCase

log = structlog.get_logger(__name__)

HERE = Path(__file__).resolve().parent
STUDY_UID = PathParameter(pattern=f"^{spool.UID_PATTERN.pattern}$", max_length=spool.UID_MAX_LENGTH,
                          description="a DICOM UID (PS3.5 9.1), the grammar the spool accepts")
JobId = Annotated[int, PathParameter(ge=1, le=2**63 - 1, description="the node's job number")]


@dataclass
class WebContext:
    """What every route needs, kept on `app.state.web`."""

    settings: Settings
    sessions: sessionmaker
    index: CaseIndex | None
    limiter: LoginLimiter
    hash_gate: HashGate
    health: CachedHealth
    templates: Jinja2Templates
    registry: CollectorRegistry
    logins: Counter
    verdicts: Counter
    pixels: images.PixelCache
    thresholds: dict[tuple[str, str], float]  # (model name, version): operating threshold


class LoginRequired(Exception):
    """Raised by page dependencies for an anonymous visitor; answered with a redirect to /login."""


def create_app(settings: Settings, sessions: sessionmaker, index: CaseIndex | None = None,
               identity: ModelIdentity | None = None) -> FastAPI:
    """The web app over the node's database; `index` gives similar cases, `identity` the model in service."""
    web = settings.web
    if len(web.secret_key) < MIN_SECRET_KEY_LENGTH:
        raise ValueError(f"web.secret_key must have at least {MIN_SECRET_KEY_LENGTH} characters")
    registry = CollectorRegistry()
    health = CachedHealth(settings, sessions, identity, web.health_cache_s)
    registry.register(HealthCollector(health))
    app = FastAPI(title="SmartNodule review", version="1", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.web = WebContext(
        settings=settings, sessions=sessions, index=index,
        limiter=LoginLimiter(web.login_max_attempts, web.login_max_attempts_per_address,
                             web.login_max_attempts_total, web.login_window_s, web.login_tracked_max),
        hash_gate=HashGate(web.password_hash_concurrency, web.password_hash_queue_max), health=health,
        templates=_templates(), registry=registry,
        logins=Counter("smartnodule_web_logins", "Login attempts by outcome", ["outcome"], registry=registry),
        verdicts=Counter("smartnodule_verdicts_recorded", "Verdicts recorded", registry=registry),
        pixels=images.PixelCache(web.viewer_cache_images, web.viewer_max_pixels),
        thresholds=queue.model_thresholds(settings),
    )
    app.add_middleware(SessionMiddleware, secret_key=web.secret_key, session_cookie="smartnodule_session",
                       max_age=web.session_max_age_s, same_site="strict", https_only=web.secure_cookies)
    app.add_middleware(BodyLimit, max_bytes=web.max_request_bytes)
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(LoginRequired, lambda request, exc: RedirectResponse("/login", status_code=303))
    app.add_exception_handler(images.MissingFile,
                              lambda request, exc: JSONResponse({"detail": str(exc)}, status_code=404))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(pages)
    app.include_router(api)
    return app


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["dicom_date"] = lambda value: (
        f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value)
    templates.env.filters["age"] = queue.age_text
    return templates


def _web(request: Request) -> WebContext:
    return request.app.state.web


def _session_user(request: Request) -> User | None:
    """The user of the request's server-side session; a cookie whose session has ended is cleared."""
    ctx = _web(request)
    token = request.session.get("sid")
    if not isinstance(token, str):
        return None
    with ctx.sessions.begin() as session:
        user = session_user(session, token, ctx.settings.web.session_max_age_s, ctx.settings.web.session_idle_s)
    if user is None:
        request.session.clear()
    return user


def page_user(request: Request) -> User:
    user = _session_user(request)
    if user is None:
        raise LoginRequired()
    return user


def admin_user(user: Annotated[User, Depends(page_user)]) -> User:
    if user.role is not Role.ADMIN:
        raise HTTPException(403, "administrators only")
    return user


def api_user(request: Request) -> User:
    authorization = request.headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        with _web(request).sessions() as session:
            user = user_by_token(session, authorization[7:].strip())
    else:
        user = _session_user(request)
    if user is None:
        raise HTTPException(401, "log in or send Authorization: Bearer <api token>",
                            headers={"WWW-Authenticate": "Bearer"})
    return user


def check_csrf(request: Request, csrf_token: Annotated[str, Form()] = "") -> None:
    if not csrf_valid(request.session, csrf_token):
        raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")


def _render(request: Request, template: str, user: User | None = None, status_code: int = 200,
            **context) -> HTMLResponse:
    return _web(request).templates.TemplateResponse(
        request, template, {"user": user, "csrf_token": csrf_token(request.session), **context},
        status_code=status_code)


def _client_ip(request: Request) -> str:
    return client_address(request.client.host if request.client else None, request.headers.get("x-forwarded-for"),
                          _web(request).settings.web.trusted_proxies)


pages = APIRouter(include_in_schema=False)


@pages.get("/")
def index_page() -> RedirectResponse:
    return RedirectResponse("/queue", status_code=303)


@pages.get("/login")
def login_form(request: Request) -> HTMLResponse:
    return _render(request, "login.html")


@pages.post("/login", dependencies=[Depends(check_csrf)])
async def login(request: Request, username: Annotated[str, Form(max_length=MAX_USERNAME_LENGTH)],
                password: Annotated[str, Form(max_length=MAX_PASSWORD_LENGTH)]) -> Response:
    """Field lengths are checked (422) and the limits applied (429) before the password is hashed."""
    ctx, ip = _web(request), _client_ip(request)
    limit = ctx.limiter.blocked(ip, username)
    if limit is not None:
        log.warning("login_failed", username=username, client_ip=ip, reason="rate_limited", limit=limit)
        ctx.logins.labels("rate_limited").inc()
        return _render(request, "login.html", status_code=429,
                       error="Too many failed attempts. Wait a few minutes and try again.")
    try:
        user, token = await ctx.hash_gate.run(_log_in, ctx, username, password)
    except HashingBusy:
        log.warning("login_failed", username=username, client_ip=ip, reason="busy")
        ctx.logins.labels("busy").inc()
        return _render(request, "login.html", status_code=503, error="The server is busy. Try again shortly.")
    if user is None:
        ctx.limiter.failed(ip, username)
        log.warning("login_failed", username=username, client_ip=ip, reason="wrong_credentials")
        ctx.logins.labels("failed").inc()
        return _render(request, "login.html", status_code=401, error="Wrong username or password.")
    ctx.limiter.succeeded(username)
    request.session.clear()
    request.session.update(sid=token)
    log.info("login_succeeded", username=user.username, role=user.role.value, client_ip=ip)
    ctx.logins.labels("succeeded").inc()
    return RedirectResponse("/health" if user.role is Role.ADMIN else "/queue", status_code=303)


def _log_in(ctx: WebContext, username: str, password: str) -> tuple[User | None, str | None]:
    """(user, new session id) when the password is an enabled user's, else (None, None); runs in a worker thread."""
    with ctx.sessions.begin() as session:
        user = session.scalar(select(User).where(User.username == username))
        if not check_password(user, password) or user.disabled:
            return None, None
        return user, open_session(session, user)


@pages.post("/logout", dependencies=[Depends(check_csrf)])
def logout(request: Request) -> RedirectResponse:
    """Ends the session on the server: every copy of the cookie stops working."""
    user, token = _session_user(request), request.session.get("sid")
    if isinstance(token, str):
        with _web(request).sessions.begin() as session:
            end_session(session, token)
    request.session.clear()
    if user is not None:
        log.info("logout_succeeded", username=user.username)
    return RedirectResponse("/login", status_code=303)


@pages.get("/queue")
def queue_page(request: Request, user: Annotated[User, Depends(page_user)],
               sort: Annotated[queue.SortKey, Query()] = "priority",
               order: Annotated[queue.Order, Query()] = "asc") -> HTMLResponse:
    """The user's queue, most urgent first (`queue.priority`) unless sorted by another column."""
    ctx = _web(request)
    with ctx.sessions() as session:
        items = review_queue(session, user)
    rows = queue.sort_rows(queue.queue_rows(items, ctx.thresholds, utcnow()), sort, order)
    _audit_read(user, "queue_page", job_ids=[row.job.id for row in rows])
    return _render(request, "queue.html", user, rows=rows, sort=sort, order=order)


def _audit_read(user: User, what: str, **ids) -> None:
    """Every read of patient data (page, image, overlay, report, API answer) is an audit event naming the user."""
    log.info("patient_data_viewed", username=user.username, role=user.role.value, what=what, **ids)


def _processed_job(request: Request, job_id: int) -> Job:
    with _web(request).sessions() as session:
        job = session.get(Job, job_id)
    if job is None or job.state not in PROCESSED:
        raise HTTPException(404, f"job {job_id} has no results to review")
    return job


def _similar(request: Request, job_id: int) -> list[tuple[int, SimilarCase]]:
    ctx = _web(request)
    if ctx.index is None:
        return []
    return similar_jobs(ctx.sessions, ctx.index, job_id, ctx.settings.retrieval.k)


@pages.get("/cases/{job_id}")
def case_page(request: Request, job_id: JobId, user: Annotated[User, Depends(page_user)]) -> HTMLResponse:
    job = _processed_job(request, job_id)
    ds = pydicom.dcmread(job.spool_path, stop_before_pixels=True) if Path(job.spool_path).is_file() else None
    with _web(request).sessions() as session:
        reads = current_reads(session, [job_id])[job_id]
    outcome = decide(reads)
    similar = _similar(request, job_id)
    _audit_read(user, "case_page", job_id=job_id, sop_instance_uid=job.sop_instance_uid,
                similar_job_ids=[other for other, _ in similar])
    return _render(request, "case.html", user, job=job, dataset=ds, outcome=outcome,
                   reads=reads if user.role is Role.ADJUDICATOR else [], similar=similar,
                   threshold=queue.threshold_of(job, _web(request).thresholds),
                   priority=queue.PRIORITY_LABELS[queue.priority(job)],
                   has_report=bool(job.results_dir and (Path(job.results_dir) / "pdf.dcm").is_file()))


@pages.get("/cases/{job_id}/image.png")
def case_image(request: Request, job_id: JobId, user: Annotated[User, Depends(page_user)]) -> Response:
    job = _processed_job(request, job_id)
    png, _ = images.display_png(images.source_dataset(job))
    _audit_read(user, "image", job_id=job_id, sop_instance_uid=job.sop_instance_uid)
    return Response(png, media_type="image/png")


@pages.get("/cases/{job_id}/pixels.json")
def case_pixels_meta(request: Request, job_id: JobId, user: Annotated[User, Depends(page_user)]) -> JSONResponse:
    """Geometry, value scaling, polarity and windows of `pixels.raw` (no patient data)."""
    job = _processed_job(request, job_id)
    return JSONResponse(_web(request).pixels.get(job).meta())


@pages.get("/cases/{job_id}/pixels.raw")
def case_pixels(request: Request, job_id: JobId, user: Annotated[User, Depends(page_user)]) -> Response:
    """The source's modality values, full resolution, as rows x cols little-endian uint16 (see pixels.json)."""
    job = _processed_job(request, job_id)
    pixels = _web(request).pixels.get(job)
    _audit_read(user, "pixels", job_id=job_id, sop_instance_uid=job.sop_instance_uid)
    return Response(pixels.data, media_type="application/octet-stream")


@pages.get("/cases/{job_id}/overlay.png")
def case_overlay(request: Request, job_id: JobId, user: Annotated[User, Depends(page_user)]) -> Response:
    job = _processed_job(request, job_id)
    png = images.overlay_png(job, images.source_dataset(job))
    _audit_read(user, "overlay", job_id=job_id, sop_instance_uid=job.sop_instance_uid)
    return Response(png, media_type="image/png")


@pages.get("/cases/{job_id}/report.pdf")
def case_report(request: Request, job_id: JobId, user: Annotated[User, Depends(page_user)]) -> Response:
    job = _processed_job(request, job_id)
    pdf = images.report_pdf(job)
    _audit_read(user, "report_pdf", job_id=job_id, sop_instance_uid=job.sop_instance_uid)
    return Response(pdf, media_type="application/pdf",
                    headers={"Content-Disposition": f'inline; filename="smartnodule-job-{job_id}.pdf"'})


@pages.post("/cases/{job_id}/verdict", dependencies=[Depends(check_csrf)])
def case_verdict(request: Request, job_id: JobId, user: Annotated[User, Depends(page_user)],
                 nodule: Annotated[str, Form()], row: Annotated[str, Form()] = "",
                 col: Annotated[str, Form()] = "", comment: Annotated[str, Form(max_length=2000)] = ""
                 ) -> RedirectResponse:
    if user.role not in READING_ROLES:
        log.warning("verdict_refused", job_id=job_id, username=user.username, role=user.role.value)
        raise HTTPException(403, "only reviewers and adjudicators record verdicts")
    if nodule not in ("present", "absent"):
        raise HTTPException(422, f"nodule must be 'present' or 'absent', got {nodule!r}")
    job = _processed_job(request, job_id)
    location = _location(row, col)
    ctx = _web(request)
    with ctx.sessions.begin() as session:
        verdict = record_verdict(session, job.id, user, nodule_present=nodule == "present",
                                 location=location, comment=comment.strip())
        outcome = final_verdict(session, job.id)
        verdict_id = verdict.id
    log.info("verdict_recorded", job_id=job.id, sop_instance_uid=job.sop_instance_uid, reviewer=user.username,
             verdict_id=verdict_id, nodule_present=nodule == "present", status=outcome.status.value)
    ctx.verdicts.inc()
    return RedirectResponse("/queue", status_code=303)


def _location(row: str, col: str) -> tuple[float, float] | None:
    if not row and not col:
        return None
    try:
        location = float(row), float(col)
    except ValueError:
        raise HTTPException(422, f"row and col must be numbers, got {row!r}, {col!r}") from None
    if min(location) < 0:
        raise HTTPException(422, f"row and col must not be negative, got {row!r}, {col!r}")
    return location


@pages.get("/health")
def health_page(request: Request, user: Annotated[User, Depends(admin_user)]) -> HTMLResponse:
    ctx = _web(request)
    hours = history(ctx.settings, ctx.sessions)
    return _render(request, "health.html", user, health=ctx.health(), destinations=ctx.settings.destinations,
                   hours=hours, queue_line=_polyline([h.queue_depth for h in hours]),
                   latency_line=_polyline([h.latency_p95_s for h in hours]))


CHART_WIDTH, CHART_HEIGHT = 240, 40


def _polyline(values: list[float | None]) -> str:
    """SVG polyline points of `values` (None: 0) scaled into CHART_WIDTH x CHART_HEIGHT, the largest at the top."""
    top = max((v for v in values if v), default=0) or 1
    step = CHART_WIDTH / max(len(values) - 1, 1)
    return " ".join(f"{i * step:.1f},{CHART_HEIGHT - (v or 0) / top * CHART_HEIGHT:.1f}" for i, v in enumerate(values))


@pages.post("/health/resend/{job_id}", dependencies=[Depends(check_csrf)])
def resend(request: Request, job_id: JobId, user: Annotated[User, Depends(admin_user)]) -> RedirectResponse:
    ctx = _web(request)
    try:
        previous = requeue_delivery(ctx.sessions, job_id)
    except TransitionError as exc:
        raise HTTPException(409, str(exc)) from None
    ctx.health.invalidate()
    log.info("delivery_requeued", job_id=job_id, previous_state=previous.value, admin=user.username)
    return RedirectResponse("/health", status_code=303)


@pages.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    ctx = _web(request)
    try:
        health = ctx.health()
    except Exception as exc:
        log.error("health_check_failed", error=f"{type(exc).__name__}: {exc}"[:300])
        return JSONResponse({"status": "down"}, status_code=503)
    return JSONResponse({"status": health.status, "queue_depth": health.queue_depth, "problems": health.problems})


@pages.get("/metrics")
def metrics(request: Request) -> Response:
    """The database gauges and web counters of this app, and this process's node.metrics (as on metrics.port)."""
    return Response(generate_latest(_web(request).registry) + generate_latest(node_metrics.REGISTRY),
                    media_type=CONTENT_TYPE_LATEST)


@dataclass(frozen=True)
class JobSummary:
    """A job as the API shows it (no patient data)."""

    job_id: int
    sop_instance_uid: str
    study_instance_uid: str
    state: str
    reason: str | None
    received_at: datetime
    finished_at: datetime | None
    model_version: str | None
    probability: float | None
    uncertainty: float | None
    positive: bool | None
    review_required: bool | None
    review_status: str
    verdict: str | None

    @classmethod
    def of(cls, job: Job, status: str, verdict: str | None) -> "JobSummary":
        return cls(job.id, job.sop_instance_uid, job.study_instance_uid, job.state.value, job.reason,
                   job.received_at, job.finished_at, job.model_version, job.probability, job.uncertainty,
                   job.positive, job.review_required, status, verdict)


@dataclass(frozen=True)
class SimilarJob:
    job_id: int
    received_date: str
    probability: float
    verdict: str | None
    similarity: float


api = APIRouter(prefix="/api", tags=["api"], responses={
    401: {"description": "No session and no valid API token"},
    403: {"description": "The user's role may not do this"},
    404: {"description": "No such job"},
})


@api.get("/studies/{study_instance_uid}/jobs", response_model=list[JobSummary])
def api_study_jobs(request: Request, study_instance_uid: Annotated[str, STUDY_UID],
                   user: Annotated[User, Depends(api_user)]) -> list[JobSummary]:
    """The node's jobs for the instances of one study, oldest first, with their review status."""
    with _web(request).sessions() as session:
        jobs = list(session.scalars(select(Job).where(Job.study_instance_uid == study_instance_uid)
                                    .order_by(Job.received_at, Job.id)))
        states = {job.id: final_verdict(session, job.id) for job in jobs}
    _audit_read(user, "api_study_jobs", study_instance_uid=study_instance_uid, job_ids=[job.id for job in jobs])
    return [JobSummary.of(job, states[job.id].status.value, states[job.id].label) for job in jobs]


@api.get("/queue", response_model=list[JobSummary])
def api_queue(request: Request, user: Annotated[User, Depends(api_user)]) -> list[JobSummary]:
    """The caller's review queue, oldest first."""
    with _web(request).sessions() as session:
        items = review_queue(session, user)
    _audit_read(user, "api_queue", job_ids=[job.id for job, _ in items])
    return [JobSummary.of(job, outcome.status.value, outcome.label) for job, outcome in items]


@api.get("/jobs/{job_id}/similar", response_model=list[SimilarJob])
def api_similar(request: Request, job_id: JobId, user: Annotated[User, Depends(api_user)]) -> list[SimilarJob]:
    """Past cases most similar to the job's image, with their final verdicts."""
    _processed_job(request, job_id)
    similar = _similar(request, job_id)
    _audit_read(user, "api_similar", job_id=job_id, job_ids=[other for other, _ in similar])
    return [SimilarJob(other, case.received_on, case.probability, case.verdict, case.similarity)
            for other, case in similar]


@api.get("/health", response_model=Health)
def api_health(request: Request, user: Annotated[User, Depends(api_user)]) -> Health:
    """The health page's figures (administrators)."""
    if user.role is not Role.ADMIN:
        raise HTTPException(403, "administrators only")
    return _web(request).health()
