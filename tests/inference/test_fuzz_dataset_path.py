"""Fuzz target: mutated phantom DICOM bytes through the worker's path, `dcmread` -> `prepare` -> `Detector.predict`.

Mutations: replaced values of Rows, Columns, BitsAllocated, BitsStored,
SamplesPerPixel, PhotometricInterpretation, the file meta Transfer Syntax UID
(the body stays Explicit VR Little Endian) and the Pixel Data length, then bit
flips (biased towards the header) and a truncation. The only exceptions allowed
are the defined ones: NotApplicable (SKIPPED), Unreadable (REJECTED) and
pydicom's InvalidDicomError; anything else would end a job FAILED after
retries instead of with a reason. FUZZ_EXAMPLES sets the number of examples
(60 by default, derandomized so that `make test` is repeatable).
`python -m tests.inference.test_fuzz_dataset_path --seconds 600` is the long
run: it goes on past findings and prints time, executions and crashes by kind.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from copy import deepcopy
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (JPEG2000, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, RLELossless)

from inference.training.phantoms import generate_phantom, phantom_dataset
from inference.predictor import Detector
from inference.preprocess import read_dataset
from inference.types import NotApplicable, Unreadable

ROOT = Path(__file__).resolve().parents[2]
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
DEFINED_ERRORS = (NotApplicable, Unreadable, InvalidDicomError)
SIDE_PX = 256

US = st.one_of(st.sampled_from([0, 1, 2, 255, 256, 257, 512, 4096, 32767, 32768, 65535]),
               st.integers(0, 65535))
FIELDS = {
    "Rows": US,
    "Columns": US,
    "BitsAllocated": st.one_of(st.sampled_from([0, 1, 7, 8, 12, 16, 24, 32, 64]), US),
    "BitsStored": st.one_of(st.sampled_from([0, 1, 8, 12, 16, 17, 32]), US),
    "SamplesPerPixel": st.sampled_from([0, 1, 2, 3, 4, 65535]),
    "PhotometricInterpretation": st.one_of(
        st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422", ""]),
        st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ", max_size=16)),
}
TRANSFER_SYNTAXES = st.one_of(
    st.sampled_from([ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                     DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, JPEG2000, RLELossless,
                     "1.2.3.4", "", None]),
    st.text("0123456789.", min_size=1, max_size=64))


def base_phantom() -> Dataset:
    return phantom_dataset(generate_phantom(4242, SIDE_PX, nodule=True))


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.load(device="cpu", threads=1)


@pytest.fixture(scope="module")
def phantom() -> Dataset:
    return base_phantom()


def encode(ds: Dataset, transfer_syntax: str | None) -> bytes:
    """Preamble, file meta naming `transfer_syntax` (None: none at all), then the body in Explicit VR LE."""
    meta = Dataset()
    meta.update(ds.file_meta)
    if transfer_syntax is None:
        del meta.TransferSyntaxUID
    else:
        meta.TransferSyntaxUID = transfer_syntax
    head, body = DicomBytesIO(), DicomBytesIO()
    write_file_meta_info(head, meta, enforce_standard=False)
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return bytes(128) + b"DICM" + head.getvalue() + body.getvalue()


class Mutant:
    """Mutated file bytes and what was done to them (the repr Hypothesis reports, without the bytes)."""

    def __init__(self, changes: list[str], data: bytes) -> None:
        self.changes, self.data = tuple(changes), data

    def __repr__(self) -> str:
        return f"Mutant({', '.join(self.changes) or 'unchanged'}; {len(self.data)} bytes)"


@st.composite
def mutants(draw, phantom: Dataset) -> Mutant:
    ds, changes = deepcopy(phantom), []
    for keyword in draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=3)):
        setattr(ds, keyword, value := draw(FIELDS[keyword]))
        changes.append(f"{keyword}={value!r}")
    if draw(st.booleans()):
        pixels = bytes(phantom.PixelData)
        length = draw(st.integers(0, 2 * len(pixels)))
        ds.PixelData = (pixels * 2)[:length]
        changes.append(f"PixelData {length} of {len(pixels)} bytes")
    syntax = draw(TRANSFER_SYNTAXES) if draw(st.booleans()) else ExplicitVRLittleEndian
    if syntax != ExplicitVRLittleEndian:
        changes.append(f"TransferSyntaxUID={syntax!r}")
    data = bytearray(encode(ds, syntax))
    header_end = data.find(b"\xe0\x7f\x10\x00")  # the Pixel Data tag: flips land mostly before it
    positions = st.one_of(st.integers(128, max(128, header_end)), st.integers(0, len(data) - 1))
    for position, bit in draw(st.lists(st.tuples(positions, st.integers(0, 7)), max_size=6)):
        data[position] ^= 1 << bit
        changes.append(f"flip byte {position} bit {bit}")
    if draw(st.booleans()):
        data = data[:(length := draw(st.integers(0, len(data))))]
        changes.append(f"truncated to {length} bytes")
    return Mutant(changes, bytes(data))


def run_worker_path(data: bytes, detector: Detector) -> None:
    """What the worker does with a spooled file, up to the prediction."""
    try:
        source = read_dataset(BytesIO(data))
        detector.predict(detector.prepare(source))
    except DEFINED_ERRORS:
        pass


def test_unmutated_phantom_is_predicted(phantom, detector):
    image = detector.prepare(dcmread(BytesIO(encode(phantom, ExplicitVRLittleEndian))))
    assert 0.0 <= detector.predict(image).probability <= 1.0


# What the fuzz target found (each fixed in inference.preprocess); kept as regression tests.
FINDINGS = {
    "empty_pixel_data": ("TypeError: len(None) in preprocess._validate when Pixel Data is empty (pydicom reads "
                         "a zero-length value as None)", lambda ds: (setattr(ds, "PixelData", b""), ds)[1],
                         ExplicitVRLittleEndian),
    "not_a_transfer_syntax": ("ValueError 'UID is not a transfer syntax' from UID.is_encapsulated in "
                              "preprocess._validate when the file meta names a non-transfer-syntax UID", None, "0"),
    "deflate_label_plain_body": ("zlib.error from dcmread when the file meta says Deflated but the body is not "
                                 "deflated", None, DeflatedExplicitVRLittleEndian),
}


@pytest.mark.parametrize("name", list(FINDINGS))
def test_fuzz_finding_raises_a_defined_error(phantom, detector, name):
    _reason, edit, syntax = FINDINGS[name]
    run_worker_path(encode(edit(deepcopy(phantom)) if edit else phantom, syntax), detector)


def test_corrupt_value_representation_raises_a_defined_error(phantom, detector):
    data = encode(phantom, ExplicitVRLittleEndian)
    run_worker_path(data.replace(b"\x28\x00\x00\x01US", b"\x28\x00\x00\x01WS"), detector)  # BitsAllocated's VR


@pytest.mark.parametrize("keyword", ["Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames"])
def test_multi_valued_image_attribute_raises_a_defined_error(phantom, detector, keyword):
    ds = deepcopy(phantom)
    ds["PixelData"].VR = "OW"  # else pydicom's writer itself compares a multi-valued BitsAllocated with 8
    setattr(ds, keyword, ["256", "256"] if keyword == "NumberOfFrames" else [256, 256])
    run_worker_path(encode(ds, ExplicitVRLittleEndian), detector)


def test_dataset_path_raises_only_defined_errors(phantom, detector):
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutant=mutants(phantom))
    def fuzz(mutant: Mutant) -> None:
        run_worker_path(mutant.data, detector)

    fuzz()


def signature(exc: BaseException) -> str:
    """Exception type and where it was raised: the deepest frame in our code and the deepest overall."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f.filename.startswith(str(ROOT)) and "/.venv/" not in f.filename]
    where = [f"{Path(f.filename).relative_to(ROOT) if f in ours else Path(f.filename).name}:{f.lineno}"
             for f in (ours[-1:] + frames[-1:])]
    return f"{type(exc).__name__} at {' -> '.join(dict.fromkeys(where))}"


def campaign(examples: int, seconds: float) -> dict:
    """A long fuzz run that does not stop at the first finding: unexpected exceptions counted by signature."""
    detector, phantom = Detector.load(device="cpu", threads=1), base_phantom()
    findings: dict[str, dict] = {}
    executions, started = 0, time.monotonic()

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(mutant=mutants(phantom))
    def target(mutant: Mutant) -> None:
        nonlocal executions
        if time.monotonic() - started > seconds:
            return
        executions += 1
        try:
            run_worker_path(mutant.data, detector)
        except Exception as exc:
            found = findings.setdefault(signature(exc), {"count": 0, "first": repr(mutant), "error": str(exc)[:160]})
            found["count"] += 1

    target()
    return {"seconds": round(time.monotonic() - started, 1), "executions": executions,
            "distinct_crashes": len(findings), "crashes": findings}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Long fuzz of the dataset path; prints a JSON summary.")
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args()
    print(json.dumps(campaign(args.examples, args.seconds), indent=2))
