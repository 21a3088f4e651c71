"""Owns the receive path from TCP connection to spool file, at seams of pynetdicom 3.0.4 (pinned).

Limits come before cost: nothing a peer sends is buffered beyond a bound before
it has been checked.

- `GatedAssociationServer` is pynetdicom's `ThreadedAssociationServer` made by
  `AE.make_server(server_class=..., request_handler=...)` and started by `serve`
  as `AE.start_server(block=False)` does (its thread, `ae._servers`). Its
  `BulkReadRequestHandler` runs in the per-connection thread that
  `socketserver.ThreadingMixIn` starts, *before* pynetdicom creates the
  `Association` thread:
  * a per-address cap (`node.max_connections_per_address`): connections from one
    address still waiting for their A-ASSOCIATE-RQ plus that address's live
    associations; one over it is closed at once;
  * the TLS handshake (pynetdicom would do it in `get_request`, in the accept loop,
    where one silent TLS peer stalls every other connection) and the whole
    A-ASSOCIATE-RQ must arrive within `node.association_request_timeout_s`; a peer
    that says nothing, sends something else, or closes is dropped without ever
    becoming an association;
  * the A-ASSOCIATE-RQ's PDU length is checked before its body is read.
  Only then is pynetdicom's `Association` created, with the PDU already read handed
  to its socket. pynetdicom 3.0.4 counts `maximum_associations` in
  `ACSE._negotiate_as_acceptor` as the live `Association` threads of the AE
  (`ae.active_associations`, acceptors), and an acceptor thread otherwise exists
  from TCP accept on, waiting up to the ACSE timeout for the request: so silent
  connections used to hold slots. Here only peers that sent a complete
  A-ASSOCIATE-RQ hold one.
- `BulkReadSocket` reads each PDU with `recv_into` into one buffer (pynetdicom's
  own socket reads 4 KiB per `recv` call, about 2,000 Python-level calls for one
  8 MB radiograph), serves the prefetched A-ASSOCIATE-RQ first, and refuses a PDU
  whose length field exceeds `node.max_pdu_bytes` plus the 6-byte header before
  reading it: it sends an A-ABORT, logs `pdu_refused` and ends the connection.
  pynetdicom's DUL calls `recv(6)` for a PDU header and then `recv(length)`.
- `IncomingFiles` makes the file that pynetdicom's chunked receive
  (`_config.STORE_RECV_CHUNKED_DATASET`) streams a C-STORE data set into, in
  the spool's incoming folder, hashing it (sha256) as it is written. A write
  that fails (disk full, quota, I/O error) or that takes the instance past the
  size limit is not raised in pynetdicom's reader thread, where it would abort
  the association without a status: the file is emptied at once, the rest of
  the instance is read and dropped, and the C-STORE handler answers a failure
  status with the reason (`IncomingFiles.failure`).
- `inflated_size_exceeds` bounds a Deflated Explicit VR Little Endian data set
  by streaming inflation in small pieces, before pydicom (which inflates the
  whole data set in memory) reads it.

`serve` and `stream_into` put them in place for one listener.
"""
from __future__ import annotations

import errno
import hashlib
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
import weakref
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import cast

import structlog
from pynetdicom import AE, dimse_messages, evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = structlog.get_logger(__name__)

PREALLOCATE_MAX = 4 << 20  # bytes; pynetdicom's largest PDU here is node.max_pdu_bytes (1 MiB by default)
TOO_LARGE = "too_large"
DISK_FULL = "disk_full"
WRITE_FAILED = "write_failed"

PDU_HEADER = 6  # type, reserved, 4-byte length (PS3.8 9.3.1)
A_ASSOCIATE_RQ = 0x01
ASSOCIATE_RQ_MAX = 64 << 10  # an A-ASSOCIATE-RQ with 128 presentation contexts stays far below this
# A-ABORT PDU: source 2 (service provider), reason 6 (invalid PDU parameter value), PS3.8 9.3.8.
A_ABORT_INVALID_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])


@dataclass(frozen=True)
class ConnectionLimits:
    """What a connection must keep to before and while it is an association."""

    max_pdu_bytes: int  # node.max_pdu_bytes: largest PDU length field accepted, plus PDU_HEADER
    request_timeout_s: float  # TLS handshake plus the whole A-ASSOCIATE-RQ
    max_per_address: int  # waiting connections plus live associations from one address
    ssl_context: ssl.SSLContext | None = None

    @property
    def max_pdu_length(self) -> int:
        return self.max_pdu_bytes + PDU_HEADER

    @property
    def max_request_length(self) -> int:
        return max(self.max_pdu_length, ASSOCIATE_RQ_MAX)


