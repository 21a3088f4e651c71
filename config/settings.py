"""The node's settings: one pydantic-settings model, read once from TOML at start-up.

Sources, highest priority first: environment variables (`SMARTNODULE_` prefix,
`__` between section and key, e.g. `SMARTNODULE_NODE__PORT=11113`), then the TOML
file. Every knob has exactly one home here; bad values stop the start with a
`SettingsError` that names the setting.
"""
from __future__ import annotations

import os
import re
import tomllib
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, IPvAnyNetwork, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError
from pydicom.uid import RE_VALID_UID

DEFAULT_CONFIG = Path(__file__).with_name("node.toml")
CONFIG_HELP = "settings file (default: config/node.toml)"  # the CLI's --config

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*[^ ][\x20-\x5b\x5d-\x7e]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class SettingsError(ValueError):
    """Settings that cannot be used; the message names each offending setting."""


def _file_exists(cls, path: Path | None, info: ValidationInfo) -> Path | None:
    """A field validator: the file a setting names is there (None: not set)."""
    if path is not None and not path.is_file():
        raise ValueError(f"{info.field_name} {path} does not exist")
    return path


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    """The DICOM listener: who we are and whom we accept."""

    ae_title: AETitle = "SMARTNODULE"
    host: str = "127.0.0.1"
    port: Port = 11112
    data_dir: Path = Path("var")
    database_url: str = ""
    allowed_calling_aets: list[AETitle] = []
    accept_any_calling_ae: bool = False
    require_called_ae_title: bool = True
    max_associations: int = Field(default=10, ge=1)
    max_connections_per_address: int = Field(default=10, ge=1)
    association_request_timeout_s: float = Field(default=5.0, gt=0, le=60)
    max_instance_mb: float = Field(default=256.0, gt=0)
    max_pixels: int = Field(default=64_000_000, ge=1)
    max_pdu_bytes: int = Field(default=1 << 20, ge=4096, le=1 << 26)
    min_free_disk_mb: float = Field(default=1024.0, ge=0)
    network_timeout_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _calling_aets_required(self) -> "NodeSettings":
        if not self.allowed_calling_aets and not self.accept_any_calling_ae:
            raise ValueError(
                "allowed_calling_aets is empty: list the AE titles that may send, "
                "or set accept_any_calling_ae = true explicitly"
            )
        return self


class WorkerSettings(_Section):
    """The pipeline workers that claim jobs from the database."""

    count: int = Field(default=1, ge=0, le=16)
    lease_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    poll_interval_s: float = Field(default=0.2, gt=0)


class ModelSettings(_Section):
    """Which model serves and how its answers are turned into a review decision."""

    card: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(default=0, ge=0, description="0: all cores but one, at least one")
    review_margin: float = Field(default=0.1, ge=0, le=1)
    review_max_uncertainty: float = Field(default=0.15, ge=0, le=1)
    review_flags: list[Annotated[str, Field(pattern=r"^[a-z_]{1,40}$")]] = Field(
        default=["ap_view", "no_pixel_spacing", "invalid_pixel_spacing", "secondary_capture"],
        description="image quality flags that send a read to review, the flag being the reason")

    @field_validator("card")
    @classmethod
    def _card_exists(cls, card: Path | None) -> Path | None:
        if card is not None and not card.is_file():
            raise ValueError(f"model card {card} does not exist")
        return card


class DeliverySettings(_Section):
    """How results are pushed to the destinations."""

    max_attempts: int = Field(default=6, ge=1)
    backoff_initial_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)
    return_to_calling_ae: bool = False


ResultObject = Literal["sr", "gsps", "heatmap", "pdf"]
RESULT_OBJECTS: tuple[ResultObject, ...] = ("sr", "gsps", "heatmap", "pdf")


