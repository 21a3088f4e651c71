"""Print once: fine-tune time on this machine and the serving latency (Detector.predict) idle vs. while it runs.

`python -m scheduler.measure [--steps 20] [--batch 8] [--phantoms 16] [--eval 20]`. Figures only, no asserts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--phantoms", type=int, default=16)
    parser.add_argument("--eval", type=int, default=20)
    args = parser.parse_args(argv)

    from config.settings import load_settings
    from inference import registry
    from inference.phantoms import generate_phantom, phantom_dataset
    from inference.predictor import Detector
    from inference.preprocess import prepare

    work = Path(tempfile.mkdtemp(prefix="smartnodule-measure-"))
    settings = load_settings(None, node={"data_dir": str(work), "accept_any_calling_ae": True}, destinations=[],
                             registry={"eval_phantoms": args.eval})
    detector = Detector.load(None, device="cpu", threads=max(1, (os.cpu_count() or 2) - 1))
    image = prepare(phantom_dataset(generate_phantom(4242, 512, nodule=True)), input_size=detector.input_size)
    detector.predict(image)

    def latency(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            detector.predict(image)
            out.append(time.perf_counter() - t)
        return out

    idle = latency(15)
    champion = registry.ensure_registered(settings)
    manifest = {"settings": settings.model_dump(mode="json"), "champion_card": str(registry.shipped_card(settings)),
                "champion_version": champion, "cases": [], "steps": args.steps, "batch": args.batch,
                "phantoms": args.phantoms, "threads": 1}
    path = work / "manifest.json"
    path.write_text(json.dumps(manifest))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "inference.fine_tune", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    busy: list[float] = []
    while proc.poll() is None:
        busy += latency(1)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    summary = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": err[-500:]}
    figures = {
        "cpu_cores": os.cpu_count(), "serving_threads": max(1, (os.cpu_count() or 2) - 1), "fine_tune_threads": 1,
        "predict_idle_ms": {"median": round(1000 * statistics.median(idle), 1), "max": round(1000 * max(idle), 1), "n": len(idle)},
        "predict_during_fine_tune_ms": {"median": round(1000 * statistics.median(busy), 1),
                                        "max": round(1000 * max(busy), 1), "n": len(busy)} if busy else None,
        "fine_tune_wall_s": round(wall, 1), "steps": args.steps, "batch": args.batch,
        "train_s": summary.get("train_seconds"), "gate_s": summary.get("gate_seconds"),
        "s_per_step": round(summary["train_seconds"] / args.steps, 2) if summary.get("train_seconds") else None,
        "gate_eval_phantoms": args.eval,
    }
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
