"""Owns fine-tuning the model in service on adjudicated cases: `python -m scheduler.fine_tune MANIFEST`.

Runs as a separate process with one torch thread so the node keeps serving.
The manifest (`scheduler.fine_tune_contract.FineTuneManifest`, written by
`scheduler.tasks.retrain`) carries the settings, the champion's card, the
adjudicated cases (spool DICOM, final verdict, click location) split into
training and held-out, and the phantom seeds. Steps:

1. training samples: each case through `inference.preprocess.prepare` (image
   label; a Gaussian heatmap target at the verdict click when there is one),
   plus fresh training phantoms made as `train.py` makes them (dense targets);
2. a short AdamW fine-tune from the champion's weights (BatchNorm statistics
   frozen: batches are small), losses from `train.py` masked per sample
   (cases have no lung mask, unlocated positives no heatmap target);
3. MLflow: parameters, loss per block of steps, the training-data fingerprint
   (sha256 over sorted SOP UIDs + verdicts + phantom seeds), card and
   safetensors weights as artifacts, registered as a new version of the
   registered model whose card version is `<base>+ft.<registry version>`;
4. the promotion gate (`scheduler.registry.evaluate_gate`) against the
   champion; figures go to the run's metrics and the version's tags.

Each step of the work is a `Progress` JSON line on stdout as it happens (the
parent logs them), with a progress bar per phase on stderr when it is a terminal
or `--progress always`. The `FineTuneResult` is written to the manifest's
`result_path` before the process exits 0; a manifest that breaks the contract
ends it with one line naming the field and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.training import progress
from scheduler.fine_tune_contract import AdjudicatedCase, ContractError, FineTuneManifest, FineTuneResult, Progress

if TYPE_CHECKING:
    from tqdm import tqdm

    from inference.training.samples import ModelImages

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


class Reporter:
    """The child's progress: per phase, a `Progress` line on stdout for its first and last step and at most one per
    `interval_s` between, and a tqdm bar on stderr when `mode` asks for one."""

    def __init__(self, interval_s: float, mode: str = "auto") -> None:
        self.interval_s, self.mode = interval_s, mode
        self.name, self.total = "", 0
        self.bar: tqdm | None = None
        self.started = self.last = 0.0

    def phase(self, name: str, total: int) -> None:
        self.close()
        self.name, self.total = name, total
        self.started = time.time()
        self.bar = progress.bar(self.mode, total=total, desc=f"fine-tune {name}", unit="step" if name == "train" else "it")
        self._emit(0, None, self.started)

    def step(self, done: int, loss: float | None = None) -> None:
        now = time.time()
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if done in (1, self.total) or now - self.last >= self.interval_s:
            self._emit(done, loss, now)

    def _emit(self, done: int, loss: float | None, now: float) -> None:
        elapsed = now - self.started
        eta = elapsed / done * (self.total - done) if done else None
        print(Progress(phase=self.name, done=done, total=self.total, loss=loss, elapsed_s=round(elapsed, 3),
                       eta_s=None if eta is None else round(eta, 1), at=now).line(), flush=True)
        self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def case_sample(case: AdjudicatedCase, images: ModelImages, flip: bool = False) -> dict:
    """Training sample of one adjudicated case, read as the champion reads images: image label, heatmap
    target at the click when given (built as a labelled folder's, `inference.training.labelled_folder.labelled_sample`)."""
    from inference.training.labelled_folder import labelled_sample
    from scheduler.registry import verdict_image

    prepared = verdict_image(case, images)
    present = case.nodule_present != flip
    spots = [(*case.location, None)] if present and case.location and not flip else []
    return labelled_sample(prepared, present, spots, images.input_size)


def phantom_samples(seed_indices: list[int], images: ModelImages, flip: bool = False) -> list[dict]:
    """Fresh training images of the champion's generator (train split, physical gain, positives on even
    indices) with dense targets."""
    import torch

    samples = []
    for i in seed_indices:
        s = {k: s_v for k, s_v in images.sample("train", i).items()
             if k in ("image", "heat", "lung", "log_radius", "label")}
        s.update(heat_valid=torch.tensor(1.0), lung_valid=torch.tensor(1.0), radius_valid=torch.tensor(1.0))
        if flip:
            s["label"] = 1.0 - s["label"]
            s["heat"] = torch.zeros_like(s["heat"])
            s["heat_valid"] = torch.tensor(float(s["label"] == 0))
            s["radius_valid"] = torch.tensor(0.0)
        samples.append(s)
    return samples


def fingerprint(cases: Sequence[AdjudicatedCase], phantom_indices: list[int]) -> str:
    """sha256 over the sorted SOP Instance UIDs with their verdicts (and click), and the phantom seed indices."""
    rows = sorted((c.sop_instance_uid, c.nodule_present, None if c.location is None else list(c.location)) for c in cases)
    blob = json.dumps({"cases": rows, "phantom_train_indices": sorted(phantom_indices)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _or(value, default):
    return default if value is None else value


def fine_tune(manifest: FineTuneManifest, report: Reporter) -> FineTuneResult:
    """Fine-tune, register, gate; returns what was done (`main` writes it to the manifest's result_path)."""
    import cv2
    import torch

    from scheduler import registry
    from inference.training.metrics import fit_calibration
    from inference.model import build_network, load_weights, save_weights
    from inference.model_card import Calibration, load_card, save_card, sha256_file, verify_weights
    from inference.training.samples import ModelImages
    from inference.training.train import LOSS_WEIGHTS, augment, losses, optimise_step

    t_start = time.time()
    torch.set_num_threads(manifest.threads)
    cv2.setNumThreads(1)
    settings = manifest.settings
    reg = settings.registry
    steps = _or(manifest.steps, reg.fine_tune_steps)
    batch_size = _or(manifest.batch, reg.fine_tune_batch)
    lr = _or(manifest.lr, reg.fine_tune_lr)
    flip = manifest.flip_labels
    champion_card_path = manifest.champion_card
    card = load_card(champion_card_path)
    size = card.input_size
    images = ModelImages.of(card, card_path=champion_card_path)
    torch.manual_seed(manifest.seed)
    gen = torch.Generator().manual_seed(manifest.seed)

    train_cases = [c for c in manifest.cases if not c.heldout]
    heldout_cases = [c for c in manifest.cases if c.heldout]
    n_ph = _or(manifest.phantoms, reg.fine_tune_phantoms)
    ph0 = manifest.phantom_index0
    phantom_indices = list(range(ph0, ph0 + n_ph))
    print_fp = fingerprint(train_cases, phantom_indices)

    t_data = time.time()
    report.phase("data", len(train_cases) + n_ph)
    case_set = []
    for c in train_cases:
        case_set.append(case_sample(c, images, flip))
        report.step(len(case_set))
    phantom_set = []
    for i in phantom_indices:
        phantom_set += phantom_samples([i], images, flip)
        report.step(len(case_set) + len(phantom_set))
    data_s = time.time() - t_data

    net = load_weights(build_network(card.architecture), str(verify_weights(card, champion_card_path)))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)

    client = registry.client(settings)
    exp = registry.experiment_id(client, settings)
    run = client.create_run(exp, run_name=f"fine-tune-from-{card.version}", tags={
        "data_fingerprint": print_fp, "parent_card_version": card.version,
        "parent_registry_version": manifest.champion_version, "flip_labels": str(flip).lower()})
    run_id = run.info.run_id
    work = Path(tempfile.mkdtemp(prefix="fine-tune-"))  # the version's artifacts until MLflow holds them
    try:
        client.log_batch(run_id, params=[_param(k, v) for k, v in {
            "steps": steps, "batch": batch_size, "lr": lr, "weight_decay": 1e-4, "train_cases": len(train_cases),
            "heldout_cases": len(heldout_cases), "phantoms": n_ph, "phantom_train_indices": f"{ph0}..{ph0 + n_ph - 1}",
            "phantom_gain": 1.0, "input_size": size, "torch_threads": torch.get_num_threads(),
            "batchnorm": "frozen (eval statistics)", "loss_weights": json.dumps(LOSS_WEIGHTS),
            "data_fingerprint": print_fp, "parent": f"{card.name} {card.version}", "flip_labels": flip}.items()])
        from mlflow.entities import Metric

        net.train()
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        pools = [p for p in (case_set, phantom_set) if p]
        block = max(1, steps // 10)
        sums: dict[str, float] = {}
        t_train = time.time()
        report.phase("train", steps)
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
            picks = []
            for k in range(batch_size):
                pool = pools[k % len(pools)]
                picks.append(pool[int(torch.randint(0, len(pool), (1,), generator=gen))])
            batch = {key: torch.stack([torch.as_tensor(p[key]) for p in picks]) for key in picks[0]}
            batch = augment(batch, gen)
            parts = losses(net, batch)
            loss = optimise_step(net, opt, parts)
            for name, v in {**parts, "loss": loss}.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach())
            report.step(step + 1, float(loss.detach()))
            if (step + 1) % block == 0 or step + 1 == steps:
                n = (step % block) + 1
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(f"train_{k}", v / n, now, step + 1) for k, v in sums.items()])
                sums.clear()
        train_s = time.time() - t_train
        net.eval()

        weights_tmp = work / "weights.safetensors"
        save_weights(net, str(weights_tmp))
        calibration, threshold = card.calibration, card.threshold
        n_cal = _or(manifest.calibration_phantoms, reg.calibration_phantoms)
        if n_cal:
            report.phase("calibration", n_cal)
            scores, labels = _calibration_scores(net, n_cal, images, report)
            a, b, threshold = fit_calibration(scores, labels)
            calibration = Calibration(card.calibration.method, a, b)

        mv = client.create_model_version(reg.model_name, f"{run.info.artifact_uri}/{registry.ARTIFACT_DIR}", run_id=run_id,
                                         tags={"state": "training-done", "data_fingerprint": print_fp,
                                               "verdict_watermark": str(manifest.verdict_watermark),
                                               "parent_version": manifest.champion_version})
        registry_version = str(mv.version)
        version = registry.candidate_version_name(card.version, registry_version)
        weights_name = f"{card.name}-{version}.safetensors"
        model_dir = work / registry.ARTIFACT_DIR
        model_dir.mkdir()
        os.replace(weights_tmp, model_dir / weights_name)
        for companion in card.companion_files:  # the parent's feature density and lung segmentation travel along
            shutil.copy(champion_card_path.parent / companion, model_dir / companion)
        ood = dict(card.ood)
        if ood:  # fitted on the parent's features
            ood["fitted_on"] = f"features of the parent {card.version} (not refitted after fine-tuning)"
        new_card = dataclasses.replace(
            card, version=version, weights_file=weights_name, weights_sha256=sha256_file(model_dir / weights_name),
            calibration=calibration, threshold=threshold,
            training={"fine_tuned_from": {"name": card.name, "version": card.version,
                                          "registry_version": manifest.champion_version},
                      "data_fingerprint": print_fp, "steps": steps, "batch": batch_size, "lr": lr,
                      "train_cases": len(train_cases), "phantom_train_indices": [ph0, ph0 + n_ph - 1],
                      "batchnorm": "frozen", "training_time_s": round(train_s, 1), "mlflow_run_id": run_id,
                      "calibration": f"refit on {n_cal} calibration phantoms" if n_cal else "kept from parent",
                      "parent_training": card.training},
            evaluation={}, ood=ood)
        save_card(new_card, model_dir / "card.json")
        client.log_artifacts(run_id, str(model_dir), registry.ARTIFACT_DIR)
        client.set_model_version_tag(reg.model_name, registry_version, "card_version", version)
        client.set_model_version_tag(reg.model_name, registry_version, "state", "ready")
        client.set_tag(run_id, "registry_version", registry_version)
        client.set_tag(run_id, "card_version", version)

        t_gate = time.time()
        report.phase("gate", 1)
        passed, reasons, cand, champ = registry.evaluate_gate(settings, model_dir / "card.json", champion_card_path,
                                                              heldout_cases)
        gate_s = time.time() - t_gate
        report.step(1)
        registry.record_gate(settings, registry_version, passed, reasons, cand, champ, client)
        metrics = {f"gate_candidate_{k}": v for k, v in dataclasses.asdict(cand).items()}
        metrics |= {f"gate_champion_{k}": v for k, v in dataclasses.asdict(champ).items()}
        metrics |= {"gate_passed": float(passed), "train_seconds": train_s, "data_seconds": data_s,
                    "gate_seconds": gate_s}
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, steps) for k, v in metrics.items()
                                          if isinstance(v, (int, float)) and np.isfinite(v)])
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.close()
    return FineTuneResult(run_id=run_id, registry_version=registry_version, card_version=version, gate_passed=passed,
                          gate_reasons=tuple(reasons), candidate=cand, champion=champ, data_fingerprint=print_fp,
                          train_cases=len(train_cases), heldout_cases=len(heldout_cases), phantoms=n_ph, steps=steps,
                          train_seconds=round(train_s, 2), gate_seconds=round(gate_s, 2),
                          total_seconds=round(time.time() - t_start, 2), finished_at=time.time())


def _calibration_scores(net, n: int, images: ModelImages, report: Reporter) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from inference.model import image_score, tta_views

    scores, labels = [], []
    for i in range(n):
        x = images.sample("calibration", i)["image"][None]
        with torch.inference_mode():
            s, _ = image_score(net(tta_views(x)).maps)
        scores.append(float(s.mean()))
        labels.append(i % 2 == 0)
        report.step(i + 1)
    return np.array(scores), np.array(labels)


def _param(key: str, value):
    from mlflow.entities import Param

    return Param(key, str(value)[:6000])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scheduler.fine_tune", description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path, help="the FineTuneManifest JSON file written by the retrain job")
    progress.add_option(parser)
    args = parser.parse_args(argv)
    try:
        manifest = FineTuneManifest.read(args.manifest)
    except ContractError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = fine_tune(manifest, Reporter(manifest.progress_interval_s, args.progress))
    result.write(manifest.result_path)
    print(Progress(phase="done", done=1, total=1, elapsed_s=result.total_seconds, at=time.time()).line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