class Destination(_Section):
    """A DICOM peer that receives the results (C-STORE SCP), and which of them it wants.

    `objects`: the result objects it receives for a positive finding (a presentation
    state exists only for a positive image); `negatives`: those it receives when the
    model found no nodule (a subset of `objects`; empty: nothing is sent for negatives).
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
    ae_title: AETitle
    host: str
    port: Port
    tls: bool = False
    objects: list[ResultObject] = Field(default=list(RESULT_OBJECTS), min_length=1)
    negatives: list[ResultObject] = ["sr", "heatmap", "pdf"]

    @model_validator(mode="after")
    def _negatives_within_objects(self) -> "Destination":
        if "gsps" in self.negatives:
            raise ValueError("negatives cannot hold gsps: a negative result has no presentation state")
        extra = sorted(set(self.negatives) - set(self.objects))
        if extra:
            raise ValueError(f"negatives must be a subset of objects; not in objects: {', '.join(extra)}")
        return self

    def wants(self, name: str, *, positive: bool) -> bool:
        """Whether this destination receives the result object `name` of a positive or negative result."""
        return name in (self.objects if positive else self.negatives)


class Source(_Section):
    """A sender known by AE title: the hosts it may connect from, and its own C-STORE port for returned results."""

    ae_title: AETitle
    hosts: list[str] = []
    port: Port | None = None
    tls: bool = False


MAX_UID_ROOT_LENGTH = 44  # sr_writer.uids.MAX_UID_ROOT_LENGTH: room for 19+ hash digits within 64


class ResultsSettings(_Section):
    """The result objects the node writes."""

    # SmartNodule's own UUID-derived root (2.25.<uuid>); a site with a registered root sets its own.
    uid_root: str = "2.25.6917992207774837699974228907813234322"

    @field_validator("uid_root")
    @classmethod
    def _uid_root_grammar(cls, uid_root: str) -> str:
        if not RE_VALID_UID.match(uid_root):
            raise ValueError("uid_root must be a DICOM UID: digit components separated by dots, "
                             "no leading zeros, no trailing dot")
        if len(uid_root) > MAX_UID_ROOT_LENGTH:
            raise ValueError(f"uid_root must be at most {MAX_UID_ROOT_LENGTH} characters to leave room "
                             f"for the generated suffix (got {len(uid_root)})")
        return uid_root


class TLSSettings(_Section):
    """DICOM TLS (secure transport connection profile) for the listener and for destinations with `tls = true`."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _files_present(self) -> "TLSSettings":
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("certificate and private_key are required when TLS is enabled")
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("ca_certificates is required to verify client certificates")
        for name in ("certificate", "private_key", "ca_certificates"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} does not exist")
        return self


class WebSettings(_Section):
    """The review and health web app."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 8080
    secret_key: str = ""
    session_max_age_s: int = Field(default=8 * 3600, ge=60)
    session_idle_s: int = Field(default=30 * 60, ge=60)
    secure_cookies: bool = False
    login_max_attempts: int = Field(default=5, ge=1)
    login_max_attempts_per_address: int = Field(default=20, ge=1)
    login_max_attempts_total: int = Field(default=200, ge=1)
    login_window_s: float = Field(default=300.0, gt=0)
    login_tracked_max: int = Field(default=10000, ge=100)
    password_hash_concurrency: int = Field(default=2, ge=1, le=64)
    password_hash_queue_max: int = Field(default=16, ge=0)
    trusted_proxies: list[IPvAnyNetwork] = []
    max_request_bytes: int = Field(default=64 * 1024, ge=1024)
    health_cache_s: float = Field(default=5.0, ge=0)
    viewer_max_pixels: int = Field(default=4096 * 4096, ge=256 * 256,
                                   description="largest image the viewer gets at full resolution; larger ones "
                                               "are reduced by a whole factor (2 bytes a pixel on the wire)")
    viewer_cache_images: int = Field(default=4, ge=1, le=64,
                                     description="decoded images the web app keeps for the viewer")
    # The first administrator, made when the web app starts and no user exists yet (compose: a Docker secret).
    admin_username: str = Field(default="admin", min_length=1, max_length=64)
    admin_password_file: Path | None = None

    _password_file_exists = field_validator("admin_password_file")(_file_exists)

    @model_validator(mode="after")
    def _tracked_covers_total(self) -> "WebSettings":
        if self.login_tracked_max < 2 * self.login_max_attempts_total:
            raise ValueError("login_tracked_max must be at least twice login_max_attempts_total "
                             "(each failure is tracked under its username and its address)")
        return self

    @model_validator(mode="after")
    def _secret_key_when_enabled(self) -> "WebSettings":
        if self.enabled and len(self.secret_key) < 32:
            raise ValueError("secret_key must be a random string of at least 32 characters when the web app is enabled")
        return self


class MetricsSettings(_Section):
    """Prometheus metrics of this process, served at http://host:port/metrics by every role (run, scp, worker,
    web, scheduler). Two roles on one machine need two ports (e.g. SMARTNODULE_METRICS__PORT=9465 for the second);
    a port in use stops the start with one line naming metrics.port. Off when the section is missing."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 9464


