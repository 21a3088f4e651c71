"""Owns how torch is brought up: the torchvision operator guard, CPU threads, device choice.

Import `torch_setup` before anything imports timm or torchvision (see
shared/ENVIRONMENT.md: a CPU torch with a CUDA-linked torchvision fails at
`import torchvision` unless the `nms`/`qnms` schemas exist first).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from inference.types import DEVICES
_LIBS: list[torch.library.Library] = []  # keeps the schema library alive for the process


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _load_torchvision_ops() -> None:
    """Load torchvision's compiled ops the way torchvision would; a failed load leaves them missing."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for folder in spec.submodule_search_locations:
        for lib in sorted(Path(folder).glob("_C*.so")) + sorted(Path(folder).glob("_C*.pyd")):
            try:
                torch.ops.load_library(str(lib))
            except (OSError, RuntimeError):
                continue
            return


def guard_torchvision() -> None:
    """Define `torchvision::nms`/`qnms` schemas when torchvision's compiled ops cannot load."""
    if "torchvision" in sys.modules or _has_op("nms"):
        return
    _load_torchvision_ops()
    if _has_op("nms"):
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    if not _has_op("qnms"):
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBS.append(lib)


guard_torchvision()


def limit_threads(threads: int | None) -> None:
    """Set torch's intra-op CPU threads (None leaves torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    torch.set_num_threads(threads)


def select_device(device: str) -> torch.device:
    """Map `auto|cpu|cuda` to a torch device; `cuda` without a GPU is an error."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(device)
