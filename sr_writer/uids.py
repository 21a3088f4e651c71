"""Deterministic UIDs of the result objects.

Owns the one rule that names every output: a UID is a hash of the source SOP
Instance UID, the model version, the kind of object and the role of the UID, so
encoding the same image with the same model again yields the same UIDs and a PACS
replaces the earlier objects instead of collecting duplicates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

Kind = Literal["sr", "heatmap", "pdf"]
KINDS: tuple[Kind, ...] = ("sr", "heatmap", "pdf")
UID_PREFIX = PYDICOM_ROOT_UID
_UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class OutputUids:
    """Series and instance UIDs of one result object."""

    series_instance_uid: str
    sop_instance_uid: str


def output_uids(source_sop_instance_uid: str, model_version: str, kind: Kind) -> OutputUids:
    """UIDs of the `kind` object made from `source_sop_instance_uid` by `model_version`."""
    return OutputUids(derive_uid(source_sop_instance_uid, model_version, kind, "series"),
                      derive_uid(source_sop_instance_uid, model_version, kind, "instance"))


def derive_uid(source_sop_instance_uid: str, model_version: str, kind: Kind, role: str) -> str:
    """The UID playing `role` (series, instance, a tracking UID) in the `kind` object."""
    if not isinstance(source_sop_instance_uid, str) or len(source_sop_instance_uid) > 64 \
            or not _UID_PATTERN.match(source_sop_instance_uid):
        raise ValueError(f"source_sop_instance_uid is not a DICOM UID: {source_sop_instance_uid!r}")
    if not isinstance(model_version, str) or not model_version.strip():
        raise ValueError(f"model_version must be a non-empty string, got {model_version!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(role, str) or not role:
        raise ValueError(f"role must be a non-empty string, got {role!r}")
    return str(generate_uid(prefix=UID_PREFIX,
                            entropy_srcs=[source_sop_instance_uid, model_version, kind, role]))


def device_uid(model_name: str, model_version: str, weights_sha256: str) -> str:
    """Device Observer UID of the algorithm: one UID per model name, version and weights."""
    return str(generate_uid(prefix=UID_PREFIX,
                            entropy_srcs=["device", model_name, model_version, weights_sha256]))
