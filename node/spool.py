"""The durable spool: received instances land here atomically before they are acknowledged.

Layout: `<spool>/<Study Instance UID>/<SOP Instance UID>.dcm`. Every UID is
checked against `^[0-9.]{1,64}$` before it becomes part of a path.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

UID_PATTERN = re.compile(r"^[0-9.]{1,64}$")


class UnsafeUID(ValueError):
    """A UID that must not become part of a file path."""


def checked_uid(uid: object, what: str) -> str:
    """`uid` as a str when it is a plain DICOM UID, else UnsafeUID naming `what`."""
    text = str(uid or "")
    if not UID_PATTERN.match(text):
        raise UnsafeUID(f"{what} {text[:80]!r} is not a valid UID")
    return text


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

    def path_for(self, study_uid: str, sop_uid: str) -> Path:
        return self.root / checked_uid(study_uid, "Study Instance UID") / f"{checked_uid(sop_uid, 'SOP Instance UID')}.dcm"

    def place(self, source: Path, study_uid: str, sop_uid: str) -> Path:
        """Move `source` into the spool durably: fsync, rename (or copy across file systems), fsync folder."""
        target = self.path_for(study_uid, sop_uid)
        new_folder = not target.parent.is_dir()
        target.parent.mkdir(exist_ok=True)
        with open(source, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.replace(source, target)
        except OSError:  # another file system: copy to a temp file beside the target first
            with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, tmp, 1 << 20)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp.name, target)
        fsync_dir(target.parent)
        if new_folder:
            fsync_dir(self.root)
        return target


def write_atomic(target: Path, data: bytes) -> None:
    """Write bytes to `target` so that a reader sees the old file or the whole new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, target)
    fsync_dir(target.parent)
