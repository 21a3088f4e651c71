"""Owns the receive path from socket to spool file, at two seams of pynetdicom 3.0 (pinned).

- `BulkReadSocket` reads each PDU with `recv_into` into one buffer;
  pynetdicom's own socket reads 4 KiB per `recv` call, about 2,000 Python-level
  calls for one 8 MB radiograph.
- `IncomingFiles` makes the file that pynetdicom's chunked receive
  (`_config.STORE_RECV_CHUNKED_DATASET`) streams a C-STORE data set into, in
  the spool's incoming folder. A write that fails (disk full, quota, I/O error)
  or that takes the instance past the size limit is not raised in pynetdicom's
  reader thread, where it would abort the association without a status: the
  file is emptied at once, the rest of the instance is read and dropped, and
  the C-STORE handler answers a failure status with the reason
  (`IncomingFiles.failure`).

`stream_into` and `read_in_bulk` put them in place for one listener.
"""
from __future__ import annotations

import errno
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

from pynetdicom import dimse_messages
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

PREALLOCATE_MAX = 4 << 20  # bytes; pynetdicom's largest PDU here is node.max_pdu_bytes (1 MiB by default)
TOO_LARGE = "too_large"
DISK_FULL = "disk_full"
WRITE_FAILED = "write_failed"


class BulkReadSocket(AssociationSocket):
    """An AssociationSocket whose `recv(n)` fills one buffer with `recv_into`."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read `nr_bytes` (fewer when the peer closes the connection), as pynetdicom's `recv` does.

        The buffer grows at most PREALLOCATE_MAX ahead of what arrived: a PDU header is the
        peer's word, and a stranger's A-ASSOCIATE-RQ may claim 4 GiB.
        """
        buffer = bytearray(min(nr_bytes, PREALLOCATE_MAX))
        nr_read = 0
        while nr_read < nr_bytes:
            if nr_read == len(buffer):
                buffer.extend(bytes(min(nr_bytes - nr_read, PREALLOCATE_MAX)))
            with memoryview(buffer) as view, view[nr_read:] as free:
                got = self.socket.recv_into(free, len(free))
            if not got:  # connection closed: return what arrived
                del buffer[nr_read:]
                return buffer
            nr_read += got
        return buffer


class BulkReadRequestHandler(RequestHandler):
    """pynetdicom's request handler, with the association's socket reading in bulk."""

    def _create_association(self):
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = BulkReadSocket  # adds a method, no state
        return assoc


class IncomingFile:
    """One data set being received: an unbuffered file that records, rather than raises, a failed write."""

    def __init__(self, folder: Path, suffix: str, max_bytes: int, on_close: Callable[[str], None]) -> None:
        fd, self.name = tempfile.mkstemp(suffix=suffix, dir=folder)
        self.file = open(fd, "wb", buffering=0)  # pynetdicom calls `.file.flush()` after each fragment
        self.size = 0
        self.failure: str | None = None
        self._max_bytes = max_bytes
        self._on_close = on_close

    def write(self, data: bytes) -> int:
        if self.failure is not None:
            return len(data)
        if self.size + len(data) > self._max_bytes:
            self._fail(TOO_LARGE)
            return len(data)
        view = memoryview(data)
        try:
            while view:
                view = view[self.file.write(view):]
        except OSError as exc:
            self._fail(DISK_FULL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else WRITE_FAILED)
            return len(data)
        self.size += len(data)
        return len(data)

    def _fail(self, reason: str) -> None:
        self.failure = reason
        try:
            self.file.truncate(0)  # give the space back now, not when the handler runs
        except OSError:
            pass

    def close(self) -> None:
        self.file.close()
        self._on_close(self.name)


class IncomingFiles:
    """Stands in for pynetdicom's `NamedTemporaryFile`: the files of the data sets being received."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        # weak: a file pynetdicom drops without closing (a transfer cut short) is not kept open here
        self._open: weakref.WeakValueDictionary[str, IncomingFile] = weakref.WeakValueDictionary()

    def __call__(self, *, delete: bool = False, mode: str = "wb", suffix: str = ".dcm") -> IncomingFile:
        if delete or mode != "wb":  # pynetdicom 3.0 asks for exactly this; anything else is another version
            raise ValueError(f"unexpected temporary file request: delete={delete!r} mode={mode!r}")
        incoming = IncomingFile(self.folder, suffix, self.max_bytes, on_close=self._forget)
        self._open[incoming.name] = incoming
        return incoming

    def _forget(self, name: str) -> None:
        self._open.pop(name, None)

    def failure(self, path: Path | str) -> str | None:
        """Why the data set at `path` was not written (TOO_LARGE, DISK_FULL, WRITE_FAILED), or None."""
        incoming = self._open.get(os.fspath(path))
        return incoming.failure if incoming is not None else None


def read_in_bulk(server: AssociationServer) -> None:
    """Give the connections `server` accepts from now on a `BulkReadSocket` (one handler per connection)."""
    server.RequestHandlerClass = BulkReadRequestHandler


def stream_into(files: IncomingFiles | None) -> None:
    """Stream received data sets through `files`; None restores pynetdicom's NamedTemporaryFile.

    Process-wide, as pynetdicom's chunked-receive setting is.
    """
    dimse_messages.NamedTemporaryFile = files if files is not None else tempfile.NamedTemporaryFile
