"""Phantom generation speed: the varied training generator against the default one, on one core.

Images are generated in turn (default, varied, default, ...) so load spikes
hit both alike; medians of milliseconds per image, one thread (torch and
OpenCV), as a DataLoader worker runs. Target (#17): varied under 150 ms at
512 px on an idle core.

    .venv/bin/python -m bench.generators --n 20 --sizes 512 1024
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import cv2

from bench.common import load1, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="images per generator and size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    args = parser.parse_args()
    cv2.setNumThreads(1)
    from inference.training.phantoms import generate_phantom
    from inference.training.variety import generate_varied

    makers = {"default": lambda s, size: generate_phantom(s, size), "varied": lambda s, size: generate_varied(s, size)}
    rows, out = [], {"load1_before": load1()}
    for size in args.sizes:
        times: dict[str, list[float]] = {k: [] for k in makers}
        for seed in range(args.n + 1):
            for name, make in makers.items():
                start = time.perf_counter()
                make(seed, size)
                if seed:  # the first image warms caches
                    times[name].append(1000 * (time.perf_counter() - start))
        for name, ms in times.items():
            med = statistics.median(ms)
            rows.append([name, size, f"{med:.0f}", f"{min(ms):.0f}", f"{max(ms):.0f}"])
            out[f"{name}_{size}_ms"] = round(med, 1)
    out["load1_after"] = load1()
    print_table(["generator", "px", "median ms", "min ms", "max ms"], rows)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
