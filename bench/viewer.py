"""Server cost of the case viewer: decoding a source into `ViewerPixels` and what it weighs on the wire.

For a 2048 x 2048 phantom and a 3000 x 2500 one (the 2048 phantom rescaled), times
`review_web.images.viewer_pixels` (decode, modality LUT, quantise, presets; the
web app does it once per job, cached), median of N runs after one warm-up, and
prints the bytes sent to the browser, with a reduced image for a low size limit,
then one JSON line.

    .venv/bin/python -m bench.viewer --n 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from pydicom import dcmread

from bench.common import load1, phantoms, print_table
from inference.training.phantoms import generate_phantom, phantom_dataset
from review_web.images import viewer_pixels

LIMITS = (4096 * 4096, 2048 * 2048)  # the default web.viewer_max_pixels, and a low one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5)
    args = parser.parse_args()
    [path] = phantoms(1, 2048, seed0=779000)
    sources = {"2048x2048": dcmread(path),
               "2500x3000": phantom_dataset(generate_phantom(779001, 2048), rows_cols=(3000, 2500))}
    rows, figures = [], {}
    for name, ds in sources.items():
        for limit in LIMITS:
            viewer_pixels(ds, limit)  # warm-up
            seconds = []
            for _ in range(args.n):
                start = time.perf_counter()
                pixels = viewer_pixels(ds, limit)
                seconds.append(time.perf_counter() - start)
            median = statistics.median(seconds)
            rows.append([name, limit, f"{pixels.cols}x{pixels.rows}", pixels.reduction, median,
                         round(len(pixels.data) / 2**20, 1)])
            figures[f"{name}_limit{limit}_s"] = round(median, 4)
            figures[f"{name}_limit{limit}_mib"] = round(len(pixels.data) / 2**20, 2)
    print_table(["source", "max pixels", "sent", "reduced 1:", f"median s of {args.n}", "MiB"], rows)
    print(json.dumps({"bench": "viewer", "n": args.n, **figures, "load1": load1()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
