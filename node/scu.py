"""The C-STORE SCU: sends DICOM files to a peer and reports each response status.

Used by result delivery and by `smartnodule send`. A file whose own transfer
syntax the peer does not accept is sent decompressed when the peer accepts an
uncompressed one.
"""
from __future__ import annotations

import ssl
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context

from node.tls import tls_args

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Storage warning statuses (PS3.4 B.2.3): the peer kept the instance.
WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


class AssociationFailed(RuntimeError):
    """The peer could not be reached or refused the association."""


@dataclass(frozen=True)
class StoreResult:
    """One instance's answer from the peer."""

    path: Path
    sop_instance_uid: str
    status: int | None
    comment: str = ""

    @property
    def stored(self) -> bool:
        return self.status == 0x0000 or self.status in WARNING_STATUSES

    @property
    def warning(self) -> bool:
        return self.status in WARNING_STATUSES


def send_files(
    paths: list[Path],
    *,
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "SMARTNODULE",
    timeout_s: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> list[StoreResult]:
    """C-STORE every file in `paths` over one association; raises AssociationFailed when none is made.

    With `tls` (`node.tls.client_context`) the peer's certificate must name `host`.
    """
    datasets = [(Path(p), dcmread(p)) for p in paths]
    syntaxes: dict[str, set[str]] = defaultdict(set)
    for _, ds in datasets:
        syntaxes[str(ds.SOPClassUID)].add(str(ds.file_meta.TransferSyntaxUID))
    ae = AE(ae_title=calling_aet)
    ae.maximum_pdu_size = 1 << 20
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.requested_contexts = [
        build_context(sop_class, sorted(own) + [ts for ts in UNCOMPRESSED if ts not in own])
        for sop_class, own in syntaxes.items()
    ]
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args(tls, host))
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
        raise AssociationFailed(f"association with {called_aet}@{host}:{port} {reason}")
    results = []
    try:
        for path, ds in datasets:
            results.append(_store_one(assoc, path, ds))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _store_one(assoc, path: Path, ds) -> StoreResult:
    sop_uid = str(ds.SOPInstanceUID)
    accepted = {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
                if cx.abstract_syntax == ds.SOPClassUID}
    if not accepted:
        return StoreResult(path, sop_uid, None, "no accepted presentation context")
    if str(ds.file_meta.TransferSyntaxUID) not in accepted:
        if not accepted.intersection(UNCOMPRESSED):
            return StoreResult(path, sop_uid, None, "peer accepts no transfer syntax we can send")
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()  # an uncompressed dataset is re-encoded to the accepted syntax by pynetdicom
    if not assoc.is_established:
        return StoreResult(path, sop_uid, None, "association lost")
    response = assoc.send_c_store(ds)
    if "Status" not in response:
        return StoreResult(path, sop_uid, None, "no response (timeout or abort)")
    return StoreResult(path, sop_uid, int(response.Status), str(response.get("ErrorComment", "")))
