"""Backups that restore: everything one node holds in one tar archive, and the way back, checked before writing.

What a node holds, and in which order it is taken while the node runs (the order is what makes the copy
consistent; it is also the order of the archive's members):
  1. the retrieval index (`<data_dir>/retrieval/`). It is a cache of the database, and a case enters it only
     after its job row is committed (`node.pipeline`), so taken *before* the database it names no case the
     snapshot lacks (an index naming a job id the restored database reuses would point to the wrong case);
     a case it misses is one neighbour fewer until the next `reindex`.
  2. the node's database: SQLite through the sqlite3 online backup API in one step (a consistent snapshot while
     the node writes: in WAL mode a reader does not block the writers), PostgreSQL with `pg_dump -Fc` (one
     transaction snapshot; the URL's password goes in PGPASSWORD, never on the command line). Its Alembic
     revision goes into the manifest.
  3. the MLflow tracking database (`registry.tracking_uri`, SQLite or PostgreSQL, the same way), when there is one.
  4. every other file under the data folder: spool, results, logs, MLflow artifacts, downloaded models. They are
     walked after the snapshots, and the node writes a file before it commits the row that names it (spool
     before the job row, results before ENCODED, artifacts before the run records them), so every file a
     snapshot row names is in the archive; files newer than the snapshot come along and do no harm. The node
     writes these files atomically (temp file, then rename), so each is copied whole; temp files (names
     starting with "." or ending in ".part", `spool/.incoming`) and the backup folder are left out. The
     append-only logs under `logs/` (the audit file) are cut at a line boundary under the lock their writer
     takes, together with their `.checkpoint` (the chain's signed head), so the copied chain verifies. The
     audit key lives outside the data folder and stays out of the archive: keep it apart (README).
  5. the MLflow artifact root when it lies outside the data folder.

The archive (`smartnodule-backup-<UTC time>.tar`, mode 0600: it holds patient data) is an uncompressed tar so
that it can be checked and read by offset; members `data/<path under the data folder>`, `database/node.sqlite`
or `.pgdump`, `database/mlflow.*`, `artifacts/<path>`, and `manifest.json` last: format, time, schema revision, each file
with size and sha256, totals per part, the sha256 of every archive byte before the manifest, and the manifest's
own digest. It is written under a temp name, fsynced, then renamed: an archive that exists is complete.

Restore checks every byte before it writes one (the manifest's digest, the sha256 of all bytes before it, only
zeros after it), refuses an archive whose schema revision this code does not know, one taken with another
`node.data_dir` (the job rows name their files by path under it), a data folder, database or
artifact root that is not empty (unless `force`, which also refuses while a node answers on the node's port),
then writes each file under a temp name and renames it, restores the database (`pg_restore --clean --if-exists`)
and migrates it to the newest revision.

Costs: files are streamed in 1 MiB chunks, never read whole; what is held in memory is the file list (about
150 bytes a file: the manifest, and tarfile's member list while reading) and the small `.checkpoint` files.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO

import structlog
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from config.settings import Settings
from node.store.db import current_revision, is_known_revision, make_engine, migrate, sqlite_file
from node.store.spool import OutsideRoot, fsync_dir, under

log = structlog.get_logger(__name__)

FORMAT, FORMAT_VERSION = "smartnodule-backup", 1
MANIFEST = "manifest.json"
ARCHIVE_PREFIX, ARCHIVE_SUFFIX = "smartnodule-backup-", ".tar"
CHUNK = 1 << 20
MANIFEST_MAX_BYTES = 1 << 30
CHECKPOINT_SUFFIX = ".checkpoint"  # node.audit.CHECKPOINT_SUFFIX (the store does not import node.audit)
DATABASES = {"node": "database_url", "mlflow": "tracking_uri"}  # member stem -> the Settings property with its URL
_MEMBER_SUFFIX = {"sqlite": ".sqlite", "postgresql": ".pgdump"}


class BackupError(RuntimeError):
    """A backup or restore that cannot proceed; the message says why and names paths, never patient data."""


@dataclass(frozen=True)
class Part:
    """Files and bytes of one part of an archive (`database`, `spool`, `results`, `logs`, ...)."""

    name: str
    files: int
    bytes: int


@dataclass(frozen=True)
class BackupManifest:
    """What an archive holds: where it is, when it was taken, the schema revision, the parts."""

    path: Path
    created_at: str
    schema_revision: str | None
    database: str
    parts: tuple[Part, ...]
    size_bytes: int
    skipped: tuple[str, ...] = ()

    @property
    def files(self) -> int:
        return sum(p.files for p in self.parts)

    @classmethod
    def read(cls, path: Path, manifest: dict) -> "BackupManifest":
        return cls(path=path, created_at=manifest["created_at"], schema_revision=manifest["schema_revision"],
                   database=manifest["databases"]["node"],
                   parts=tuple(Part(name, *counts) for name, counts in manifest["parts"].items()),
                   size_bytes=path.stat().st_size, skipped=tuple(manifest["skipped"]))


@dataclass(frozen=True)
class RestoreReport:
    """A finished restore: the archive's manifest, files and bytes written, schema revision before and after."""

    manifest: BackupManifest
    files: int
    bytes: int
    schema_from: str | None
    schema_to: str


