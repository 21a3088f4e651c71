"""CUDA and CPU give the same predictions for the shipped model (inference.training.gpu_check's tolerances)."""
from __future__ import annotations

import pytest
import torch

from inference.training.gpu_check import check


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    ok, lines = check(None, count=2, size=768)
    assert ok, "\n".join(lines)
