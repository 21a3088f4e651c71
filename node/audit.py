"""Structured logging for the whole node: structlog events to a hash-chained JSON-lines audit file and the console.

Events are snake_case past tense (`instance_stored`) bound with job id, SOP
Instance UID and calling AE. Patient name, ID and birth date never enter a log:
a processor removes any such key that a caller might pass by mistake, tracebacks
carry neither local variables nor exception messages, and what pydicom and
highdicom log or warn (they quote header values) is cut down to tags and keywords.

The audit file is opened for appending only, and each line ends with
`"seq": n, "chain": HMAC-SHA256(key, previous link + this line up to seq)`. The
key lives outside the data folder (`audit.key_file`, made 0600 at first start;
a key inside the data folder stops the start), so someone who can edit the
log cannot recompute the links: an edited, inserted or removed line, a line
whose link was stripped or recomputed without the key, breaks the chain from
there on (`smartnodule audit verify`). A signed checkpoint (sequence number and
link of a record, with an HMAC) is written beside the file
(`audit.jsonl.checkpoint`) at the first record, every `audit.checkpoint_every`
records, with the first record after `audit.checkpoint_interval_s` without one,
and at close, so a tail cut off before the checkpoint shows. Records
can also be forwarded, as written, to a syslog server (RFC 5424 over TCP or
TLS, `audit.syslog`), a copy out of reach of whoever holds the node's disk.
Processes sharing the file (the scale-out roles) append under an exclusive
lock, each linking to the line last written by any of them.

Lines written before the keyed chain (an upgraded node's log: unchained or
plain SHA-256 chained) are accepted by `verify` only at the head of the file,
and only when the operator says so (`--accept-legacy-prefix`).
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import secrets
import socket
import ssl
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import structlog
from pydicom.datadict import keyword_dict

from config.settings import AuditSettings, Settings, SettingsError

AUDIT_FILE = "audit.jsonl"
CHECKPOINT_SUFFIX = ".checkpoint"
GENESIS = "0" * 64
_KEYED_SUFFIX = re.compile(r', "seq": (\d+), "chain": "([0-9a-f]{64})"}$')
_LEGACY_SUFFIX = re.compile(r', "chain": "([0-9a-f]{64})"}$')
_PATIENT_KEYS = frozenset({"patient_name", "patient_id", "patient_birth_date", "PatientName", "PatientID", "PatientBirthDate"})


def _drop_patient_data(_logger: object, _method: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    for key in _PATIENT_KEYS.intersection(event_dict):
        del event_dict[key]
    return event_dict


_SHARED: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    _drop_patient_data,
]


class AuditKeyError(SettingsError):
    """The audit key cannot be used: inside the data folder, readable by others, or malformed."""


def key_path(settings: AuditSettings, data_dir: Path) -> Path:
    """Where the audit key lives: `audit.key_file`, or `<data_dir>.audit-key` beside the data folder."""
    return settings.key_file or data_dir.parent / f"{data_dir.name}.audit-key"


def load_or_create_key(path: Path, data_dir: Path) -> bytes:
    """The audit chain's HMAC key from `path`, made (32 random bytes, hex, mode 0600) when absent.

    Refused (AuditKeyError) when it lies inside `data_dir`, when others may read it, or when malformed.
    Several processes starting at once agree on one key: it is written to a temporary file and linked.
    """
    path, data = path.resolve(), data_dir.resolve()
    if path == data or data in path.parents:
        raise AuditKeyError(f"audit.key_file {path} lies inside the data folder {data}: keep the key elsewhere, "
                            "so that whoever can edit the log cannot also re-sign it")
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_hex(32) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            temporary.unlink()
    return read_key(path)


def read_key(path: Path) -> bytes:
    """An existing audit key; refused (AuditKeyError) when others may read it or when malformed."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise AuditKeyError(f"audit key {path} may be read by others (mode {mode:o}): chmod 600 it")
    text = path.read_text().strip()
    if not re.fullmatch(r"(?:[0-9a-f]{2}){32,}", text):
        raise AuditKeyError(f"audit key {path} does not hold a hex key of at least 32 bytes")
    return bytes.fromhex(text)