# --- backup ---------------------------------------------------------------------------------------------------

def backup(settings: Settings, dest: Path) -> BackupManifest:
    """Write one archive of everything `settings`' node holds into the folder `dest` (module docstring)."""
    dest = Path(dest)
    dest.mkdir(mode=0o750, parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    final = dest / f"{ARCHIVE_PREFIX}{now.strftime('%Y%m%dT%H%M%S')}.{now.microsecond // 1000:03d}Z{ARCHIVE_SUFFIX}"
    temporary = dest / f".{final.name}.{os.getpid()}.partial"
    data_dir = settings.node.data_dir.resolve()
    leave_out = {dest.resolve(), settings.backup_dir.resolve()}
    try:
        with open(temporary, "xb") as f:
            os.chmod(temporary, 0o600)
            writer = _Writer(f)
            for path in _walk(data_dir / "retrieval", leave_out):  # 1. the index, a cache of the database
                writer.add_file("retrieval", f"data/{path.relative_to(data_dir).as_posix()}", path)
            databases, skipped, revision = _add_databases(writer, settings, dest, leave_out)  # 2. and 3.
            files = list(_walk(data_dir, leave_out | {data_dir / "retrieval"}))  # 4. after the snapshots
            artifacts = settings.artifact_root
            outside = [] if artifacts.is_relative_to(data_dir) else list(_walk(artifacts, leave_out))
            _check_space(dest, files + outside)
            _add_data_files(writer, files, data_dir, settings.log_dir.resolve())
            for path in outside:  # 5.
                writer.add_file("artifacts", f"artifacts/{path.relative_to(artifacts).as_posix()}", path)
            writer.close({"format": FORMAT, "format_version": FORMAT_VERSION, "created_at": now.isoformat(),
                          "schema_revision": revision, "data_dir": str(settings.node.data_dir),
                          "databases": databases, "skipped": skipped})
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, final)
        fsync_dir(dest)
    finally:
        temporary.unlink(missing_ok=True)
    manifest = BackupManifest(final, now.isoformat(), revision, databases["node"], writer.part_list(),
                              final.stat().st_size, tuple(skipped))
    log.info("backup_written", archive=str(final), bytes=manifest.size_bytes, files=manifest.files,
             schema_revision=revision, skipped=skipped)
    return manifest


