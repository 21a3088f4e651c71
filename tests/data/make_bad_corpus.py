"""The bad-input corpus: malformed or out-of-scope DICOM files, each with the outcome the node must give it.

`python -m tests.data.make_bad_corpus [FOLDER]` writes it (default `tests/data/bad/`);
`build_corpus(folder)` writes it and returns the cases. An outcome is either a
C-STORE refusal (`status`, or no presentation context at all) or an
acknowledged instance whose job ends in `state` with a reason starting with
`reason` (the stable codes of `inference.preprocess`).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (CTImageStorage, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit,
                         generate_uid)

from pynetdicom.dsutils import split_dataset

from inference.training.phantoms import Phantom, generate_phantom, phantom_dataset
from node.scp import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS

DEFAULT_FOLDER = Path(__file__).resolve().parent / "bad"
SIDE_PX = 256  # the smallest side the node reads: small files, still a valid image where one is wanted


@dataclass(frozen=True)
class BadCase:
    """One corpus file and what the node must do with it.

    `sender` is "pynetdicom" (the file's bytes streamed as they are, file meta
    choosing the context) or "storescu" (DCMTK parses the file first).
    `status` None: no presentation context is accepted, so nothing is sent.
    `state` None: refused, no job row.
    """

    name: str
    path: Path
    sop_instance_uid: str
    what: str
    sender: str
    status: int | None
    state: str | None = None
    reason: str | None = None


@cache
def _phantom() -> Phantom:
    return generate_phantom(7000, SIDE_PX, nodule=False)


def _base(name: str, round_: int) -> Dataset:
    """A valid small DX chest phantom with UIDs unique to (name, round)."""
    ds = phantom_dataset(_phantom())
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["smartnodule-bad-study", str(round_)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["smartnodule-bad-series", name, str(round_)])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=["smartnodule-bad-sop", name, str(round_)])
    ds.preamble = bytes(128)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=False)
    return path


def _truncated(ds: Dataset, path: Path, keep: Callable[[int], int]) -> Path:
    """The file cut after `keep(file size)` bytes."""
    _save(ds, path)
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])
    return path


def _colour(ds: Dataset, photometric: str) -> Dataset:
    grey = np.frombuffer(ds.PixelData, np.uint16).reshape(ds.Rows, ds.Columns) >> 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PixelData = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2).tobytes()
    else:
        ramp = np.arange(256, dtype=np.uint16) * 257
        ds.RedPaletteColorLookupTableDescriptor = ds.GreenPaletteColorLookupTableDescriptor = \
            ds.BluePaletteColorLookupTableDescriptor = [256, 0, 16]
        ds.RedPaletteColorLookupTableData = ds.GreenPaletteColorLookupTableData = \
            ds.BluePaletteColorLookupTableData = ramp.tobytes()
        ds.PixelData = grey.astype(np.uint8).tobytes()
    for keyword in ("WindowCenter", "WindowWidth", "PresentationLUTShape"):
        delattr(ds, keyword)
    return ds


def _sr_as_dx(ds: Dataset) -> Dataset:
    """An SR document (no pixels) under the DX image SOP class."""
    for keyword in [e.keyword for e in ds if e.keyword and e.tag.group in (0x0018, 0x0028, 0x7FE0)]:
        delattr(ds, keyword)
    ds.Modality, ds.ValueType, ds.ContinuityOfContent = "SR", "CONTAINER", "SEPARATE"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "126000", "DCM", "Imaging Measurement Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    return ds


def build_corpus(folder: Path | str = DEFAULT_FOLDER, *, round_: int = 0, huge_mb: int = 50) -> list[BadCase]:
    """Write every case into `folder`; `round_` varies the UIDs so the corpus can be sent again as new instances.

    `huge_mb` 0 leaves out the huge private tag case.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cases: list[BadCase] = []

    def add(name: str, what: str, edit: Callable[[Dataset, Path], Dataset | Path], *, sender: str = "pynetdicom",
            status: int | None = SUCCESS, state: str | None = None, reason: str | None = None) -> None:
        path = out / f"{name}.dcm"
        ds = _base(name, round_)
        sop_uid = str(ds.SOPInstanceUID)
        result = edit(ds, path)
        if isinstance(result, Dataset):
            _save(result, path)
        cases.append(BadCase(name, path, sop_uid, what, sender, status, state, reason))

    def setting(**values: object) -> Callable[[Dataset, Path], Dataset]:
        def edit(ds: Dataset, _path: Path) -> Dataset:
            for keyword, value in values.items():
                setattr(ds, keyword, value)
            return ds
        return edit

    add("truncated_pixels", "file cut at 60 %, inside Pixel Data",
        lambda ds, p: _truncated(ds, p, lambda n: n * 6 // 10), state="REJECTED", reason="pixel_data_truncated")
    add("truncated_header", "file cut 400 bytes in, inside the header",
        lambda ds, p: _truncated(ds, p, lambda n: 400), status=CANNOT_UNDERSTAND)
    add("ts_missing", "file meta without Transfer Syntax UID (storescu detects Explicit VR LE)",
        lambda ds, p: (delattr(ds.file_meta, "TransferSyntaxUID"), ds)[1], sender="storescu", state="ENCODED")
    add("ts_implicit_label", "Explicit VR LE body labelled Implicit VR LE in the file meta",
        lambda ds, p: _relabel(ds, p, ImplicitVRLittleEndian), state="ENCODED")
    add("ts_jpeg_label", "native pixels labelled JPEG Baseline in the file meta",
        lambda ds, p: _relabel(ds, p, JPEGBaseline8Bit), state="REJECTED", reason="pixel_data_unreadable")
    add("ts_deflate_label", "Explicit VR LE body labelled Deflated Explicit VR LE in the file meta",
        lambda ds, p: _relabel(ds, p, DeflatedExplicitVRLittleEndian), status=CANNOT_UNDERSTAND)
    add("pixel_data_short", "Pixel Data half of Rows*Columns*BitsAllocated/8",
        lambda ds, p: setattr(ds, "PixelData", ds.PixelData[:len(ds.PixelData) // 2]) or ds,
        state="REJECTED", reason="pixel_data_truncated")
    add("rows_zero", "Rows 0", setting(Rows=0), state="REJECTED", reason="too_small")
    add("rows_cols_65535", "Rows and Columns 65535 over 256x256 pixels (over node.max_pixels)",
        setting(Rows=65535, Columns=65535), status=OUT_OF_RESOURCES)
    add("one_pixel", "a 1x1 image", setting(Rows=1, Columns=1, PixelData=b"\x00\x08"),
        state="REJECTED", reason="too_small")
    add("declared_30000", "30000x30000 declared over 256x256 pixels (over node.max_pixels)",
        setting(Rows=30000, Columns=30000), status=OUT_OF_RESOURCES)
    add("ct_image", "CT Image Storage (CT SOP class is not accepted)",
        lambda ds, p: _as_ct(ds), sender="storescu", status=None)
    add("rgb", "RGB, 3 samples per pixel", lambda ds, p: _colour(ds, "RGB"),
        state="SKIPPED", reason="photometric_not_supported")
    add("palette_color", "PALETTE COLOR with 8-bit LUTs", lambda ds, p: _colour(ds, "PALETTE COLOR"),
        state="SKIPPED", reason="photometric_not_supported")
    add("multi_frame", "3 frames", lambda ds, p: _frames(ds, 3),
        state="SKIPPED", reason="multi_frame")
    add("sr_as_dx", "an SR document under the DX SOP class", lambda ds, p: _sr_as_dx(ds),
        state="SKIPPED", reason="not_an_image")
    add("body_part_knee", "BodyPartExamined KNEE", setting(BodyPartExamined="KNEE"),
        state="SKIPPED", reason="body_part_not_chest")
    add("lateral_view", "ViewPosition LL", setting(ViewPosition="LL"), state="SKIPPED", reason="lateral_view")
    if huge_mb:
        add("huge_private_tag", f"a {huge_mb} MB private OB element (node.max_instance_mb 16 in the tests)",
            lambda ds, p: _huge(ds, huge_mb), status=OUT_OF_RESOURCES)
    return cases


def _relabel(ds: Dataset, path: Path, syntax: str) -> Path:
    """Encode as Explicit VR LE, then claim `syntax` in the file meta only."""
    _save(ds, path)
    data = path.read_bytes()
    _meta, body_offset = split_dataset(path)
    ds.file_meta.TransferSyntaxUID = syntax
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta)
    path.write_bytes(data[:132] + meta.getvalue() + data[body_offset:])
    return path


def _as_ct(ds: Dataset) -> Dataset:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.Modality = "CT"
    return ds


def _frames(ds: Dataset, frames: int) -> Dataset:
    ds.NumberOfFrames = frames
    ds.PixelData = ds.PixelData * frames
    return ds


def _huge(ds: Dataset, megabytes: int) -> Dataset:
    block = ds.private_block(0x0029, "SMARTNODULE BAD CORPUS", create=True)
    block.add_new(0x10, "OB", bytes(megabytes * 1024 * 1024))
    return ds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, nargs="?", default=DEFAULT_FOLDER)
    parser.add_argument("--huge-mb", type=int, default=50)
    args = parser.parse_args(argv)
    for case in build_corpus(args.folder, huge_mb=args.huge_mb):
        outcome = f"{case.state} {case.reason or ''}" if case.state else \
            "no presentation context" if case.status is None else f"refused 0x{case.status:04X}"
        print(f"{case.path}\t{case.path.stat().st_size}\t{outcome}\t{case.what}")


if __name__ == "__main__":
    main()
