"""Structured logging for the whole node: structlog events to an append-only JSON-lines audit file and the console.

Events are snake_case past tense (`instance_stored`) bound with job id, SOP
Instance UID and calling AE. Patient name, ID and birth date never enter a log:
a processor removes any such key that a caller might pass by mistake.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import structlog

AUDIT_FILE = "audit.jsonl"
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


def configure_logging(log_dir: Path | None, *, console_level: str = "INFO") -> Path | None:
    """Send every event to `log_dir/audit.jsonl` (JSON, appended, all levels) and the console.

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
                    structlog.dev.ConsoleRenderer(colors=False)],
        foreign_pre_chain=_SHARED,
    ))
    root.addHandler(console)

    audit_path = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        audit_path = log_dir / AUDIT_FILE
        audit = logging.FileHandler(audit_path, mode="a", encoding="utf-8")
        audit.setLevel(logging.INFO)
        audit.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info,
                        structlog.processors.JSONRenderer()],
            foreign_pre_chain=_SHARED,
        ))
        root.addHandler(audit)
    # pynetdicom's own logger is chatty at INFO and may print dataset contents at DEBUG.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom reports every module it copies at INFO, naming source UIDs: noise in an audit trail.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    return audit_path