def _add_databases(writer: "_Writer", settings: Settings, dest: Path, leave_out: set[Path]
                   ) -> tuple[dict[str, str], list[str], str | None]:
    """Snapshot the node's and MLflow's databases into the archive (staged in `dest`, then removed); their files
    join `leave_out`. Returns {stem: dialect}, what was not covered and why, the node schema's revision."""
    databases, skipped, revision = {}, [], None
    for stem, attribute in DATABASES.items():
        url = getattr(settings, attribute)
        dialect, why = _dumpable(url)
        if dialect is None and stem == "node":
            raise BackupError(f"no node database to back up: {why}")
        if dialect is None:
            skipped.append(f"{stem} database: {why}")
            continue
        if dialect == "sqlite":
            leave_out.update(_sqlite_files(url))
        staged = dest / f".{stem}-{os.getpid()}{_MEMBER_SUFFIX[dialect]}"
        try:
            found = _dump(url, dialect, staged)
            writer.add_file("database" if stem == "node" else "mlflow", f"database/{stem}{staged.suffix}", staged)
        finally:
            staged.unlink(missing_ok=True)
        databases[stem] = dialect
        revision = found if stem == "node" else revision
    return databases, skipped, revision


def _add_data_files(writer: "_Writer", files: list[Path], data_dir: Path, log_dir: Path) -> None:
    """The data folder's files, one part per top-level folder; a log in `log_dir` with its checkpoint."""
    for path in files:
        relative = path.relative_to(data_dir)
        in_logs = path.parent == log_dir
        if in_logs and path.name.endswith(CHECKPOINT_SUFFIX) \
                and path.with_name(path.name[:-len(CHECKPOINT_SUFFIX)]).exists():
            continue  # a log's checkpoint travels with its log
        writer.add_file(relative.parts[0] if len(relative.parts) > 1 else "data", f"data/{relative.as_posix()}", path,
                        log=in_logs)


