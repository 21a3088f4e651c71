"""The Storage SCP: C-ECHO and C-STORE in, each instance durable in the spool and committed as a job before success.

The C-STORE handler checks the instance, moves the file it was streamed into
(`node.receive`) into the spool (fsync, rename, fsync folder), commits the job
row and only then answers 0x0000. It does no inference and no network calls, and no
exception escapes it: every failure is a defined status with an error comment.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from config.settings import Settings
from node.jobs import ReceivedInstance, admit
from node.receive import DISK_FULL, TOO_LARGE, WRITE_FAILED, IncomingFiles, read_in_bulk, stream_into
from node.spool import Spool, UnsafeUID
from node.tls import server_context

log = structlog.get_logger(__name__)

ACCEPTED_SOP_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
ACCEPTED_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

# A-ASSOCIATE-RJ (result, source, reason) used by admission control (PS3.8 9.3.4).
REJECT_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
REJECT_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)

# Storage service statuses (PS3.4 Annex B.2.3) answered by the handler.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000


def _status(code: int, comment: str = "") -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:64]
    return status


class StorageSCP:
    """The node's DICOM listener."""

    def __init__(self, settings: Settings, session_factory: sessionmaker, spool: Spool) -> None:
        self._settings = settings
        self._sessions = session_factory
        self._spool = spool
        self._max_bytes = int(settings.node.max_instance_mb * 1024 * 1024)
        self._min_free_bytes = int(settings.node.min_free_disk_mb * 1024 * 1024)
        self._incoming = IncomingFiles(spool.incoming, self._max_bytes)
        self._server: ThreadedAssociationServer | None = None
        self._failure_comments = {
            TOO_LARGE: f"instance larger than {settings.node.max_instance_mb} MB",
            DISK_FULL: "spool disk full, retry later",
            WRITE_FAILED: "spool write failed, retry later",
        }

    def _make_ae(self) -> AE:
        node = self._settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_bytes  # pynetdicom's 16 KiB default costs ~40 % of ingest CPU
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = node.network_timeout_s
        if not node.accept_any_calling_ae:
            ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    def start(self) -> ThreadedAssociationServer:
        """Listen on the configured address in background threads."""
        # pynetdicom streams each received data set to a file (chunked receive); ours live in
        # the spool's incoming folder, so moving one into place is a rename, not a copy.
        _config.STORE_RECV_CHUNKED_DATASET = True
        self._sweep_incoming(older_than_s=0)  # no association is live yet
        stream_into(self._incoming)
        node = self._settings.node
        tls = self._settings.tls
        self._server = self._make_ae().start_server(
            (node.host, node.port),
            block=False,
            ssl_context=server_context(tls) if tls.enabled else None,
            evt_handlers=[
                (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_C_ECHO, self._on_echo),
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_ACCEPTED, self._on_association, ["association_accepted"]),
                (evt.EVT_REJECTED, self._on_association, ["association_rejected"]),
                (evt.EVT_RELEASED, self._on_association, ["association_released"]),
                (evt.EVT_ABORTED, self._on_association, ["association_aborted"]),
                (evt.EVT_ABORTED, self._discard_partial_transfer),
                (evt.EVT_CONN_CLOSE, self._discard_partial_transfer),
            ],
        )
        read_in_bulk(self._server)
        log.info("scp_started", ae_title=node.ae_title, host=node.host, port=node.port, tls=tls.enabled)
        return self._server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            stream_into(None)
            log.info("scp_stopped")

    def _disk_free(self) -> int:
        return shutil.disk_usage(self._spool.root).free

    def _sweep_incoming(self, older_than_s: float | None = None) -> None:
        if older_than_s is None:
            older_than_s = 2 * self._settings.node.network_timeout_s
        removed = self._spool.sweep_incoming(older_than_s)
        if removed:
            log.warning("incomplete_transfers_removed", files=removed)

    def _on_requested(self, event: evt.Event) -> None:
        """Admission control before negotiation: the sender's host, and room in the spool."""
        self._sweep_incoming()
        requestor = event.assoc.requestor
        calling_aet = requestor.primitive.calling_ae_title
        source = self._settings.source(calling_aet)
        reason = None
        if source is not None and source.hosts and requestor.address not in source.hosts:
            reason, rejection = "host_not_allowed", REJECT_CALLING_AE_NOT_RECOGNIZED
        elif self._disk_free() < self._min_free_bytes:
            reason, rejection = "disk_nearly_full", REJECT_LOCAL_LIMIT_EXCEEDED
        if reason is None:
            return
        log.warning("association_refused", calling_aet=calling_aet, peer=f"{requestor.address}:{requestor.port}",
                    reason=reason)
        event.assoc.acse.send_reject(*rejection)
        event.assoc.is_rejected = True
        event.assoc.kill()

    @staticmethod
    def _discard_partial_transfer(event: evt.Event) -> None:
        """Remove the temp file of an instance whose transfer the connection's end cut short.

        pynetdicom (3.0, pinned) keeps the file of the message being received on its DIMSE
        provider; a finished C-STORE's file is already moved into the spool or unlinked.
        """
        message = getattr(event.assoc.dimse, "message", None)
        partial = getattr(message, "_data_set_file", None)
        if partial is None:
            return
        partial.close()
        Path(partial.name).unlink(missing_ok=True)
        log.warning("incomplete_transfer_discarded", calling_aet=event.assoc.requestor.ae_title)

    @staticmethod
    def _on_association(event: evt.Event, what: str) -> None:
        requestor = event.assoc.requestor
        log.info(what, calling_aet=requestor.ae_title, peer=f"{requestor.address}:{requestor.port}",
                 called_aet=event.assoc.acceptor.ae_title)

    @staticmethod
    def _on_echo(event: evt.Event) -> int:
        log.info("echo_answered", calling_aet=event.assoc.requestor.ae_title)
        return SUCCESS

    def _on_store(self, event: evt.Event) -> Dataset:
        request = event.request
        calling_aet = event.assoc.requestor.ae_title
        bound = log.bind(calling_aet=calling_aet, sop_instance_uid=str(request.AffectedSOPInstanceUID))
        try:
            return self._store(event, bound)
        except Exception as exc:  # never let an exception escape into pynetdicom
            bound.exception("instance_refused", reason="internal_error")
            return _status(OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")

    def _store(self, event: evt.Event, bound) -> Dataset:
        request = event.request
        temp_path: Path = event.dataset_path
        failure = self._incoming.failure(temp_path)
        if failure is not None:
            bound.error("instance_refused", reason=failure)
            return _status(OUT_OF_RESOURCES, self._failure_comments[failure])
        size = temp_path.stat().st_size
        if self._disk_free() < self._min_free_bytes:
            bound.error("instance_refused", reason="disk_nearly_full", size_bytes=size)
            return _status(OUT_OF_RESOURCES, "spool disk nearly full, retry later")
        try:
            header = dcmread(temp_path, stop_before_pixels=True)
            sop_uid = str(header.SOPInstanceUID)
            sop_class = str(header.SOPClassUID)
            study_uid, series_uid = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
        except Exception as exc:  # pydicom raises many kinds (InvalidDicomError, zlib.error, struct.error, ...)
            bound.warning("instance_refused", reason="unparseable", error=f"{type(exc).__name__}: {exc}"[:200])
            return _status(CANNOT_UNDERSTAND, "dataset cannot be parsed or lacks UIDs")
        if sop_uid != request.AffectedSOPInstanceUID or sop_class != request.AffectedSOPClassUID:
            bound.warning("instance_refused", reason="uid_mismatch")
            return _status(DATASET_DOES_NOT_MATCH_SOP_CLASS, "dataset UIDs differ from the C-STORE request")
        try:
            spooled = self._spool.place(temp_path, study_uid, sop_uid)
        except UnsafeUID as exc:
            bound.warning("instance_refused", reason="unsafe_uid", error=str(exc))
            return _status(CANNOT_UNDERSTAND, "invalid UID")
        except OSError as exc:
            bound.error("instance_refused", reason="spool_write_failed", error=str(exc))
            return _status(OUT_OF_RESOURCES, "spool write failed")
        instance = ReceivedInstance(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
            modality=str(header.get("Modality", "")) or None,
            calling_aet=event.assoc.requestor.ae_title,
            calling_host=event.assoc.requestor.address,
            spool_path=str(spooled),
            size_bytes=size,
        )
        try:
            job_id, created = admit(self._sessions, instance)
        except SQLAlchemyError as exc:
            bound.error("instance_refused", reason="database_unavailable", error=str(exc)[:200])
            return _status(OUT_OF_RESOURCES, "database unavailable, retry later")
        bound.info("instance_stored" if created else "instance_repeated", job_id=job_id,
                   study_instance_uid=study_uid, size_bytes=size, sop_class_uid=sop_class)
        return _status(SUCCESS)
