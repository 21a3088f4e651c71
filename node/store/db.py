"""The node's database: engine set-up (SQLite embedded, PostgreSQL for scale-out) and the schema.

Job state lives here alone. `jobs.py` owns the transitions and the claims.
The schema comes from the Alembic migrations: a start creates it on an empty database and
refuses an older one (`SchemaBehind`: `smartnodule migrate` backs up, then upgrades).
"""
from __future__ import annotations

import enum
import os
from datetime import datetime, timezone
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from sqlalchemy import (
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from config.settings import SettingsError
from node.store.states import JobState


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# States a job does not leave by itself (only an administrator's resend moves FAILED_DELIVERY on).
TERMINAL = frozenset({JobState.SENT, JobState.SKIPPED, JobState.REJECTED, JobState.FAILED, JobState.FAILED_DELIVERY})


class DeliveryState(str, enum.Enum):
    PENDING = "PENDING"
    SENT = "SENT"
    FAILED = "FAILED"


class UTCDateTime(TypeDecorator):
    """Timestamps stored as UTC and always read back timezone-aware, on SQLite as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use node.store.db.utcnow()")
        return None if value is None else value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}


class Job(Base):
    """One received SOP instance and everything the node did with it."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str] = mapped_column(String(16), index=True)
    calling_host: Mapped[str | None] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(Integer)
    # Version N of the instance: a repeat with other content is kept beside the first (node.scp).
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    content_sha256: Mapped[str | None] = mapped_column(String(64))  # of the spooled file; None: before 0002
    modality: Mapped[str | None] = mapped_column(String(16))

    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    encoded_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    probability: Mapped[float | None] = mapped_column(Float)
    uncertainty: Mapped[float | None] = mapped_column(Float)
    positive: Mapped[bool | None] = mapped_column(Boolean)
    review_required: Mapped[bool | None] = mapped_column(Boolean)
    location_row: Mapped[float | None] = mapped_column(Float)
    location_col: Mapped[float | None] = mapped_column(Float)
    location_radius: Mapped[float | None] = mapped_column(Float)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    quality_flags: Mapped[str | None] = mapped_column(String(256))
    review_reasons: Mapped[str | None] = mapped_column(String(256))  # comma-separated, Prediction.review_reasons
    ood_score: Mapped[float | None] = mapped_column(Float)
    stage_seconds: Mapped[str | None] = mapped_column(Text)  # JSON {"stage": seconds}
    header_warnings: Mapped[str | None] = mapped_column(Text)  # JSON ["Keyword (gggg,eeee): problem"], never values
    results_dir: Mapped[str | None] = mapped_column(String(512))

    deliveries: Mapped[list["Delivery"]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Delivery.destination", lazy="selectin"
    )


class Delivery(Base):
    """The results of one job at one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(32))
    state: Mapped[DeliveryState] = mapped_column(Enum(DeliveryState, native_enum=False, length=16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="deliveries")


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, full sync, a busy timeout and immediate transactions."""
    if url.startswith("sqlite"):
        _private_database_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases and for in-memory or URI-named SQLite."""
    parsed = make_url(url)
    database = parsed.database
    if not parsed.drivername.startswith("sqlite") or not database or database == ":memory:" \
            or database.startswith("file:"):
        return None
    return Path(database)


def _private_database_file(url: str) -> None:
    """Create the SQLite file readable by its owner only (0600; SQLite gives its -wal and -shm files the same
    mode), and narrow an existing one to that."""
    path = sqlite_file(url)
    if path is None:
        return
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)


MIGRATIONS = Path(__file__).with_name("migrations")
_POSTGRES_MIGRATION_LOCK = 0x5A4E4F44  # advisory lock: one process migrates at a time


class SchemaBehind(SettingsError):
    """The database is at an older schema revision than this code: an upgrade is due.

    A start never migrates an existing database by itself: the old code cannot read a
    migrated schema, so the way back is a backup, and a backup of the whole node (spool
    and results included) is too big to be taken unasked by every role that starts.
    `smartnodule migrate` backs up first, then migrates. Raised as a settings problem:
    the start stops with one line that says what to run.
    """

    def __init__(self, found: str, head: str) -> None:
        self.found, self.head = found, head
        super().__init__(f"the database is at schema revision {found}, this version of SmartNodule needs {head}: "
                         "stop every node role, then back up and upgrade with `smartnodule migrate [--config FILE]` "
                         "(README: Upgrade)")


class SchemaUnknown(SettingsError):
    """The database (or an archive) is at a schema revision this code does not know: newer code wrote it."""


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest schema revision this code knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migration in {MIGRATIONS / 'versions'}")
    return head


def is_known_revision(revision: str) -> bool:
    """Whether `revision` is one of this code's migrations."""
    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def current_revision(connection) -> str | None:
    """The schema revision of the database behind `connection` (None: no schema yet)."""
    return MigrationContext.configure(connection).get_current_revision()


def migrate(engine: Engine, *, upgrade: bool = False) -> tuple[str | None, str]:
    """Create the schema on an empty database; bring an older one to the newest revision only when `upgrade`.

    Returns (revision found, revision now). An older schema without `upgrade` raises
    `SchemaBehind` (see its docstring for why); one this code does not know, `SchemaUnknown`.
    """
    config = _alembic_config()
    head = head_revision()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _POSTGRES_MIGRATION_LOCK})
        found = current_revision(connection)
        if found == head:
            return found, head
        if found is not None and not is_known_revision(found):
            raise SchemaUnknown(f"the database is at schema revision {found}, which this version of SmartNodule does "
                                "not know (a newer version migrated it): run that version, or restore a backup")
        if found is not None and not upgrade:
            raise SchemaBehind(found, head)
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return found, head


class DatabaseUnavailable(SettingsError):
    """The node's database is not there or cannot be reached; the message names the setting (one line)."""


def open_database(url: str, *, must_exist: bool = False) -> sessionmaker:
    """Engine + schema (created on an empty database; an older one refused: `migrate`) + a session factory.

    `must_exist`: a SQLite file that is not there is a `DatabaseUnavailable`, not a new empty database (the
    commands that read or change a node's data, run outside its data folder). A server that cannot be reached is
    one too, whatever `must_exist` says.
    """
    shown = make_url(url).render_as_string(hide_password=True)
    path = sqlite_file(url)
    if must_exist and path is not None and not path.is_file():
        raise DatabaseUnavailable(f'database {shown} not found (run "smartnodule run" once, or set node.data_dir '
                                  f'or node.database_url)')
    engine = make_engine(url)
    try:
        engine.connect().close()
    except OperationalError as exc:
        problem = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        raise DatabaseUnavailable(f"database {shown} cannot be reached ({problem}); check node.database_url") from None
    try:
        migrate(engine)
    except SettingsError:
        engine.dispose()
        raise
    return sessionmaker(engine, expire_on_commit=False)