def prune(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` archives in `folder`; the deleted ones."""
    archives = sorted(Path(folder).glob(f"{ARCHIVE_PREFIX}*{ARCHIVE_SUFFIX}"))
    old = archives[:-keep] if keep > 0 else archives
    for path in old:
        path.unlink()
    return old


class _HashingWriter:
    """The archive's file object: hashes every byte written (the manifest records the hash of those before it)."""

    def __init__(self, out) -> None:
        self._out, self.digest = out, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self._out.write(data)

    def tell(self) -> int:
        return self._out.tell()


class _HashingReader:
    """Reads a source for tarfile, hashing what it hands over."""

    def __init__(self, source) -> None:
        self._source, self.digest = source, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.digest.update(data)
        return data


class _Writer:
    """Adds files to the tar with their size and sha256, and the manifest last."""

    def __init__(self, fileobj) -> None:
        self._out = _HashingWriter(fileobj)
        # TarFile takes copybufsize through tarfile.open's keywords; typeshed's overloads leave it out
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=tarfile.PAX_FORMAT,  # type: ignore[call-overload]
                                 copybufsize=CHUNK)
        self._files: list[list] = []
        self._parts: dict[str, list[int]] = {}

    def add_file(self, part: str, member: str, path: Path, *, log: bool = False) -> None:
        """Copy the file as it is now; one removed meanwhile (retention) is left out. A `log` (append-only) is
        measured, with its checkpoint, under the lock its writer takes, and copied up to that size: whole lines."""
        try:
            source = open(path, "rb")
        except FileNotFoundError:
            return
        with source:
            checkpoint = path.with_name(path.name + CHECKPOINT_SUFFIX)
            if log:
                fcntl.flock(source.fileno(), fcntl.LOCK_SH)
            try:
                stat = os.fstat(source.fileno())
                companion = checkpoint.read_bytes() if log and checkpoint.is_file() else None
            finally:
                if log:
                    fcntl.flock(source.fileno(), fcntl.LOCK_UN)
            if companion is not None:
                self._add(part, member + CHECKPOINT_SUFFIX, io.BytesIO(companion), len(companion), stat.st_mtime)
            self._add(part, member, source, stat.st_size, stat.st_mtime)  # reads exactly st_size bytes

    def _add(self, part: str, member: str, source, size: int, mtime: float) -> None:
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode = size, int(mtime), 0o640
        reader = _HashingReader(source)
        self._tar.addfile(info, reader)
        self._files.append([member, size, reader.digest.hexdigest()])
        counts = self._parts.setdefault(part, [0, 0])
        counts[0] += 1
        counts[1] += size

    def part_list(self) -> tuple[Part, ...]:
        return tuple(Part(name, *counts) for name, counts in self._parts.items())

    def close(self, manifest: dict) -> None:
        manifest = {**manifest, "parts": self._parts, "files": self._files,
                    "archive_sha256": self._out.digest.hexdigest()}
        data = json.dumps({**manifest, "digest": manifest_digest(manifest)}, indent=0).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o640
        self._tar.addfile(info, io.BytesIO(data))
        self._tar.close()


def manifest_digest(manifest: dict) -> str:
    """The sha256 of a manifest's content without its `digest` key, in a canonical JSON form."""
    body = {key: value for key, value in manifest.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _temporary(name: str) -> bool:
    return name.startswith(".") or name.endswith(".part")


def _walk(root: Path, leave_out: set[Path]) -> Iterator[Path]:
    """Regular files under `root` (sorted, no symbolic links, no temp files, nothing under `leave_out`)."""
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not _temporary(d) and here / d not in leave_out
                         and not (here / d).is_symlink())
        for name in sorted(names):
            path = here / name
            if not _temporary(name) and path not in leave_out and not path.is_symlink():
                yield path


def _check_space(dest: Path, files: list[Path]) -> None:
    needed = 0
    for path in files:
        try:
            needed += path.stat().st_size
        except FileNotFoundError:
            pass
    free = shutil.disk_usage(dest).free
    if needed + (64 << 20) > free:
        raise BackupError(f"not enough space in {dest}: the files need about {needed / 1e6:.0f} MB, "
                          f"{free / 1e6:.0f} MB are free (scheduler.backup_dir or --to names another folder)")


# --- databases ------------------------------------------------------------------------------------------------

def _dumpable(url: str) -> tuple[str | None, str]:
    """("sqlite" | "postgresql", "") for a database this module backs up, else (None, why not)."""
    try:
        parsed = make_url(url)
    except Exception:
        return None, "not a database URL (a remote tracking server: back it up there)"
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = parsed.database
        if not path or path == ":memory:" or path.startswith("file:"):
            return None, "an in-memory or URI-form SQLite database"
        return ("sqlite", "") if Path(path).is_file() else (None, f"absent ({path})")
    if backend == "postgresql":
        return "postgresql", ""
    return None, f"a {backend} database, which this backup does not cover"


def _sqlite_file(url: str) -> str:
    """The file a SQLite URL names (`node.store.db.sqlite_file`); BackupError for one without a file."""
    path = sqlite_file(url)
    if path is None:
        raise BackupError("a SQLite database URL without a file (in memory) cannot be backed up or restored")
    return str(path)


def _sqlite_files(url: str) -> set[Path]:
    path = Path(_sqlite_file(url)).resolve()
    return {path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))}


def _dump(url: str, dialect: str, target: Path) -> str | None:
    """Snapshot the database at `url` into the file `target`; its Alembic revision (None: no alembic table)."""
    if dialect == "sqlite":
        source = sqlite3.connect(_sqlite_file(url), timeout=30)
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)  # all pages in one step: one consistent snapshot
            return _sqlite_revision(copy)
        finally:
            copy.close()
            source.close()
    before = _postgres_revision(url)
    _pg_tool(["pg_dump", "--format=custom", f"--file={target}"], url)
    if _postgres_revision(url) != before:
        raise BackupError("the database schema changed during the backup (a migration ran): take it again")
    return before


def _sqlite_revision(connection: sqlite3.Connection) -> str | None:
    try:
        row = connection.execute("select version_num from alembic_version").fetchone()
    except sqlite3.OperationalError:
        return None
    return row[0] if row else None


def _postgres_revision(url: str) -> str | None:
    with _postgres(url) as connection:
        return current_revision(connection)


@contextmanager
def _postgres(url: str):
    """A connection to the PostgreSQL database at `url`; BackupError (one line) when it cannot be reached."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            yield connection
    except OperationalError as exc:
        raise BackupError(f"cannot reach the PostgreSQL database {make_url(url).database!r}: "
                          f"{str(exc.orig).strip().splitlines()[0]}") from None
    finally:
        engine.dispose()


def pg_invocation(command: list[str], url: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run pg_dump / pg_restore against `url`: its parameters as a libpq
    connection string, the password in PGPASSWORD (never on the command line, where `ps` shows it)."""
    parsed = make_url(url)
    params = {"host": parsed.host, "port": parsed.port, "user": parsed.username, "dbname": parsed.database,
              **{key: value if isinstance(value, str) else value[-1] for key, value in parsed.query.items()}}
    conninfo = " ".join(f"{key}='{_libpq_quote(str(value))}'" for key, value in params.items() if value is not None)
    return [*command, f"--dbname={conninfo}"], {**os.environ, **({"PGPASSWORD": parsed.password} if parsed.password else {})}


def _pg_tool(command: list[str], url: str) -> None:
    """Run pg_dump / pg_restore against `url` (`pg_invocation`); BackupError with its last line when it fails."""
    argv, env = pg_invocation(command, url)
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise BackupError(f"{command[0]} is not installed (Debian: apt-get install postgresql-client)") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise BackupError(f"{command[0]} exited {done.returncode}: {last}")


def _libpq_quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _postgres_tables(url: str) -> int:
    with _postgres(url) as connection:
        return connection.execute(text("select count(*) from information_schema.tables "
                                       "where table_schema = current_schema()")).scalar_one()


# --- restore --------------------------------------------------------------------------------------------------

def verify(archive: Path) -> dict:
    """The manifest of `archive` once every byte is checked; BackupError naming what is wrong, before any write."""
    archive = Path(archive)
    if not archive.is_file():
        raise BackupError(f"archive {archive} does not exist")
    with open(archive, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                members = tar.getmembers()
                if not members or members[-1].name != MANIFEST or not members[-1].isfile() \
                        or members[-1].size > MANIFEST_MAX_BYTES:
                    raise BackupError(f"{archive} is damaged, cut short, or not a SmartNodule backup (no manifest "
                                      "found at its end)")
                manifest_member = members[-1]
                raw = _member_file(tar, manifest_member).read()
        except tarfile.TarError as exc:
            raise BackupError(f"{archive} is damaged or not a tar archive ({exc})") from None
        try:
            manifest = json.loads(raw)
            valid = manifest.get("format") == FORMAT and manifest.get("digest") == manifest_digest(manifest)
        except (ValueError, AttributeError):
            valid = False
        if not valid:
            raise BackupError(f"{archive}: its manifest is damaged or not a SmartNodule backup's")
        if manifest["format_version"] > FORMAT_VERSION:
            raise BackupError(f"{archive} has backup format {manifest['format_version']}; this version reads "
                              f"{FORMAT_VERSION}: restore it with the version that wrote it")
        if _prefix_sha256(f, manifest_member.offset) != manifest["archive_sha256"]:
            raise BackupError(f"{archive} is damaged: {_damaged_member(archive, manifest)}")
        f.seek(manifest_member.offset_data + manifest_member.size)
        while chunk := f.read(CHUNK):
            if chunk.strip(b"\0"):
                raise BackupError(f"{archive} is damaged: bytes after its manifest were changed")
    listed = [(name, size) for name, size, _ in manifest["files"]]
    if listed != [(m.name, m.size) for m in members[:-1]] or not all(m.isfile() for m in members[:-1]):
        raise BackupError(f"{archive}: its members differ from its manifest")
    return manifest


def _prefix_sha256(f, length: int) -> str:
    f.seek(0)
    digest, left = hashlib.sha256(), length
    while left and (chunk := f.read(min(CHUNK, left))):
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def _damaged_member(archive: Path, manifest: dict) -> str:
    """Which member's content differs from the manifest (the slow pass, run only on a damaged archive)."""
    expected = {name: sha for name, _, sha in manifest["files"]}
    with tarfile.open(archive, mode="r:") as tar:
        for member in tar:
            if member.name in expected and member.isfile():
                if _sha256(tar.extractfile(member)) != expected[member.name]:
                    return f"{member.name} differs from the manifest"
    return "a tar header or padding was changed"


def _sha256(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def restore(archive: Path, settings: Settings, *, force: bool = False) -> RestoreReport:
    """Put the node of `settings` back to what `archive` holds, then migrate its database to the newest revision."""
    archive = Path(archive)
    manifest = verify(archive)
    revision = manifest["schema_revision"]
    if revision is not None and not is_known_revision(revision):
        raise BackupError(f"{archive} is at schema revision {revision}, which this version of SmartNodule does not "
                          "know (a newer version wrote it): restore it with that version")
    if manifest["data_dir"] != str(settings.node.data_dir):
        raise BackupError(f"{archive} was taken with node.data_dir = {manifest['data_dir']} and the job rows name files "
                          f"under it; this node's is {settings.node.data_dir}: restore with the same node.data_dir")
    targets = _targets(manifest, settings)
    data_dir = settings.node.data_dir.resolve()
    keep = {settings.backup_dir.resolve(), archive.resolve().parent}
    occupied = _occupied(manifest, settings, keep)
    if occupied and not force:
        raise BackupError(f"{'; '.join(occupied)}: restore into an empty place, or pass --force to replace it")
    needed = sum(size for _, size, _ in manifest["files"])
    data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    if needed > shutil.disk_usage(data_dir).free:
        raise BackupError(f"not enough space in {data_dir}: the archive holds {needed / 1e6:.0f} MB")
    if occupied:
        _refuse_running_node(settings)
        _clear(manifest, settings, keep)
    written = _write_members(archive, manifest, targets, data_dir)
    os.sync()
    engine = make_engine(settings.database_url)
    try:
        found, head = migrate(engine, upgrade=True)
    finally:
        engine.dispose()
    return RestoreReport(BackupManifest.read(archive, manifest), len(manifest["files"]), written, found, head)


def _write_members(archive: Path, manifest: dict, targets: dict, data_dir: Path) -> int:
    """Write every member to its target (a PostgreSQL dump staged in `data_dir`, then pg_restore); bytes written."""
    expected = {name: sha for name, _, sha in manifest["files"]}
    written = 0
    with tarfile.open(archive, mode="r:") as tar:
        for member in tar:
            if member.name == MANIFEST:
                continue
            target, mode = targets[member.name]
            if isinstance(target, str):
                staged = data_dir / f".restore-{os.getpid()}.pgdump"
                try:
                    _write(tar, member, staged, expected[member.name], 0o600)
                    _pg_tool(["pg_restore", "--clean", "--if-exists", "--no-owner", "--no-privileges",
                              "--single-transaction", "--exit-on-error", str(staged)], target)
                finally:
                    staged.unlink(missing_ok=True)
            else:
                _write(tar, member, target, expected[member.name], mode)
            written += member.size
    return written


def _targets(manifest: dict, settings: Settings) -> dict[str, tuple[Path | str, int]]:
    """Where each member goes: (path, mode) for a file, (database URL, 0) for a PostgreSQL dump.

    Names are checked like untrusted input: relative, no `..`, resolved under their root.
    """
    targets: dict[str, tuple[Path | str, int]] = {}
    for name, _, _ in manifest["files"]:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or len(path.parts) < 2:
            raise BackupError(f"archive member {name!r} is not a relative path inside the archive's parts")
        head, rest = path.parts[0], path.parts[1:]
        try:
            if head == "data":
                targets[name] = (under(settings.node.data_dir, settings.node.data_dir.joinpath(*rest)), 0o640)
            elif head == "artifacts":
                targets[name] = (under(settings.artifact_root, settings.artifact_root.joinpath(*rest)), 0o640)
            elif head == "database" and len(rest) == 1 and Path(rest[0]).stem in DATABASES:
                targets[name] = _database_target(Path(rest[0]), settings)
            else:
                raise BackupError(f"archive member {name!r} belongs to no part this version restores")
        except OutsideRoot:
            raise BackupError(f"archive member {name!r} resolves outside its folder") from None
    return targets


def _database_target(member: Path, settings: Settings) -> tuple[Path | str, int]:
    url = getattr(settings, DATABASES[member.stem])
    dialect = make_url(url).get_backend_name()
    if _MEMBER_SUFFIX.get(dialect) != member.suffix:
        archived = "SQLite" if member.suffix == ".sqlite" else "PostgreSQL"
        setting = "node.database_url" if member.stem == "node" else "registry.tracking_uri"
        raise BackupError(f"the archive holds a {archived} {member.stem} database, but {setting} names a {dialect} "
                          "database: set it to the same kind of database")
    return (url, 0) if dialect == "postgresql" else (Path(_sqlite_file(url)), 0o600)


def _occupied(manifest: dict, settings: Settings, keep: set[Path]) -> list[str]:
    """What is already there that a restore would replace (`keep`: the backup folder and the archive's own)."""
    found = []
    data_dir = settings.node.data_dir
    if data_dir.is_dir() and any(entry.resolve() not in keep for entry in data_dir.iterdir()):
        found.append(f"the data folder {data_dir} is not empty")
    for stem, dialect in manifest["databases"].items():
        url = getattr(settings, DATABASES[stem])
        if dialect == "sqlite" and Path(_sqlite_file(url)).is_file() \
                and not Path(_sqlite_file(url)).resolve().is_relative_to(data_dir.resolve()):
            found.append(f"the {stem} database {make_url(url).database} exists")
        elif dialect == "postgresql" and _postgres_tables(url):
            found.append(f"the {stem} database has tables")
    artifacts = settings.artifact_root
    if any(name.startswith("artifacts/") for name, _, _ in manifest["files"]) and artifacts.is_dir() \
            and any(artifacts.iterdir()):
        found.append(f"the MLflow artifact folder {artifacts} is not empty")
    return found


def _refuse_running_node(settings: Settings) -> None:
    host = "127.0.0.1" if settings.node.host in ("0.0.0.0", "::", "") else settings.node.host
    try:
        with socket.create_connection((host, settings.node.port), timeout=1.0):
            pass
    except OSError:
        return
    raise BackupError(f"something answers on {host}:{settings.node.port}, the node's port: stop every node role "
                      "before restoring over its data")


def _clear(manifest: dict, settings: Settings, keep: set[Path]) -> None:
    """Remove what a forced restore replaces (PostgreSQL databases are cleaned by pg_restore --clean)."""
    data_dir = settings.node.data_dir
    for entry in data_dir.iterdir() if data_dir.is_dir() else ():
        if entry.resolve() in keep:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for stem, dialect in manifest["databases"].items():
        if dialect == "sqlite":
            for path in _sqlite_files(getattr(settings, DATABASES[stem])):
                path.unlink(missing_ok=True)
    artifacts = settings.artifact_root
    if any(name.startswith("artifacts/") for name, _, _ in manifest["files"]) and artifacts.is_dir():
        shutil.rmtree(artifacts)


def _member_file(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """The bytes of a regular-file member; BackupError for anything else (a link, a folder, a device)."""
    source = tar.extractfile(member)
    if source is None:
        raise BackupError(f"archive member {member.name!r} is not a regular file")
    return source


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, sha256: str, mode: int) -> None:
    """Stream one member to a temp file beside `target`, check its sha256 again, rename it into place."""
    target.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.restore-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with _member_file(tar, member) as source, open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode),
                                                      "wb") as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise BackupError(f"archive member {member.name} changed while it was being restored")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
