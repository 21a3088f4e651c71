"""Owns `python -m inference.training.gpu_check`: the same predictions on CUDA and on CPU, within tolerances.

Exits 0 with "no CUDA device" where torch sees none; 0 when every phantom
agrees, 1 otherwise. CUDA runs with its defaults (TF32 convolutions allowed),
as the node would, so the tolerances below cover TF32 rounding.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

TOLERANCE = {
    "probability": 0.01,  # absolute
    "uncertainty": 0.01,  # absolute
    "heatmap_mean_abs": 0.02,  # mean |difference| of the [0, 1] Grad-CAM maps
    "location_px": 4.0,  # model-input pixels, converted to source pixels per image
    "embedding_cosine": 0.999,  # at least
}


def compare(cpu, gpu, px_per_model_px: float) -> list[str]:
    """Differences between two Predictions beyond TOLERANCE, as readable lines (empty: they agree)."""
    bad = []
    for key in ("probability", "uncertainty"):
        d = abs(getattr(cpu, key) - getattr(gpu, key))
        if d > TOLERANCE[key]:
            bad.append(f"{key} differs by {d:.4f} > {TOLERANCE[key]}")
    d = float(np.abs(cpu.heatmap - gpu.heatmap).mean())
    if d > TOLERANCE["heatmap_mean_abs"]:
        bad.append(f"heatmap mean |diff| {d:.4f} > {TOLERANCE['heatmap_mean_abs']}")
    if (cpu.location is None) != (gpu.location is None):
        bad.append(f"location present on one device only: cpu {cpu.location}, cuda {gpu.location}")
    elif cpu.location is not None:
        d = float(np.hypot(cpu.location.row - gpu.location.row, cpu.location.col - gpu.location.col))
        if d > TOLERANCE["location_px"] * px_per_model_px:
            bad.append(f"location differs by {d:.1f} source px")
    cos = float(np.dot(cpu.embedding, gpu.embedding))
    if cos < TOLERANCE["embedding_cosine"]:
        bad.append(f"embedding cosine {cos:.5f} < {TOLERANCE['embedding_cosine']}")
    return bad


def check(card: Path | None, count: int, size: int) -> tuple[bool, list[str]]:
    """Run `count` phantoms (half with a nodule) through both devices; (all agree, report lines)."""
    from inference.training.phantoms import generate_phantom, phantom_dataset
    from inference.predictor import Detector

    cpu = Detector.load(card, device="cpu", threads=2)
    gpu = Detector.load(card, device="cuda")
    lines, ok = [], True
    for i in range(count):
        ph = generate_phantom(4_000_000 + i, size=size, nodule=i % 2 == 0, gain=2.0)
        image = cpu.prepare(phantom_dataset(ph))
        gpu.predict(image)  # warm-up
        t0 = time.perf_counter()
        pg = gpu.predict(image)
        t1 = time.perf_counter()
        pc = cpu.predict(image)
        t2 = time.perf_counter()
        bad = compare(pc, pg, max(image.display.shape) / cpu.input_size)
        ok &= not bad
        lines.append(f"phantom {i}: p cpu {pc.probability:.4f} cuda {pg.probability:.4f}, "
                     f"cuda {1e3 * (t1 - t0):.0f} ms, cpu {1e3 * (t2 - t1):.0f} ms: {'; '.join(bad) or 'agree'}")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m inference.training.gpu_check", description=__doc__)
    p.add_argument("--card", type=Path, default=None)
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--size", type=int, default=1024)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing to compare")
        return 0
    print(f"gpu-check on {torch.cuda.get_device_name(0)}, tolerances {TOLERANCE}")
    ok, lines = check(args.card, args.count, args.size)
    print("\n".join(lines))
    print("gpu-check: CUDA and CPU agree" if ok else "gpu-check: CUDA and CPU DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
