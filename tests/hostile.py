"""Hostile peers for the node's limits, shared by tests/node and the fault suite: deflate and pixel bombs, a PDU
that claims 4 GiB, silent TCP connections, and pynetdicom senders for files it must not decode on the way out."""
from __future__ import annotations

import socket
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dsutils import create_file_meta, split_dataset
from pynetdicom.sop_class import Verification

from inference.training.phantoms import generate_phantom, phantom_dataset

SUCCESS = 0x0000


def small_instance(seed: int, size: int = 64, **changes) -> Dataset:
    """A valid DX phantom (`size` pixels square) with a fresh SOP Instance UID; `changes` set attributes."""
    ds = phantom_dataset(generate_phantom(seed, size))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def write_deflate_bomb(path: Path, inflated_bytes: int, seed: int = 9901) -> Path:
    """A DX instance in Deflated Explicit VR Little Endian whose 16-bit pixel data are zeros: about
    `inflated_bytes` inflated, about a thousandth of that on disk. Written in steps: no large buffer here."""
    ds = small_instance(seed)
    side = int((inflated_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    del ds.PixelData
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    length = side * side * 2
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, create_file_meta(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                                                transfer_syntax=DeflatedExplicitVRLittleEndian))
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        f.write(deflater.compress(body.getvalue() + pixel_header))
        left = length
        while left:
            step = min(left, len(zeros))
            f.write(deflater.compress(zeros[:step]))
            left -= step
        f.write(deflater.flush())
    return path


def rle_pixel_bomb(side: int, seed: int = 9902) -> Dataset:
    """An 8-bit RLE Lossless DX instance of side x side zeros: about side*side/64 bytes, side*side decoded."""
    ds = small_instance(seed)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    runs, rest = divmod(side * side, 128)
    segment = b"\x81\x00" * runs + (bytes([257 - rest, 0]) if rest else b"")
    segment += b"\x00" * (len(segment) % 2)
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    ds.PixelData = encapsulate([header + segment])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    return ds


def store_file(port: int, path: Path, calling_aet: str = "STORESCU", timeout_s: float = 30.0) -> Dataset | None:
    """C-STORE the file at `path` as it is (pynetdicom's chunked send: never decoded here), in the presentation
    context its file meta names; the response, or None when there was none or no context was accepted."""
    meta, _ = split_dataset(path)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return _store(port, path, meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID, calling_aet, timeout_s)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def store(port: int, ds: Dataset, calling_aet: str = "STORESCU", timeout_s: float = 30.0) -> Dataset | None:
    """C-STORE `ds` in its own transfer syntax; the response (None when there was none)."""
    return _store(port, ds, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, calling_aet, timeout_s)


def _store(port: int, payload: Dataset | Path, sop_class: str, transfer_syntax: str, calling_aet: str,
           timeout_s: float) -> Dataset | None:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="SMARTNODULE")
    if not assoc.is_established:
        return None
    try:
        response = assoc.send_c_store(payload)
    except ValueError:  # no accepted presentation context for the SOP class
        return None
    finally:
        if assoc.is_established:
            assoc.release()
    return response if "Status" in response else None


def echo(port: int, timeout_s: float, calling_aet: str = "STORESCU", called_aet: str = "SMARTNODULE") -> bool:
    """A C-ECHO that must be answered within `timeout_s` (association, DIMSE and network timeouts)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == SUCCESS


@contextmanager
def silent_connections(port: int, count: int, source: str = "127.0.0.2"):
    """`count` TCP connections from `source` (another loopback address) that never send a byte."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            sockets.append(s)
        yield sockets
    finally:
        for s in sockets:
            s.close()


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """True when the node closes `sock` (end of stream or reset) within `within_s`."""
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def pdu_length_bomb(port: int, claim: int = 0xFFFFFFF0, pdu_type: int = 0x01, send_limit: int = 256 << 20,
                    sock: socket.socket | None = None) -> int:
    """Announce a PDU of `claim` bytes and stream zeros until the node ends the connection (or `send_limit`
    bytes went out); returns how many bytes of the PDU body the node took before that."""
    sock = sock or socket.create_connection(("127.0.0.1", port))
    sent = 0
    zeros = bytes(64 << 10)
    try:
        sock.sendall(struct.pack(">BBL", pdu_type, 0, claim))
        sock.settimeout(10)
        while sent < send_limit:
            sent += sock.send(zeros)
    except OSError:  # reset, broken pipe or a timeout: the node stopped reading
        pass
    finally:
        sock.close()
    return sent