class AuditSettings(_Section):
    """The audit log: its HMAC key (kept outside the data folder), checkpoints and forwarding to syslog."""

    key_file: Path | None = None  # None: `<data_dir>.audit-key` beside the data folder
    checkpoint_every: int = Field(default=1000, ge=1)
    checkpoint_interval_s: float = Field(default=60.0, gt=0)
    syslog: str = Field(default="", pattern=r"^((tcp|tls)://[^/:]+:\d{1,5})?$")
    syslog_ca_file: Path | None = None

    _ca_exists = field_validator("syslog_ca_file")(_file_exists)


class RetrievalSettings(_Section):
    """Similar-case retrieval over the embeddings of past cases."""

    k: int = Field(default=5, ge=1, le=50)
    ivf_threshold: int = Field(default=20000, ge=1)
    nlist: int = Field(default=256, ge=1)
    nprobe: int = Field(default=16, ge=1)


class AlertSettings(_Section):
    """Alerts to administrators by webhook and/or e-mail (both off while empty)."""

    webhook_url: str = Field(default="", pattern=r"^(https?://.+)?$")
    smtp_host: str = ""
    smtp_port: Port = 25
    mail_from: str = ""
    mail_to: list[str] = []
    check_interval_s: float = Field(default=60.0, gt=0)
    repeat_after_s: float = Field(default=3600.0, ge=0)
    failed_jobs_per_destination: int = Field(default=1, ge=1)
    queue_depth_max: int = Field(default=100, ge=1)
    disk_free_min_gb: float = Field(default=5.0, ge=0)

    @model_validator(mode="after")
    def _mail_complete(self) -> "AlertSettings":
        if self.mail_to and not (self.smtp_host and self.mail_from):
            raise ValueError("mail_to needs smtp_host and mail_from")
        return self


