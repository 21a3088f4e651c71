"""The Storage SCP: C-ECHO and C-STORE in, each instance durable in the spool and committed as a job before success.

Who may associate: the calling AE title (`node.allowed_calling_aets`), the called
AE title (ours, unless `node.require_called_ae_title` is off), the source host
per `[[sources]]`; connection-level limits live in `node.receive`.

The C-STORE handler checks the instance before anything costly is done with it:
the wire size (while it streams in), the inflated size of a deflated data set,
the UIDs against the DICOM grammar, and Rows x Columns x frames x samples
against `node.max_pixels` from the header, before any pixel is decoded. It then
links the file it was streamed into (`node.receive`) into the spool (fsync, link,
fsync folder), commits the job row and only then answers 0x0000.

A repeat of a known SOP Instance UID never overwrites: with the same content
(sha256 of the received file) it is answered 0x0000 and nothing changes; with
other content the first file stays and the new one becomes version N+1 of the
job (`<sop>.vN.dcm`, `instance_replaced`), processed again.

It does no inference and no network calls, and no exception escapes it: every
failure is a defined status with an error comment.
"""
from __future__ import annotations

import shutil
import struct
from dataclasses import replace
from pathlib import Path
from typing import cast

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names generated at import, no stubs
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from config.settings import Settings
from node import metrics
from node.store.jobs import ReceivedInstance, StaleVersion, admit, known_instance, replace_instance
from node.receive import (DISK_FULL, TOO_LARGE, WRITE_FAILED, ConnectionLimits, GatedAssociationServer, IncomingFiles,
                          inflated_size_exceeds, serve, stream_into)
