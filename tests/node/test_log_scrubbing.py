"""`node.audit.configure_logging` keeps header values out of both logs: tracebacks without locals or exception
messages, library warnings and records cut to category and tag, uncaught thread exceptions logged the same way."""
from __future__ import annotations

import threading
import warnings

import pydicom
import structlog

from node.audit import configure_logging, scrub_library_message

SECRET = "QZMARKER^SECRET"


def _fail(name: str = SECRET) -> None:
    raise ValueError(f"Unable to convert {name!r} to 'DA' object")


def test_tracebacks_warnings_and_thread_exceptions_hold_no_value(tmp_path, capsys):
    audit = configure_logging(tmp_path)
    log = structlog.get_logger("test")
    try:
        try:
            _fail()
        except ValueError as exc:
            raise RuntimeError(SECRET) from exc
    except RuntimeError:
        log.exception("processing_failed", error="RuntimeError")
    try:
        (tmp_path / "absent" / "file").read_bytes()
    except OSError:
        log.exception("read_failed")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ds = pydicom.Dataset()
        ds.PatientBirthDate = SECRET  # pydicom warns and logs "Invalid value for VR DA: '<value>'"
    thread = threading.Thread(target=_fail, name="worker-1")
    thread.start()
    thread.join()

    console, written = capsys.readouterr().err, audit.read_text()
    for where, text in (("console", console), ("audit log", written)):
        assert SECRET.split("^")[0] not in text, where
        assert "ValueError: (message withheld)" in text and "RuntimeError: (message withheld)" in text, where
        assert "FileNotFoundError: [Errno 2] No such file or directory" in text, where
        assert "category=UserWarning" in text and "vr=DA" in text, where
        assert "uncaught_exception_logged" in text and "worker-1" in text, where
        assert 'in _fail' in text, where  # frames are kept


def test_scrubbed_message_keeps_tag_keyword_and_category_only():
    message = ("/x/pydicom/valuerep.py:440: UserWarning: Invalid value for VR PN in (0010,0010) PatientName: "
               "'DOE^JOHN'.\n  warn_and_log(msg)")
    scrubbed = scrub_library_message(message)
    assert "DOE" not in scrubbed and "JOHN" not in scrubbed
    for kept in ("category=UserWarning", "source=pydicom/valuerep.py:440", "vr=PN", "tag=(0010,0010)",
                 "keyword=PatientName"):
        assert kept in scrubbed