def node_key(settings: Settings) -> bytes:
    """The node's audit key (made when absent), as `configure_logging` uses it for `settings`."""
    return load_or_create_key(key_path(settings.audit, settings.node.data_dir), settings.node.data_dir)


def chain_link(key: bytes, previous: str, body: str) -> str:
    return hmac.new(key, (previous + body).encode(), hashlib.sha256).hexdigest()


def checkpoint_mac(key: bytes, seq: int, head: str) -> str:
    return hmac.new(key, f"checkpoint {seq} {head}".encode(), hashlib.sha256).hexdigest()


def _split(line: str) -> tuple[str, int, str] | None:
    """(the line as it was signed, its sequence number, its link) for a keyed line, else None."""
    found = _KEYED_SUFFIX.search(line)
    return (line[:found.start(2) - len(', "chain": "')] + "}", int(found.group(1)), found.group(2)) if found else None


def _legacy_link(line: str) -> str:
    """What the first keyed line links to after a line written before the keyed chain."""
    found = _LEGACY_SUFFIX.search(line)
    return found.group(1) if found else hashlib.sha256(line.encode()).hexdigest()


class SyslogForwarder:
    """Sends each audit line to a syslog server as an RFC 5424 message (facility log audit, octet-counted framing
    of RFC 6587) over TCP or TLS, from a background thread: a slow or absent server never stalls the node. Up to
    `QUEUE_MAX` lines wait while the server is unreachable (reconnecting with backoff); more are counted as
    dropped and reported on standard error."""

    QUEUE_MAX = 10000
    FACILITY_LOG_AUDIT = 13
    SEVERITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}

    def __init__(self, url: str, ca_file: Path | None = None, timeout_s: float = 5.0) -> None:
        scheme, _, address = url.partition("://")
        host, _, port = address.rpartition(":")
        self._address, self._timeout = (host, int(port)), timeout_s
        self._tls = ssl.create_default_context(cafile=ca_file) if scheme == "tls" else None
        self._hostname = socket.gethostname()[:255] or "-"
        self._queue: queue.Queue[bytes | None] = queue.Queue(self.QUEUE_MAX)
        self._socket: socket.socket | None = None
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def send(self, line: str, level: str, event: str) -> None:
        try:
            self._queue.put_nowait(self.frame(line, level, event))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                print("audit syslog queue full: records are being dropped", file=sys.stderr)

    def frame(self, line: str, level: str, event: str) -> bytes:
        """One RFC 5424 message, octet-counted: `LEN <PRI>1 TIMESTAMP HOST smartnodule PID MSGID - BOM line`."""
        priority = self.FACILITY_LOG_AUDIT * 8 + self.SEVERITY.get(level, 6)
        msgid = re.sub(r"[^!-~]", "_", event)[:32] or "-"
        stamp = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        message = (f"<{priority}>1 {stamp} {self._hostname} smartnodule {os.getpid()} {msgid} - ".encode()
                   + b"\xef\xbb\xbf" + line.encode())
        return str(len(message)).encode() + b" " + message

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (for at most `timeout_s`), then stop."""
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)

    def _run(self) -> None:
        backoff = 0.1
        while True:
            message = self._queue.get()
            if message is None:
                break
            while True:
                try:
                    self._connected().sendall(message)
                    backoff = 0.1
                    break
                except OSError as exc:
                    if backoff == 0.1:  # once per outage; not a log event, which would come back here
                        print(f"audit syslog server {self._address[0]}:{self._address[1]} unreachable "
                              f"({type(exc).__name__}); retrying", file=sys.stderr)
                    self._disconnect()
                    time.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
        self._finish()

    def _connected(self) -> socket.socket:
        if self._socket is None:
            sock = socket.create_connection(self._address, timeout=self._timeout)
            self._socket = self._tls.wrap_socket(sock, server_hostname=self._address[0]) if self._tls else sock
        return self._socket

    def _disconnect(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _finish(self) -> None:
        """Close so that the server reads every frame: FIN, then drain what it sent (TLS session tickets)
        until it closes too. Closing with unread data would send a reset, and a reset makes the server's
        kernel drop what it has not read yet: the last records."""
        if self._socket is not None:
            try:
                self._socket.shutdown(socket.SHUT_WR)
                self._socket.settimeout(self._timeout)
                while self._socket.recv(4096):
                    pass
            except OSError:
                pass
        self._disconnect()


class ChainedAuditFile(logging.Handler):
    """Appends each record as one JSON line carrying its sequence number and keyed link (module docstring)."""

    def __init__(self, path: Path, key: bytes, checkpoint_every: int, checkpoint_interval_s: float,
                 forwarder: SyslogForwarder | None = None) -> None:
        super().__init__()
        self.path, self._key, self._forwarder = path, key, forwarder
        self._every, self._interval = checkpoint_every, checkpoint_interval_s
        self._checkpoint = path.with_name(path.name + CHECKPOINT_SUFFIX)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._reader = os.open(path, os.O_RDONLY)

    def _last_line(self) -> str | None:
        end = os.fstat(self._reader).st_size
        window = 4096
        while True:
            start = max(0, end - window)
            tail = os.pread(self._reader, end - start, start).rstrip(b"\n")
            cut = tail.rfind(b"\n")
            if cut >= 0 or start == 0:
                last = tail[cut + 1:]
                return last.decode("utf-8", "replace") if last else None
            window *= 4

    def _head(self) -> tuple[int, str]:
        """(sequence number, link) of the last line, (0, anchor) before the first keyed line."""
        last = self._last_line()
        if last is None:
            return 0, GENESIS
        keyed = _split(last)
        return (keyed[1], keyed[2]) if keyed else (0, _legacy_link(last))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            body = self.format(record)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                seq, previous = self._head()
                seq += 1
                signed = f'{body[:-1]}, "seq": {seq}}}'
                link = chain_link(self._key, previous, signed)
                line = f'{signed[:-1]}, "chain": "{link}"}}'
                os.write(self._fd, (line + "\n").encode())
                if self._checkpoint_due(seq):
                    self._write_checkpoint(seq, link)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            if self._forwarder is not None:
                event = record.msg.get("event") if isinstance(record.msg, dict) else None
                self._forwarder.send(line, record.levelname.lower(), str(event or record.name))
        except Exception:
            self.handleError(record)

    def _checkpoint_due(self, seq: int) -> bool:
        if seq == 1 or seq % self._every == 0:
            return True
        try:
            return time.time() - self._checkpoint.stat().st_mtime >= self._interval
        except FileNotFoundError:
            return True

    def _write_checkpoint(self, seq: int, head: str) -> None:
        """Replace the checkpoint file (under the file lock): seq, head link and their HMAC."""
        temporary = self._checkpoint.with_name(f".{self._checkpoint.name}.{os.getpid()}")
        temporary.write_text(json.dumps({"seq": seq, "head": head, "mac": checkpoint_mac(self._key, seq, head)}))
        os.chmod(temporary, 0o640)
        os.replace(temporary, self._checkpoint)

    def close(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            seq, head = self._head()
            if seq:
                self._write_checkpoint(seq, head)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        os.close(self._reader)
        if self._forwarder is not None:
            self._forwarder.close()
        super().close()


@dataclass(frozen=True)
class ChainCheck:
    """The result of `verify_chain`: records read, how many of the first were written before the keyed chain
    (accepted only when asked), and the first line (1-based) that breaks the chain, if any."""

    records: int
    legacy: int = 0
    broken_at: int | None = None
    problem: str = ""
    checkpoint: int | None = None

    @property
    def intact(self) -> bool:
        return self.broken_at is None


def verify_chain(path: Path, key: bytes, *, accept_legacy_prefix: bool = False) -> ChainCheck:
    """Recompute the keyed chain of an audit file from its first line, then check its checkpoint."""
    previous, seq, legacy, number = GENESIS, 0, 0, 0
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\n")
            keyed = _split(line)
            if keyed is None and seq == 0 and accept_legacy_prefix:
                legacy += 1
                previous = _legacy_link(line)
                continue
            if keyed is None:
                problem = ("line has no keyed chain link: written before the keyed chain (pass "
                           "--accept-legacy-prefix if this is an upgraded node's old log) or its link was stripped"
                           if seq == 0 else "line has no keyed chain link (stripped, or inserted without the key)")
                return ChainCheck(number, legacy, number, problem)
            signed, line_seq, link = keyed
            if line_seq != seq + 1 or not hmac.compare_digest(chain_link(key, previous, signed), link):
                return ChainCheck(number, legacy, number, "line changed, a line before it removed or inserted, "
                                                          "or its link made without the key")
            seq, previous = line_seq, link
    return _check_checkpoint(path, key, ChainCheck(number, legacy), seq, previous)


def _check_checkpoint(path: Path, key: bytes, check: ChainCheck, last_seq: int, last_link: str) -> ChainCheck:
    checkpoint_path = path.with_name(path.name + CHECKPOINT_SUFFIX)
    if not checkpoint_path.exists():
        if last_seq == 0:
            return check
        return ChainCheck(check.records, check.legacy, check.records, f"{checkpoint_path.name} is missing")
    try:
        checkpoint = json.loads(checkpoint_path.read_text())
        seq, head, mac = int(checkpoint["seq"]), str(checkpoint["head"]), str(checkpoint["mac"])
    except (ValueError, KeyError, TypeError):
        return ChainCheck(check.records, check.legacy, check.records, f"{checkpoint_path.name} is unreadable")
    if not hmac.compare_digest(checkpoint_mac(key, seq, head), mac):
        return ChainCheck(check.records, check.legacy, check.records, f"{checkpoint_path.name} is not signed by the key")
    if seq > last_seq:
        return ChainCheck(check.records, check.legacy, check.records + 1,
                          f"the file ends at record {last_seq} but was checkpointed at record {seq}: "
                          "its tail was cut off")
    if seq == last_seq and head != last_link:
        return ChainCheck(check.records, check.legacy, check.records, "the last record is not the checkpointed one")
    return ChainCheck(check.records, check.legacy, checkpoint=seq)


# Loggers whose messages quote header values (pydicom's "Invalid value for VR DA: '<value>'", a captured
# warning): a record from them keeps its level, warning category, source line, VRs, tags and keywords only.
_SCRUBBED_LOGGERS = ("pydicom", "highdicom", "py.warnings")
_TAG = re.compile(r"\([0-9A-Fa-f]{4},\s?[0-9A-Fa-f]{4}\)")
_VR = re.compile(r"\bVR\b\W{0,3}([A-Z]{2})\b")
_CATEGORY = re.compile(r"\b([A-Z][A-Za-z]*(?:Warning|Error))\b")
_SOURCE = re.compile(r"([\w.-]+[/\\][\w.-]+\.py):(\d+)")
_WORD = re.compile(r"\b[A-Z][A-Za-z0-9]+\b")


def scrub_library_message(message: str) -> str:
    """What may be logged of a library's message: category, source line, VRs, tags and DICOM keywords, no values."""
    parts = []
    for label, pattern in (("category", _CATEGORY), ("source", _SOURCE), ("vr", _VR), ("tag", _TAG)):
        found = list(dict.fromkeys(m.group(0) if label in ("tag", "source") else m.group(1)
                                   for m in pattern.finditer(message)))
        if found:
            parts.append(f"{label}={','.join(found)}")
    keywords = [w for w in dict.fromkeys(_WORD.findall(message)) if w in keyword_dict]
    if keywords:
        parts.append(f"keyword={','.join(keywords)}")
    return " ".join(["library message withheld (it may quote header values):", *parts])