_EVERY = re.compile(r"every (\d+(?:\.\d+)?)\s*([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def trigger_of(schedule: str, timezone: str):
    """The APScheduler trigger of a schedule setting: a 5-field crontab (APScheduler's own parser, so that what
    `check-config` accepts is what the scheduler runs) or "every N<unit>"; None when empty. Raises ValueError."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    schedule = schedule.strip()
    if not schedule:
        return None
    every = _EVERY.fullmatch(schedule)
    if every:
        return IntervalTrigger(seconds=float(every.group(1)) * _UNITS[every.group(2)], timezone=timezone)
    return CronTrigger.from_crontab(schedule, timezone=timezone)


def _schedule(schedule: str) -> str:
    try:
        trigger_of(schedule, "UTC")
    except ValueError as exc:
        raise ValueError(f"{schedule!r} is not a schedule ({exc}): write a 5-field crontab such as \"0 2 * * *\", "
                         f"\"every N\" with a unit s/m/h/d such as \"every 15m\", or \"\" (off)") from None
    return schedule


def _time_zone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a known time zone: write an IANA name such as \"UTC\" or "
                         f"\"Europe/Berlin\"") from None
    return name


Schedule = Annotated[str, AfterValidator(_schedule)]
TimeZone = Annotated[str, AfterValidator(_time_zone)]


class SchedulerSettings(_Section):
    """Background jobs (drift check, retraining, housekeeping) and their schedules.

    A schedule is a 5-field crontab ("0 2 * * *"), "every N" with a unit s/m/h/d
    ("every 15m"), or "" (job off). Times are in `timezone`.
    """

    enabled: bool = False
    timezone: TimeZone = "UTC"
    misfire_grace_s: int = Field(default=3600, ge=1)
    drift: Schedule = "0 2 * * *"
    retrain: Schedule = "every 6h"
    reindex: Schedule = "30 1 * * *"
    retention: Schedule = "0 4 * * *"
    echo: Schedule = "every 15m"
    backup: Schedule = "0 5 * * *"
    drift_window_days: float = Field(default=7.0, gt=0)
    drift_window_jobs: int = Field(default=500, ge=10)
    drift_min_cases: int = Field(default=30, ge=5)
    drift_psi_max: float = Field(default=0.25, gt=0)
    drift_ks_p_min: float = Field(default=0.001, ge=0, le=1)
    drift_category_max: float = Field(default=0.25, gt=0, le=1)
    drift_embedding_max: float = Field(default=0.5, gt=0)
    drift_min_verdicts: int = Field(default=20, ge=1)
    drift_sensitivity_min: float = Field(default=0.5, ge=0, le=1)
    drift_specificity_min: float = Field(default=0.5, ge=0, le=1)
    drift_ece_max: float = Field(default=0.2, ge=0, le=1)
    retention_days: float = Field(default=30.0, gt=0)
    backup_dir: Path | None = None
    backup_keep: int = Field(default=7, ge=1)


class RegistrySettings(_Section):
    """MLflow tracking and model registry, fine-tuning and the promotion gate."""

    tracking_uri: str = ""
    artifact_root: Path | None = None
    model_name: str = Field(default="smartnodule-nodule", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    experiment: str = "smartnodule-fine-tune"
    min_new_verdicts: int = Field(default=50, ge=1)
    heldout_percent: int = Field(default=20, ge=0, le=90)
    fine_tune_steps: int = Field(default=300, ge=0)
    fine_tune_batch: int = Field(default=8, ge=2)
    fine_tune_lr: float = Field(default=2e-4, gt=0)
    fine_tune_phantoms: int = Field(default=128, ge=0)
    fine_tune_timeout_s: float = Field(default=4 * 3600.0, gt=0)
    calibration_phantoms: int = Field(default=0, ge=0)
    eval_phantoms: int = Field(default=200, ge=2)
    eval_start: int = Field(default=1000, ge=0)
    auc_tolerance: float = Field(default=0.02, ge=0, le=1)
    ece_tolerance: float = Field(default=0.02, ge=0, le=1)
    sensitivity_tolerance: float = Field(default=0.0, ge=0, le=1)
    auto_promote: bool = False
    watch_interval_s: float = Field(default=5.0, gt=0)


ENV_PREFIX = "SMARTNODULE_"
ENV_DELIMITER = "__"


def env_name(*loc: str | int) -> str:
    """The environment variable of a setting: ("node", "port") -> SMARTNODULE_NODE__PORT."""
    return ENV_PREFIX + ENV_DELIMITER.join(str(part) for part in loc).upper()


class _UndecodableValue(ValueError):
    def __init__(self, key: str, problem: ValueError) -> None:
        super().__init__(str(problem))
        self.key = key


class _EnvSource(EnvSettingsSource):
    """The environment, as pydantic-settings reads it, with the variable named when a list or table in it is not
    JSON (pydantic-settings names only the section)."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError as exc:
            raise _UndecodableValue(field_name, exc) from None

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except _UndecodableValue as exc:
            loc = (field_name,) if exc.key == field_name else (field_name, exc.key)
            raise SettingsError(f"environment variable {env_name(*loc)} (setting {'.'.join(loc)}) is not JSON "
                                f'({exc}): write lists and tables as JSON, e.g. ["A", "B"] or {{"key": 1}}') from None


class Settings(BaseSettings):
    """All settings of one node."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, extra="forbid", frozen=True
    )

    node: NodeSettings  # required: a file without [node] must not widen who may connect
    worker: WorkerSettings = WorkerSettings()
    model: ModelSettings = ModelSettings()
    delivery: DeliverySettings = DeliverySettings()
    destinations: list[Destination] = []
    sources: list[Source] = []
    results: ResultsSettings = ResultsSettings()
    tls: TLSSettings = TLSSettings()
    web: WebSettings = WebSettings()
    metrics: MetricsSettings = MetricsSettings()
    audit: AuditSettings = AuditSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    alerts: AlertSettings = AlertSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    registry: RegistrySettings = RegistrySettings()

    @model_validator(mode="before")
    @classmethod
    def _node_section_required(cls, data: object) -> object:
        if isinstance(data, dict) and "node" not in data:
            raise ValueError("the [node] section is missing: node.allowed_calling_aets must list the AE titles "
                             "that may send (or node.accept_any_calling_ae = true explicitly)")
        return data

    @model_validator(mode="after")
    def _ca_bundle_for_outgoing_tls(self) -> "Settings":
        if self.tls.ca_certificates is None and (any(d.tls for d in self.destinations)
                                                 or any(s.tls for s in self.sources)):
            raise ValueError("tls.ca_certificates is required to send over DICOM TLS (destinations or sources "
                             "with tls = true): peers are verified against it, never the system trust store")
        return self

    @model_validator(mode="after")
    def _unique_destination_names(self) -> "Settings":
        names = [d.name for d in self.destinations]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"destination names must be unique, repeated: {', '.join(duplicated)}")
        return self

    @model_validator(mode="after")
    def _sources_allowed(self) -> "Settings":
        unknown = sorted({s.ae_title for s in self.sources} - set(self.node.allowed_calling_aets))
        if unknown and not self.node.accept_any_calling_ae:
            raise ValueError(f"sources {', '.join(unknown)} are not in node.allowed_calling_aets")
        return self

    @model_validator(mode="after")
    def _return_addresses_known(self) -> "Settings":
        if self.delivery.return_to_calling_ae:
            ports = {s.ae_title for s in self.sources if s.port is not None}
            missing = sorted(set(self.node.allowed_calling_aets) - ports)
            if missing or self.node.accept_any_calling_ae:
                raise ValueError("delivery.return_to_calling_ae needs a [[sources]] entry with a port for every "
                                 f"calling AE title (missing: {', '.join(missing) or 'any AE is accepted'})")
        return self

    def source(self, ae_title: str) -> "Source | None":
        return next((s for s in self.sources if s.ae_title == ae_title), None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (_EnvSource(settings_cls), init_settings)

    @property
    def database_url(self) -> str:
        return self.node.database_url or f"sqlite:///{(self.node.data_dir / 'smartnodule.db').resolve()}"

    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        return self.node.data_dir / "results"

    @property
    def log_dir(self) -> Path:
        return self.node.data_dir / "logs"

    @property
    def tracking_uri(self) -> str:
        return self.registry.tracking_uri or f"sqlite:///{(self.node.data_dir / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        return (self.registry.artifact_root or self.node.data_dir / "mlartifacts").resolve()

    @property
    def backup_dir(self) -> Path:
        return self.scheduler.backup_dir or self.node.data_dir / "backups"


def load_settings(path: Path | str | None = None, **overrides: dict | list) -> Settings:
    """Read `path` (default: the shipped `config/node.toml`), apply the environment, validate.

    `overrides` are section dicts (a list for `destinations` and `sources`) merged over the file (used by the CLI and
    tests).
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"settings file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"settings file {path} is not valid TOML: {exc}") from None
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise SettingsError(_describe(path, exc)) from None
    except SourceError as exc:  # the environment could not be read; _EnvSource's own error names the variable
        cause = exc.__cause__
        raise SettingsError(str(cause) if isinstance(cause, SettingsError) else f"environment: {exc}") from None


def _describe(path: Path, exc: ValidationError) -> str:
    """One line per invalid setting (a single one: one line in all), naming the environment variable that set it."""
    environment = {name.upper() for name in os.environ}
    problems = []
    for error in exc.errors():
        loc = error["loc"]
        where = ".".join(str(part) for part in loc) or "(top level)"
        message = re.sub(r"^Value error, ", "", error["msg"])
        got = f" (got {error['input']!r})" if error["type"] not in {"missing", "value_error"} else ""
        variables = [env_name(*loc[:n]) for n in range(len(loc), 0, -1) if env_name(*loc[:n]) in environment]
        source = f" [from environment variable {variables[0]}]" if variables else ""
        problems.append(f"{where}: {message}{got}{source}")
    if len(problems) == 1:
        return f"invalid settings in {path}: {problems[0]}"
    return "\n  ".join([f"invalid settings in {path}:", *problems])