class BulkReadSocket(AssociationSocket):
    """An AssociationSocket whose `recv(n)` fills one buffer with `recv_into`, within a PDU length limit."""

    max_pdu_length: int | None = None  # set per connection by BulkReadRequestHandler
    prefetched: bytes = b""  # the A-ASSOCIATE-RQ the handler read before the association existed

    @property
    def ready(self) -> bool:
        return bool(self.prefetched) or super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        """Read `nr_bytes` (fewer when the peer closes the connection), as pynetdicom's `recv` does.

        The buffer grows at most PREALLOCATE_MAX ahead of what arrived: a PDU header is the
        peer's word, and a stranger's PDU may claim 4 GiB. A claim over `max_pdu_length` is
        refused before anything of it is read (OSError, which pynetdicom's DUL treats as the
        connection's end).
        """
        if self.max_pdu_length is not None and nr_bytes > self.max_pdu_length:
            self._refuse_pdu(nr_bytes)
        buffer = bytearray(self.prefetched[:nr_bytes])
        self.prefetched = self.prefetched[nr_bytes:]
        nr_read = len(buffer)
        while nr_read < nr_bytes:
            if nr_read == len(buffer):
                buffer.extend(bytes(min(nr_bytes - nr_read, PREALLOCATE_MAX)))
            with memoryview(buffer) as view, view[nr_read:] as free:
                got = self.socket.recv_into(free, len(free)) if self.socket is not None else 0  # None: closed
            if not got:  # connection closed: return what arrived
                del buffer[nr_read:]
                return buffer
            nr_read += got
        return buffer

    def _refuse_pdu(self, length: int) -> None:
        requestor = self.assoc.requestor
        log.warning("pdu_refused", reason="pdu_too_large", pdu_length=length, limit=self.max_pdu_length,
                    calling_aet=requestor.ae_title or None,
                    peer=requestor.address if requestor.address_info is not None else None)
        _send_quietly(self.socket, A_ABORT_INVALID_PDU)
        raise OSError(errno.EMSGSIZE, f"PDU length {length} exceeds {self.max_pdu_length}")


def _send_quietly(sock: socket.socket | None, data: bytes) -> None:
    try:
        if sock is not None:
            sock.settimeout(1.0)
            sock.sendall(data)
    except OSError:
        pass


class ConnectionGate:
    """Per-address connection counting for one server, and the checks of a connection before it is an association."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._waiting: Counter[str] = Counter()
        self._lock = threading.Lock()

    def enter(self, server: ThreadedAssociationServer, address: str) -> bool:
        """Count a new connection from `address`; False (not counted) when the address is at its cap."""
        with self._lock:
            live = sum(1 for assoc in server.active_associations
                       if assoc.requestor.address_info is not None and assoc.requestor.address == address)
            if self._waiting[address] + live >= self.limits.max_per_address:
                return False
            self._waiting[address] += 1
            return True

    def leave(self, address: str) -> None:
        with self._lock:
            self._waiting[address] -= 1
            if self._waiting[address] <= 0:
                del self._waiting[address]

    def admit(self, raw: socket.socket, peer: str) -> tuple[socket.socket, bytes] | None:
        """(the socket, TLS-wrapped where configured; the whole A-ASSOCIATE-RQ PDU), or None (logged): drop it."""
        deadline = time.monotonic() + self.limits.request_timeout_s
        sock = raw
        try:
            if self.limits.ssl_context is not None:
                sock = self.limits.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.do_handshake()
            header = _read_exactly(sock, PDU_HEADER, deadline)
            if len(header) < PDU_HEADER:
                refuse_connection("closed_before_request", peer, sock, level="info")
                return None
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type != A_ASSOCIATE_RQ:
                refuse_connection("not_an_association_request", peer, sock)
                return None
            if length > self.limits.max_request_length:
                _send_quietly(sock, A_ABORT_INVALID_PDU)
                refuse_connection("pdu_too_large", peer, sock, pdu_length=length, limit=self.limits.max_request_length)
                return None
            body = _read_exactly(sock, length, deadline)
            if len(body) < length:
                refuse_connection("closed_before_request", peer, sock, level="info")
                return None
        except (TimeoutError, socket.timeout):
            refuse_connection("association_request_timeout", peer, sock, timeout_s=self.limits.request_timeout_s)
            return None
        except ssl.SSLError as exc:
            refuse_connection("tls_handshake_failed", peer, sock, error=type(exc).__name__)
            return None
        except OSError as exc:
            refuse_connection("connection_error", peer, sock, level="info", error=type(exc).__name__)
            return None
        sock.settimeout(None)  # blocking again, as pynetdicom's accepted sockets are
        return sock, bytes(header + body)


def refuse_connection(reason: str, peer: str, sock: socket.socket, level: str = "warning", **details) -> None:
    """Log `connection_refused` with the reason and close the connection (no association existed)."""
    getattr(log, level)("connection_refused", reason=reason, peer=peer, **details)
    try:
        sock.close()
    except OSError:
        pass


def _read_exactly(sock: socket.socket, nr_bytes: int, deadline: float) -> bytearray:
    """Up to `nr_bytes` from `sock` by `deadline` (TimeoutError after it); fewer when the peer closes."""
    buffer = bytearray(min(nr_bytes, PREALLOCATE_MAX))
    nr_read = 0
    while nr_read < nr_bytes:
        if nr_read == len(buffer):
            buffer.extend(bytes(min(nr_bytes - nr_read, PREALLOCATE_MAX)))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(remaining)
        with memoryview(buffer) as view, view[nr_read:] as free:
            got = sock.recv_into(free, len(free))
        if not got:
            break
        nr_read += got
    del buffer[nr_read:]
    return buffer


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a `ConnectionGate` in front of its associations."""

    gate: ConnectionGate
    # socketserver's listen backlog is 5: a burst of connections (50 opened at once) overflows it while each
    # accept starts a thread (about 5 ms here), and the kernel drops the SYNs of the rest (a 1 s retry each).
    request_queue_size = 128


