"""Inference alone: preprocessing, prediction with and without Grad-CAM, batch sizes and faster CPU paths.

The detector is the shipped model card (`Detector.load()`; the benchmark stops
with one line when it is missing). For each cached 2048 px phantom: `dcmread`, `prepare`, `probability`
(the lung segmentation where the card ships one, the two TTA views, no Grad-CAM) and `predict`
(with Grad-CAM), in float32.
Then the forward pass alone per image at batch 1, 4 and 8 for float32 and the
faster paths (channels_last; TorchScript trace + freeze + optimize_for_inference;
torch.compile with --compile),
each checked against the float32 reference: max abs difference of calibrated
probabilities (tolerance 1e-4), and of Grad-CAM heatmaps (1e-3) where the path
supports autograd; the fastest path within tolerance is reported. Stages and
paths are timed in turn on each image, so load spikes hit them alike.

    .venv/bin/python -m bench.inference --n 8
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from pydicom import dcmread

from bench.common import load1, model_card, phantoms, print_table
from inference.model import image_score, tta_views
from inference.predictor import Detector

BATCHES = (1, 4, 8)
TOLERANCE_P = 1e-4  # max abs difference of a calibrated probability for a path to count as the same output
TOLERANCE_MAP = 1e-3  # ... and of a Grad-CAM heatmap value (in [0, 1])
Forward = Callable[[torch.Tensor], torch.Tensor]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def probabilities(detector: Detector, forward: Forward, x: torch.Tensor, region: torch.Tensor | None) -> np.ndarray:
    """Calibrated probability per image of a (B,1,S,S) batch, the same TTA, lung region and calibration as the
    detector (`region`: of every TTA view, None: the network's own lung field)."""
    with torch.inference_mode():
        scores, _ = image_score(forward(tta_views(x)).float(), region)
    views = scores.double().numpy().reshape(2, -1)  # originals first, then their flipped copies
    return np.array([detector.card.calibration.probability(float(s)) for s in views.mean(axis=0)])


def traced(net: torch.nn.Module, example: torch.Tensor) -> Forward:
    """TorchScript trace of the maps output, frozen (BatchNorm folded) and optimised for inference."""

    class Maps(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).maps

    with torch.inference_mode(False), torch.no_grad():
        module = torch.jit.trace(Maps().eval(), tta_views(example), check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(module))


def forwards(detector: Detector, example: torch.Tensor, compile_: bool) -> dict[str, Forward]:
    net = detector.net
    cl_net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    paths = {
        "float32": lambda x: net(x).maps,
        "channels_last": lambda x: cl_net(x.contiguous(memory_format=torch.channels_last)).maps,
        "jit_frozen": traced(copy.deepcopy(net), example),
    }
    if compile_:  # inductor compiles once per batch size, about a minute each here, in the untimed warm-up
        compiled = torch.compile(copy.deepcopy(net))
        paths["torch_compile"] = lambda x: compiled(x).maps
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8, help="images (at least 8, the largest batch)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per batch (after one warm-up)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (inductor; minutes of compiling)")
    args = parser.parse_args()
    n = max(args.n, max(BATCHES))
    card, card_note = model_card()
    detector = Detector.load(card, device="cpu")
    files = phantoms(n, 2048)

    cl_detector = Detector(detector.card, copy.deepcopy(detector.net).to(memory_format=torch.channels_last),
                           detector.device, detector.review, detector.density, detector.lungs)
    warm = detector.prepare(dcmread(files[0]))
    detector.predict(warm)
    cl_detector.predict(warm)
    read_s, prep_s, prob_s, cam_s, cl_cam_s, images, reference, cl_predictions = ([] for _ in range(8))
    for path in files:  # every stage and path on each image in turn, so load spikes hit them alike
        t, ds = timed(lambda: dcmread(path))
        read_s.append(t)
        t, image = timed(lambda: detector.prepare(ds))
        prep_s.append(t)
        images.append(image)
        prob_s.append(timed(lambda: detector.probability(image))[0])
        t, prediction = timed(lambda: detector.predict(image))
        cam_s.append(t)
        reference.append(prediction)
        t, prediction = timed(lambda: cl_detector.predict(image))
        cl_cam_s.append(t)
        cl_predictions.append(prediction)
    ref_p = np.array([p.probability for p in reference])
    cam_diff_p = max(abs(a.probability - b.probability) for a, b in zip(cl_predictions, reference))
    cam_diff_map = max(float(np.abs(a.heatmap - b.heatmap).max()) for a, b in zip(cl_predictions, reference))

    ms = lambda seconds: 1000 * statistics.median(seconds)  # noqa: E731
    print(f"model: {card_note} ({detector.card.name} {detector.card.version}), input {detector.input_size} px, "
          f"2 TTA views per image, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_table(["stage (2048 px, batch 1, float32)", "ms/img"], [
        ["dcmread", f"{ms(read_s):.1f}"],
        ["preprocess (prepare)", f"{ms(prep_s):.1f}"],
        ["predict without Grad-CAM (probability)", f"{ms(prob_s):.1f}"],
        ["predict with Grad-CAM (Detector.predict)", f"{ms(cam_s):.1f}"],
        [f"predict with Grad-CAM, channels_last (max|dp| {cam_diff_p:.1e}, max|dmap| {cam_diff_map:.1e}, "
         f"{'within' if cam_diff_p <= TOLERANCE_P and cam_diff_map <= TOLERANCE_MAP else 'OUTSIDE'} tolerance)",
         f"{ms(cl_cam_s):.1f}"],
    ])

    inputs = torch.stack([torch.from_numpy(np.asarray(i.model_input, dtype=np.float32))[None] for i in images])
    fields = [detector.lung_field(i)[1] for i in images]  # each (2,H,W): original view, flipped view
    paths = forwards(detector, inputs[:1], args.compile)
    rows, per_image, diffs = [], {}, {}
    for batch in BATCHES:
        x = inputs[:batch]
        region = None if fields[0] is None else torch.cat([torch.stack([f[v] for f in fields[:batch]]) for v in (0, 1)])
        times: dict[str, list[float]] = {name: [] for name in paths}
        for forward in paths.values():
            probabilities(detector, forward, x, region)  # warm-up (the JIT's profiling runs, inductor's compile)
        for _ in range(args.reps):  # the paths in turn, so load spikes hit them alike
            for name, forward in paths.items():
                t, p = timed(lambda: probabilities(detector, forward, x, region))
                times[name].append(t)
                diffs[name, batch] = max(diffs.get((name, batch), 0.0), float(np.abs(p - ref_p[:batch]).max()))
        for name in paths:
            per_image[name, batch] = ms(times[name]) / batch
            rows.append([name, batch, f"{per_image[name, batch]:.1f}",
                         f"{per_image['float32', batch] / per_image[name, batch]:.2f}", f"{diffs[name, batch]:.1e}",
                         "yes" if diffs[name, batch] <= TOLERANCE_P else "NO"])
    print_table(["forward path", "batch", "ms/img", "x float32", "max|dp| vs ref", "within 1e-4"], rows)

    fastest = min((k for k in per_image if diffs[k] <= TOLERANCE_P), key=per_image.get)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "bench": "inference", "model": card_note, "n": n, "threads": torch.get_num_threads(),
        "read_ms": round(ms(read_s), 1), "preprocess_ms": round(ms(prep_s), 1),
        "predict_ms": round(ms(prob_s), 1), "predict_gradcam_ms": round(ms(cam_s), 1),
        "predict_gradcam_channels_last_ms": round(ms(cl_cam_s), 1),
        "gradcam_channels_last_max_abs_diff_p": cam_diff_p, "gradcam_channels_last_max_abs_diff_heatmap": cam_diff_map,
        **{f"{name}_b{batch}_ms": round(value, 1) for (name, batch), value in per_image.items()},
        "fastest": f"{fastest[0]} batch {fastest[1]}", "fastest_ms": round(per_image[fastest], 1),
        "fastest_max_abs_diff_p": diffs[fastest], "peak_rss_mb": round(peak_rss),
        "load1": load1(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
