"""The durable spool: received instances land here atomically before they are acknowledged.

Layout: `<spool>/<Study Instance UID>/<SOP Instance UID>.dcm`, and
`<SOP Instance UID>.v<N>.dcm` beside it for version N > 1 of an instance that
arrived again with other content (`node.scp`). A UID becomes part of a path
only after it matches the DICOM UID grammar (PS3.5 9.1: components of digits
separated by single dots, no leading zero in a component other than a lone
"0", at most 64 characters), and every path is resolved and checked to lie
under the spool root. A file is placed without ever replacing one that is
already there (a hard link, which fails on an existing name).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

UID_MAX_LENGTH = 64
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


class UnsafeUID(ValueError):
    """A UID that must not become part of a file path."""


class OutsideRoot(ValueError):
    """A path that would resolve outside the folder it belongs under."""


def is_uid(text: str) -> bool:
    """True when `text` follows the DICOM UID grammar (PS3.5 9.1)."""
    return len(text) <= UID_MAX_LENGTH and UID_PATTERN.fullmatch(text) is not None


def checked_uid(uid: object, what: str) -> str:
    """`uid` as a str when it follows the DICOM UID grammar, else UnsafeUID naming `what` (never the value)."""
    text = str(uid or "")
    if not is_uid(text):
        raise UnsafeUID(f"{what} is not a valid UID ({len(text)} characters)")
    return text


def under(root: Path, path: Path) -> Path:
    """`path` resolved, when it lies below `root` (resolved too); else OutsideRoot."""
    resolved_root, resolved = root.resolve(), path.resolve()
    if resolved == resolved_root or not resolved.is_relative_to(resolved_root):
        raise OutsideRoot(f"path resolves outside {resolved_root}")
    return resolved


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Atomic placement of files under one root folder (which also holds the incoming temp files)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / ".incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    def sweep_incoming(self, older_than_s: float) -> int:
        """Remove temp files of transfers that ended without a C-STORE response (aborted, dropped, disk full).

        A live transfer writes to its file continuously, so one untouched for
        `older_than_s` (more than the network timeout) belongs to no association.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for entry in os.scandir(self.incoming):
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # finished and moved meanwhile
                continue
        return removed

    def path_for(self, study_uid: str, sop_uid: str, version: int = 1) -> Path:
        """Where version `version` of an instance lives; checked UIDs, resolved under the root."""
        study = checked_uid(study_uid, "Study Instance UID")
        sop = checked_uid(sop_uid, "SOP Instance UID")
        name = f"{sop}.dcm" if version == 1 else f"{sop}.v{version}.dcm"
        return under(self.root, self.root / study / name)

    def place(self, source: Path, study_uid: str, sop_uid: str, version: int = 1, *, replace: bool = False) -> Path:
        """Move `source` into the spool durably (fsync, link, fsync folder), never over an existing file.

        FileExistsError when that version of the instance is already there, unless
        `replace` (for a file that no job row refers to: never acknowledged). On
        another file system the file is copied to a temp file beside the target first.
        """
        target = self.path_for(study_uid, sop_uid, version)
        new_folder = not target.parent.is_dir()
        target.parent.mkdir(exist_ok=True)
        with open(source, "rb+") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(source, target)
            fsync_dir(target.parent)
            return target
        try:
            os.link(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # FileExistsError among them
                raise
            with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, tmp, 1 << 20)
                tmp.flush()
                os.fsync(tmp.fileno())
            try:
                os.link(tmp.name, target)
            finally:
                os.unlink(tmp.name)
        os.unlink(source)
        fsync_dir(target.parent)
        if new_folder:
            fsync_dir(self.root)
        return target


def file_sha256(path: Path | str) -> str | None:
    """The sha256 (hex) of a file's bytes, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def write_atomic(target: Path, data: bytes) -> None:
    """Write bytes to `target` so that a reader sees the old file or the whole new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, target)
    fsync_dir(target.parent)
