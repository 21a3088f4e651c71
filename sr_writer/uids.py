"""Deterministic UIDs of the result objects, under the site's own UID root.

Owns the one rule that names every output: a UID is the site's root
(`results.uid_root`) followed by a hash of the source SOP Instance UID, the model
version, the kind of object and the role of the UID, so encoding the same image
with the same model again yields the same UIDs and a PACS replaces the earlier
objects instead of collecting duplicates.

The default root is a UUID-derived arc (ITU-T X.667: whoever generates the UUID
owns `2.25.<uuid>` and may allocate below it), generated once for SmartNodule; a
site with its own registered root sets `results.uid_root`. A root may be at most
`MAX_UID_ROOT_LENGTH` characters, so that at least 19 hash digits (more than 63
bits) follow it within the 64 characters of a UID.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydicom.uid import RE_VALID_UID, generate_uid

Kind = Literal["sr", "gsps", "heatmap", "pdf"]
KINDS: tuple[Kind, ...] = ("sr", "gsps", "heatmap", "pdf")
DEFAULT_UID_ROOT = "2.25.6917992207774837699974228907813234322"
MAX_UID_ROOT_LENGTH = 44


@dataclass(frozen=True)
class OutputUids:
    """Series and instance UIDs of one result object."""

    series_instance_uid: str
    sop_instance_uid: str


def is_uid(value: object) -> bool:
    """True when `value` follows the DICOM UID grammar (PS3.5 9.1), at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and bool(RE_VALID_UID.match(value))


def check_uid_root(uid_root: object) -> str:
    """`uid_root` when it can prefix our UIDs; ValueError naming the problem otherwise."""
    if not isinstance(uid_root, str) or not is_uid(uid_root):
        raise ValueError(f"uid_root is not a DICOM UID (digits and dots, no leading zeros): {uid_root!r}")
    if len(uid_root) > MAX_UID_ROOT_LENGTH:
        raise ValueError(f"uid_root must be at most {MAX_UID_ROOT_LENGTH} characters to leave room "
                         f"for the generated suffix, got {len(uid_root)}: {uid_root!r}")
    return uid_root


def output_uids(source_sop_instance_uid: str, model_version: str, kind: Kind, *,
                uid_root: str = DEFAULT_UID_ROOT) -> OutputUids:
    """UIDs of the `kind` object made from `source_sop_instance_uid` by `model_version`."""
    return OutputUids(derive_uid(source_sop_instance_uid, model_version, kind, "series", uid_root=uid_root),
                      derive_uid(source_sop_instance_uid, model_version, kind, "instance", uid_root=uid_root))


def derive_uid(source_sop_instance_uid: str, model_version: str, kind: Kind, role: str, *,
               uid_root: str = DEFAULT_UID_ROOT) -> str:
    """The UID playing `role` (series, instance, a tracking UID) in the `kind` object."""
    if not is_uid(source_sop_instance_uid):
        raise ValueError(f"source_sop_instance_uid is not a DICOM UID: {source_sop_instance_uid!r}")
    if not isinstance(model_version, str) or not model_version.strip():
        raise ValueError(f"model_version must be a non-empty string, got {model_version!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(role, str) or not role:
        raise ValueError(f"role must be a non-empty string, got {role!r}")
    return str(generate_uid(prefix=check_uid_root(uid_root) + ".",
                            entropy_srcs=[source_sop_instance_uid, model_version, kind, role]))


def device_uid(model_name: str, model_version: str, weights_sha256: str, *,
               uid_root: str = DEFAULT_UID_ROOT) -> str:
    """Device Observer UID of the algorithm: one UID per model name, version and weights."""
    return str(generate_uid(prefix=check_uid_root(uid_root) + ".",
                            entropy_srcs=["device", model_name, model_version, weights_sha256]))
