"""Structured logging for the whole node: structlog events to a hash-chained JSON-lines audit file and the console.

Events are snake_case past tense (`instance_stored`) bound with job id, SOP
Instance UID and calling AE. Patient name, ID and birth date never enter a log:
a processor removes any such key that a caller might pass by mistake, tracebacks
carry neither local variables nor exception messages, and what pydicom and
highdicom log or warn (they quote header values) is cut down to tags and keywords.

The audit file is opened for appending only, and each line ends with
`"chain": sha256(previous link + this line)`, so an edited, inserted or removed
line breaks the chain from there on (`smartnodule audit verify`); a cut-off
tail cannot be told from a log that ended there. Processes sharing the file
(the scale-out roles) append under an exclusive lock, each linking to the line
last written by any of them.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom.datadict import keyword_dict

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
_CHAIN_SUFFIX = re.compile(r', "chain": "([0-9a-f]{64})"}$')
_PATIENT_KEYS = frozenset({"patient_name", "patient_id", "patient_birth_date", "PatientName", "PatientID", "PatientBirthDate"})


def _drop_patient_data(_logger, _method, event_dict: dict) -> dict:
    for key in _PATIENT_KEYS.intersection(event_dict):
        del event_dict[key]
    return event_dict


_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    _drop_patient_data,
]


def chain_link(previous: str, body: str) -> str:
    return hashlib.sha256((previous + body).encode()).hexdigest()


def _split(line: str) -> tuple[str, str | None]:
    """(the line as it was hashed, its chain link) or (line, None) for a line without one."""
    found = _CHAIN_SUFFIX.search(line)
    return (line[:found.start()] + "}", found.group(1)) if found else (line, None)


def _link_of(line: str) -> str:
    """What the next line links to: this line's chain, or the hash of a line written without one."""
    return _split(line)[1] or hashlib.sha256(line.encode()).hexdigest()


class ChainedAuditFile(logging.Handler):
    """Appends each record as one JSON line carrying its chain link (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
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

    def emit(self, record: logging.LogRecord) -> None:
        try:
            body = self.format(record)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                last = self._last_line()
                link = chain_link(_link_of(last) if last is not None else GENESIS, body)
                os.write(self._fd, f'{body[:-1]}, "chain": "{link}"}}\n'.encode())
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._reader)
        super().close()


@dataclass(frozen=True)
class ChainCheck:
    """The result of `verify_chain`: records read, how many of the first were written before the chain began,
    and the first line (1-based) that breaks the chain, if any."""

    records: int
    unchained: int = 0
    broken_at: int | None = None
    problem: str = ""

    @property
    def intact(self) -> bool:
        return self.broken_at is None


def verify_chain(path: Path) -> ChainCheck:
    """Recompute the chain of an audit file from its first line."""
    previous, unchained, number = GENESIS, 0, 0
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            line = line.rstrip("\n")
            body, link = _split(line)
            if link is None and unchained == number - 1:  # a log begun before the chain
                unchained += 1
                previous = _link_of(line)
                continue
            if link is None:
                return ChainCheck(number, unchained, number, "line has no chain link")
            if chain_link(previous, body) != link:
                return ChainCheck(number, unchained, number, "line changed, or a line before it removed or inserted")
            previous = link
    return ChainCheck(number, unchained)


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


def configure_logging(log_dir: Path | None, *, console_level: str = "INFO") -> Path | None:
    """Send every event to `log_dir/audit.jsonl` (JSON, hash-chained, INFO and up) and the console.

    Tracebacks carry no local variables and no exception messages (`safe_traceback`);
    Python warnings are captured into the log and, like the records of pydicom and
    highdicom, reduced to category, tags and keywords (`scrub_library_message`); uncaught
    exceptions, in any thread, are logged the same way instead of printed.
    Returns the audit file's path. Safe to call again (handlers are replaced).
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
        log_dir.mkdir(parents=True, exist_ok=True)
        audit_path = log_dir / AUDIT_FILE
        audit = ChainedAuditFile(audit_path)
        audit.setLevel(logging.INFO)
        audit.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.ExceptionRenderer(safe_traceback),
                        structlog.processors.JSONRenderer()],
            foreign_pre_chain=_SHARED,
        ))
        audit.addFilter(_LibraryScrubber())
        root.addHandler(audit)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback,
                                                      thread=getattr(args.thread, "name", "?"))
    # pynetdicom's own logger is chatty at INFO and may print dataset contents at DEBUG.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom reports every module it copies at INFO, naming source UIDs: noise in an audit trail.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    return audit_path