from node.store.spool import Spool, UnsafeUID, checked_uid, file_sha256
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
REJECT_CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
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
        self._server: GatedAssociationServer | None = None
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

    def start(self) -> GatedAssociationServer:
        """Listen on the configured address in background threads."""
        # pynetdicom streams each received data set to a file (chunked receive); ours live in
        # the spool's incoming folder, so moving one into place is a rename, not a copy.
        _config.STORE_RECV_CHUNKED_DATASET = True
        self._sweep_incoming(older_than_s=0)  # no association is live yet
        stream_into(self._incoming)
        node = self._settings.node
        tls = self._settings.tls
        limits = ConnectionLimits(
            max_pdu_bytes=node.max_pdu_bytes, request_timeout_s=node.association_request_timeout_s,
            max_per_address=node.max_connections_per_address,
            ssl_context=server_context(tls) if tls.enabled else None)
        self._server = serve(
            self._make_ae(), (node.host, node.port), limits=limits,
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
        """Admission control before negotiation: the called AE title, the sender's host, and room in the spool."""
        self._sweep_incoming()
        requestor = event.assoc.requestor
        request = requestor.primitive
        if request is None:  # pynetdicom hands EVT_REQUESTED the A-ASSOCIATE request it received
            raise RuntimeError("association requested without an A-ASSOCIATE request")
        calling_aet = request.calling_ae_title
        source = self._settings.source(calling_aet)
        node = self._settings.node
        reason = None
        if node.require_called_ae_title and request.called_ae_title.strip() != node.ae_title.strip():
            reason, rejection = "called_ae_not_recognized", REJECT_CALLED_AE_NOT_RECOGNIZED
        elif source is not None and source.hosts and requestor.address not in source.hosts:
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
        request = cast(C_STORE, event.request)  # the C-STORE handler's request
        calling_aet = event.assoc.requestor.ae_title
        bound = log.bind(calling_aet=calling_aet, sop_instance_uid=str(request.AffectedSOPInstanceUID))
        try:
            status = self._store(event, bound)
        except Exception as exc:  # never let an exception escape into pynetdicom
            bound.exception("instance_refused", reason="internal_error")
            status = _status(OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}")
        metrics.received(calling_aet, status.Status)
        return status

    def _store(self, event: evt.Event, bound) -> Dataset:
        request = cast(C_STORE, event.request)  # the C-STORE handler's request
        temp_path: Path = event.dataset_path
        failure = self._incoming.failure(temp_path)
        if failure is not None:
            bound.error("instance_refused", reason=failure)
            return _status(OUT_OF_RESOURCES, self._failure_comments[failure])
        digest = self._incoming.digest(temp_path) or file_sha256(temp_path)
        size = temp_path.stat().st_size
        if self._disk_free() < self._min_free_bytes:
            bound.error("instance_refused", reason="disk_nearly_full", size_bytes=size)
            return _status(OUT_OF_RESOURCES, "spool disk nearly full, retry later")
        try:
            transfer_syntax = str(read_file_meta_info(temp_path).TransferSyntaxUID)
            if transfer_syntax == DeflatedExplicitVRLittleEndian and inflated_size_exceeds(
                    temp_path, _data_set_offset(temp_path), self._max_bytes):
                bound.warning("instance_refused", reason="inflated_too_large", size_bytes=size)
                return _status(OUT_OF_RESOURCES, f"inflated data set larger than {self._settings.node.max_instance_mb} MB")
            header = dcmread(temp_path, stop_before_pixels=True)
            sop_uid = str(header.SOPInstanceUID)
            sop_class = str(header.SOPClassUID)
            study_uid, series_uid = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
            pixels = _pixel_count(header)
        except Exception as exc:  # pydicom raises many kinds (InvalidDicomError, zlib.error, struct.error, ...)
            bound.warning("instance_refused", reason="unparseable", error=type(exc).__name__)
            return _status(CANNOT_UNDERSTAND, "dataset cannot be parsed or lacks UIDs")
        if sop_uid != request.AffectedSOPInstanceUID or sop_class != request.AffectedSOPClassUID:
            bound.warning("instance_refused", reason="uid_mismatch")
            return _status(DATASET_DOES_NOT_MATCH_SOP_CLASS, "dataset UIDs differ from the C-STORE request")
        try:
            for uid, what in ((sop_uid, "SOP Instance UID"), (study_uid, "Study Instance UID"),
                              (series_uid, "Series Instance UID")):
                checked_uid(uid, what)
        except UnsafeUID as exc:
            bound.warning("instance_refused", reason="invalid_uid", error=str(exc))
            return _status(CANNOT_UNDERSTAND, f"invalid UID: {what}")
        if pixels > self._settings.node.max_pixels:
            bound.warning("instance_refused", reason="too_many_pixels", pixels=pixels)
            return _status(OUT_OF_RESOURCES, f"more than {self._settings.node.max_pixels} pixels")
        instance = ReceivedInstance(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            transfer_syntax_uid=transfer_syntax,
            modality=str(header.get("Modality", "")) or None,
            calling_aet=event.assoc.requestor.ae_title,
            calling_host=event.assoc.requestor.address,
            spool_path=str(temp_path),
            size_bytes=size,
            content_sha256=digest,
        )
        return self._keep(temp_path, instance, bound)

    def _keep(self, temp_path: Path, instance: ReceivedInstance, bound) -> Dataset:
        """Spool and commit a checked instance: new, a repeat (nothing changes) or a new version."""
        try:
            known = known_instance(self._sessions, instance.sop_instance_uid)
        except SQLAlchemyError as exc:
            bound.error("instance_refused", reason="database_unavailable", error=type(exc).__name__)
            return _status(OUT_OF_RESOURCES, "database unavailable, retry later")
        if known is not None and (known.content_sha256 or file_sha256(known.spool_path)) == instance.content_sha256:
            temp_path.unlink()
            bound.info("instance_repeated", job_id=known.job_id, version=known.version)
            return _status(SUCCESS)
        version = 1 if known is None else known.version + 1
        try:
            spooled = self._place(temp_path, instance, version)
        except OSError as exc:
            bound.error("instance_refused", reason="spool_write_failed", error=f"{type(exc).__name__}: {exc.strerror}")
            return _status(OUT_OF_RESOURCES, "spool write failed")
        instance = replace(instance, spool_path=str(spooled), version=version)
        try:
            if known is None:
                job_id, created = admit(self._sessions, instance)
            else:
                replace_instance(self._sessions, known, instance)
                job_id, created = known.job_id, False
        except StaleVersion:
            bound.warning("instance_refused", reason="concurrent_version")
            return _status(OUT_OF_RESOURCES, "instance changed by another store, retry later")
        except SQLAlchemyError as exc:
            bound.error("instance_refused", reason="database_unavailable", error=type(exc).__name__)
            return _status(OUT_OF_RESOURCES, "database unavailable, retry later")
        what = "instance_stored" if created else "instance_replaced" if known is not None else "instance_repeated"
        bound.info(what, job_id=job_id, version=version, study_instance_uid=instance.study_instance_uid,
                   size_bytes=instance.size_bytes, sop_class_uid=instance.sop_class_uid)
        return _status(SUCCESS)

    def _place(self, temp_path: Path, instance: ReceivedInstance, version: int) -> Path:
        """Link the file into the spool as `version`. A file already there belongs to no committed job row
        (its store ended before the commit, so it was never acknowledged): kept when it is the same
        content, replaced otherwise."""
        study_uid, sop_uid = instance.study_instance_uid, instance.sop_instance_uid
        try:
            return self._spool.place(temp_path, study_uid, sop_uid, version)
        except FileExistsError:
            existing = self._spool.path_for(study_uid, sop_uid, version)
            if file_sha256(existing) == instance.content_sha256:
                temp_path.unlink()
                return existing
            return self._spool.place(temp_path, study_uid, sop_uid, version, replace=True)


def _pixel_count(header: Dataset) -> int:
    """Rows x Columns x frames x samples per pixel as the header states them (0 without pixel attributes)."""
    frames = int(header.get("NumberOfFrames") or 1)
    samples = int(header.get("SamplesPerPixel") or 1)
    return int(header.get("Rows") or 0) * int(header.get("Columns") or 0) * max(frames, 1) * max(samples, 1)


def _data_set_offset(path: Path) -> int:
    """Where the data set starts in a file pynetdicom's chunked receive wrote: preamble, DICM, File Meta
    group (which starts with its group length, (0002,0000) UL)."""
    with open(path, "rb") as f:
        head = f.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise ValueError("no File Meta group length")
    return 144 + struct.unpack("<I", head[140:144])[0]