class BulkReadRequestHandler(RequestHandler):
    """pynetdicom's request handler: the gate's checks first, then the association with a `BulkReadSocket`."""

    server: GatedAssociationServer

    def handle(self) -> None:
        gate = self.server.gate
        peer = str(self.client_address[0])
        if not gate.enter(self.server, peer):
            refuse_connection("too_many_connections_from_address", peer, self.request, limit=gate.limits.max_per_address)
            return
        try:
            admitted = gate.admit(self.request, peer)
            if admitted is None:
                return
            self.request, first_pdu = admitted
            assoc = self._create_association()
            sock = cast(BulkReadSocket, assoc.dul.socket)  # made on our socket above, never None here
            sock.__class__ = BulkReadSocket  # adds methods; its state is set here
            sock.max_pdu_length = gate.limits.max_pdu_length
            sock.prefetched = first_pdu
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()  # a live thread from here on: counted by `enter` through active_associations
        finally:
            gate.leave(peer)


def serve(ae: AE, address: tuple[str, int], evt_handlers: list, limits: ConnectionLimits) -> GatedAssociationServer:
    """Listen on `address` in background threads, as `ae.start_server(address, block=False)` does, gated."""
    server = cast(GatedAssociationServer, ae.make_server(address, evt_handlers=evt_handlers,
                                                         server_class=GatedAssociationServer,
                                                         request_handler=BulkReadRequestHandler))
    server.gate = ConnectionGate(limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True,
                              name=f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}")
    thread.start()
    ae._servers.append(server)  # as start_server does: server.shutdown() removes it
    return server


class IncomingFile:
    """One data set being received: an unbuffered file that records, rather than raises, a failed write."""

    def __init__(self, folder: Path, suffix: str, max_bytes: int, on_close: Callable[[str], None]) -> None:
        fd, self.name = tempfile.mkstemp(suffix=suffix, dir=folder)
        self.file = open(fd, "wb", buffering=0)  # pynetdicom calls `.file.flush()` after each fragment
        self.size = 0
        self.failure: str | None = None
        self.sha256 = hashlib.sha256()
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
        self.sha256.update(data)
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

    def digest(self, path: Path | str) -> str | None:
        """The sha256 (hex) of what was written to `path`, or None for a file not (or no longer) open here."""
        incoming = self._open.get(os.fspath(path))
        return incoming.sha256.hexdigest() if incoming is not None else None


INFLATE_CHUNK = 1 << 20  # bytes of output per step: memory stays bounded whatever the ratio


def inflated_size_exceeds(path: Path, data_set_offset: int, limit: int) -> bool:
    """True when the raw-deflate data set from `data_set_offset` of `path` inflates to more than `limit` bytes.

    Inflated in steps of at most INFLATE_CHUNK bytes of output and thrown away; a
    stream that does not inflate is left to the parser to refuse.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as f:
        f.seek(data_set_offset)
        pending = b""
        while True:
            if not pending:
                pending = f.read(INFLATE_CHUNK)
                if not pending:
                    return False
            try:
                out = inflater.decompress(pending, INFLATE_CHUNK)
            except zlib.error:
                return False
            total += len(out)
            if total > limit:
                return True
            pending = inflater.unconsumed_tail
            if inflater.eof:
                return False


def stream_into(files: IncomingFiles | None) -> None:
    """Stream received data sets through `files`; None restores pynetdicom's NamedTemporaryFile.

    Process-wide, as pynetdicom's chunked-receive setting is.
    """
    # pynetdicom calls it as NamedTemporaryFile(...); IncomingFiles has that call shape, not its overloads
    dimse_messages.NamedTemporaryFile = files if files is not None else tempfile.NamedTemporaryFile  # type: ignore[assignment]