class _LibraryScrubber(logging.Filter):
    """Replaces the message of a record from `_SCRUBBED_LOGGERS` by `scrub_library_message` of it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(_SCRUBBED_LOGGERS) and not getattr(record, "scrubbed", False):
            record.msg, record.args, record.scrubbed = scrub_library_message(record.getMessage()), (), True
        return True


def safe_traceback(exc_info) -> str:
    """A traceback without local variables and without exception messages (they may quote patient data).

    Frames (file, line, function, source line) and exception classes are kept; an
    OSError keeps its errno and strerror (a file system or socket problem, never a header value).
    """
    chain: list[BaseException] = []
    exception: BaseException | None = exc_info[1]
    while exception is not None and all(exception is not earlier for earlier in chain):
        chain.append(exception)
        exception = exception.__cause__ or (None if exception.__suppress_context__ else exception.__context__)
    blocks = []
    for exception in reversed(chain):  # the first cause first, as Python prints them
        detail = f" [Errno {exception.errno}] {exception.strerror}" if isinstance(exception, OSError) \
            and exception.strerror else " (message withheld)"
        frames = "".join(traceback.format_list(traceback.extract_tb(exception.__traceback__)))
        blocks.append(f"Traceback (most recent call last):\n{frames}"
                      f"{type(exception).__module__}.{type(exception).__qualname__}:{detail}")
    return "\n\nThe above exception led to the following one:\n\n".join(blocks)


def _console_traceback(sio, exc_info) -> None:
    sio.write("\n" + safe_traceback(exc_info))


def _log_uncaught(exc_type, exc_value, exc_traceback, thread: str = "main") -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc_value, exc_traceback)  # no message, no locals: an operator's Ctrl-C
        return
    structlog.get_logger(__name__).error("uncaught_exception_logged", thread=thread, error=exc_type.__name__,
                                         exc_info=(exc_type, exc_value, exc_traceback))


def configure_logging(log_dir: Path | None, *, console_level: str = "INFO",
                      audit_settings: AuditSettings | None = None) -> Path | None:
    """Send every event to `log_dir/audit.jsonl` (JSON, hash-chained, INFO and up) and the console.

    Tracebacks carry no local variables and no exception messages (`safe_traceback`);
    Python warnings are captured into the log and, like the records of pydicom and
    highdicom, reduced to category, tags and keywords (`scrub_library_message`); uncaught
    exceptions, in any thread, are logged the same way instead of printed.
    Returns the audit file's path. Safe to call again (handlers are replaced).
    `log_dir` is the data folder's `logs`; `audit_settings` (default: `AuditSettings()`) name the chain's key,
    the checkpoint interval and the syslog server. A key inside the data folder raises `AuditKeyError`.
    """
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)

    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.dev.ConsoleRenderer(colors=False, exception_formatter=_console_traceback)],
        foreign_pre_chain=_SHARED,
    ))
    console.addFilter(_LibraryScrubber())
    root.addHandler(console)

    audit_path = None
    if log_dir is not None:
        log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        audit_path = log_dir / AUDIT_FILE
        audit = _audit_file(audit_path, audit_settings or AuditSettings())
        audit.setLevel(logging.INFO)
        audit.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.ExceptionRenderer(safe_traceback),
                        structlog.processors.JSONRenderer()],
            foreign_pre_chain=_SHARED,
        ))
        audit.addFilter(_LibraryScrubber())
        root.addHandler(audit)
    # Off then on: captureWarnings(True) is a no-op when an earlier call's hook was since replaced (e.g. by a
    # caller's warnings.catch_warnings), and warnings would then reach stderr unscrubbed.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback,
                                                      thread=getattr(args.thread, "name", "?"))
    # pynetdicom's own logger is chatty at INFO and may print dataset contents at DEBUG.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom reports every module it copies at INFO, naming source UIDs: noise in an audit trail.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    return audit_path


def _audit_file(path: Path, settings: AuditSettings) -> ChainedAuditFile:
    data_dir = path.parent.parent
    key = load_or_create_key(key_path(settings, data_dir), data_dir)
    forwarder = SyslogForwarder(settings.syslog, settings.syslog_ca_file) if settings.syslog else None
    return ChainedAuditFile(path, key, settings.checkpoint_every, settings.checkpoint_interval_s, forwarder)
