"""Encode cost of the result pictures: the heatmap secondary capture and the PDF report of one image.

Reads a 2048x2048 phantom, prepares it, and makes a positive prediction by hand
(a Gaussian Grad-CAM blob around a chosen nodule; no model needed, so the figure
is the encoder's alone). Times `sr_writer.heatmap.build_heatmap_sc` (render plus
highdicom SC) and `sr_writer.encode.render_pdf`, median of N runs after one warm-up,
then prints one JSON line.

    .venv/bin/python -m bench.encode --n 7
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from pydicom import dcmread

from bench.common import load1, phantoms, print_table
from inference.preprocess import prepare
from inference.types import Location, ModelIdentity, Prediction
from sr_writer.encode import render_pdf
from sr_writer.heatmap import build_heatmap_sc
from sr_writer.uids import output_uids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=7)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    [path] = phantoms(1, args.size, seed0=778000)
    source = dcmread(path)
    image = prepare(source)
    rows, cols = image.display.shape
    location = Location(row=rows * 0.4, col=cols * 0.3, radius=rows / 60)
    yy, xx = np.mgrid[:rows, :cols]
    heat = np.exp(-((yy - location.row) ** 2 + (xx - location.col) ** 2) / (2 * (rows / 12) ** 2))
    prediction = Prediction(probability=0.87, uncertainty=0.05, positive=True, review=False,
                            location=location, heatmap=heat.astype(np.float32),
                            embedding=np.ones(8, np.float32) / np.sqrt(8),
                            model=ModelIdentity("bench-model", "0.0.0", "ab" * 32))
    uids = output_uids(source.SOPInstanceUID, "0.0.0", "heatmap")

    def timed(call) -> float:
        call()  # warm-up
        seconds = []
        for _ in range(args.n):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)

    sc_s = timed(lambda: build_heatmap_sc(source, image, prediction, uids=uids, institution_name=None))
    pdf_s = timed(lambda: render_pdf(source, image, prediction, review=False))
    print_table(["object", f"median s of {args.n}", "image"],
                [["heatmap SC", f"{sc_s:.3f}", f"{cols}x{rows}"], ["PDF report", f"{pdf_s:.3f}", f"{cols}x{rows}"]])
    print(json.dumps({"bench": "encode", "size": args.size, "n": args.n, "heatmap_sc_s": round(sc_s, 4),
                      "pdf_s": round(pdf_s, 4), "load1": load1()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
