"""Owns training (`smartnodule train`): phantoms on the fly -> weights, calibration, card.

Dense supervision (shared/MODEL-NOTES.md): CenterNet focal loss on a Gaussian
at the nodule centre, BCE on the lung field, L1 on the log radius at the
centre, and a small BCE on the image score. Full images at the model input
size, balanced positives/negatives, a time-based curriculum stepping the
nodule gain down and the sizes from large to small, AdamW with cosine decay.
Generation runs in DataLoader workers; on a GPU a replay buffer of recent
samples (flipped and contrast-jittered anew each time) keeps the GPU busy
while the workers generate. A hard wall-clock budget ends training, then a
calibration split fits Platt scaling and the threshold, a test split is
scored, and weights (float16 safetensors), card JSON and log are written.
Progress: a line every `--log-every` seconds (stdout and OUT/train.log) and, on a
terminal or with `--progress always`, bars with ETA on stderr for the training
loop (by steps under `--max-steps`, else by the seconds of the budget) and the
scoring of each held-out split. With `--tracking-uri` (or MLFLOW_TRACKING_URI)
the run is logged to MLflow (`inference.training.tracking`).

`--data FOLDER` trains on a labelled folder in the NODE21 layout
(`inference.training.labelled_folder`: DICOM, PNG or MHA with `img_name,x,y,width,height,label`)
instead of phantoms, drawn with replacement; `--init CARD` starts from a
carded checkpoint (fine-tuning). Calibration and the test figures still come
from the held-out phantom splits, so a card trained on a folder must be
calibrated and evaluated on that site's data (`smartnodule eval --data`) before use.
"""
from __future__ import annotations

import argparse
import json
import functools
import math
import operator
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

from inference import torch_setup
from inference.training import options, phantoms, progress, tracking, variety
from inference.training.evaluate import HeldOutScores, pointing_hits, score_heldout, summarize
from inference.training.metrics import fit_calibration, json_safe
from inference.training.labelled_folder import LabelledFolder
from inference.model import (HEAD_STRIDE, HEATMAP, LUNG, RADIUS, TTA_DESCRIPTION, NoduleNet, architecture_of, build_network, image_score,
                             load_weights, save_weights)
from inference.model_card import (Calibration, ModelCard, ReviewThresholds, load_card, save_card, sha256_file,
                                  verify_file, verify_weights)
from inference.training.samples import CURRICULA, HELD_OUT_GAIN, SPLITS, ModelImages, TrainStream, worker_init

PREPROCESSING = (
    "inference.preprocess.prepare: modality LUT, VOI LUT/window, MONOCHROME1 inverted, "
    "placed in input_size x input_size (fitted, or resampled to input_mm_per_px from the pixel spacing when the "
    "card names it; inference.geometry), per-image percentile scaling (see preprocess.py)"
)


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet focal loss (alpha 2, beta 4), normalised by the number of centre pixels."""
    logits, target = logits.float(), target.float()
    pos = target >= 0.999
    log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos_loss = (log_p * (1 - p) ** 2)[pos].sum()
    neg_loss = (log_q * p**2 * (1 - target) ** 4)[~pos].sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp_min(1)


def losses(net: NoduleNet, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The four losses of a batch. A batch may say per sample which targets it has (`heat_valid`,
    `lung_valid`, `radius_valid`: fine-tuning cases have no lung mask, unlocated positives no heatmap);
    each loss is then over the samples that have its target. Phantom batches have every target."""
    maps = net(batch["image"]).maps.float()
    zero = maps.sum() * 0

    def having(key: str) -> torch.Tensor | slice:
        return batch[key] > 0 if key in batch else slice(None)

    heat_ok, lung_ok = having("heat_valid"), having("lung_valid")
    pos = batch["label"] > 0
    if "radius_valid" in batch:
        pos = pos & (batch["radius_valid"] > 0)
    peak = batch["heat"][pos][:, 0].flatten(1).argmax(dim=1)
    log_r = maps[pos][:, RADIUS].flatten(1).gather(1, peak[:, None])[:, 0]
    score, _ = image_score(maps)
    return {
        "focal": focal_loss(maps[heat_ok][:, HEATMAP], batch["heat"][heat_ok][:, 0]) if len(maps[heat_ok]) else zero,
        "lung": F.binary_cross_entropy_with_logits(maps[lung_ok][:, LUNG], batch["lung"][lung_ok][:, 0].float())
        if len(maps[lung_ok]) else zero,
        "radius": F.smooth_l1_loss(log_r, batch["log_radius"][pos]) if len(log_r) else zero,
        "image": F.binary_cross_entropy_with_logits(score, batch["label"].float()),
    }


LOSS_WEIGHTS = {"focal": 1.0, "lung": 0.5, "radius": 0.1, "image": 0.1}


def optimise_step(net: torch.nn.Module, opt: torch.optim.Optimizer, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """One optimiser step on the weighted sum of `parts` (gradients clipped at norm 5); returns that sum."""
    loss = functools.reduce(operator.add, (LOSS_WEIGHTS[k] * v for k, v in parts.items()))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
    opt.step()
    return loss


def augment(batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random horizontal flip (image and maps) and contrast/brightness jitter, on the batch's device."""
    dev = batch["image"].device
    b = batch["image"].shape[0]
    flip = torch.rand(b, generator=gen, device=dev) < 0.5
    out = dict(batch)
    for key in ("image", "heat", "lung"):
        out[key] = torch.where(flip[:, None, None, None], torch.flip(batch[key], dims=[-1]), batch[key])
    img = out["image"].float()
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    std = img.std(dim=(1, 2, 3), keepdim=True)
    a = 0.85 + 0.3 * torch.rand(b, 1, 1, 1, generator=gen, device=dev)
    c = (torch.rand(b, 1, 1, 1, generator=gen, device=dev) - 0.5) * 0.1 * std
    out["image"] = mean + a * (img - mean) + c
    return out


def crop_batch(batch: dict[str, torch.Tensor], crop: int, gen: torch.Generator,
               on_finding: float = 0.8) -> dict[str, torch.Tensor]:
    """A `crop` x `crop` window of every sample, its maps cut alike at the head stride.

    A sample with a finding gets, with probability `on_finding`, a window holding
    its first finding's peak at a random place; every other window is centred on a
    random lung pixel (anywhere when the lung target is empty). A window's label is
    whether it holds a finding's peak; its radius target counts only where the
    first peak in the window is the one the radius belongs to.
    """
    size = batch["image"].shape[-1]
    if crop % 32 or not 32 <= crop < size:
        raise ValueError(f"crop must be a multiple of 32 below the input size {size}, got {crop}")
    out, c = size // HEAD_STRIDE, crop // HEAD_STRIDE
    heat = batch["heat"][:, 0]
    first = heat.flatten(1).argmax(dim=1).tolist()
    has_peak = (heat.flatten(1).amax(dim=1) >= 0.999).tolist()
    draws = torch.rand(len(first), 3, generator=gen, device=gen.device).tolist()
    windows = []
    for i, (u, v, w) in enumerate(draws):
        if has_peak[i] and u < on_finding:
            pr, pc = divmod(first[i], out)
            r0, c0 = pr - int(v * c), pc - int(w * c)
        else:
            lung = torch.nonzero(batch["lung"][i, 0] > 0.5)
            centre = lung[int(v * len(lung))].tolist() if len(lung) else [int(v * out), int(w * out)]
            r0, c0 = centre[0] - c // 2, centre[1] - c // 2
        windows.append((min(max(r0, 0), out - c), min(max(c0, 0), out - c)))
    s = HEAD_STRIDE
    cut = {"image": torch.stack([batch["image"][i, :, r * s:(r + c) * s, q * s:(q + c) * s] for i, (r, q) in enumerate(windows)]),
           **{k: torch.stack([batch[k][i, :, r:r + c, q:q + c] for i, (r, q) in enumerate(windows)]) for k in ("heat", "lung")}}
    flat = cut["heat"][:, 0].flatten(1)
    label = flat.amax(dim=1) >= 0.999
    own = torch.tensor([(first[i] // out - r) * c + (first[i] % out - q) if r <= first[i] // out < r + c
                        and q <= first[i] % out < q + c else -1 for i, (r, q) in enumerate(windows)], device=flat.device)
    return {**cut, "log_radius": batch["log_radius"], "label": label.float(),
            "radius_valid": (label & (flat.argmax(dim=1) == own)).float()}


class Replay:
    """Ring buffer of recent samples on the training device."""

    KEYS = ("image", "heat", "lung", "log_radius", "label")

    def __init__(self, capacity: int) -> None:
        self.capacity, self.size, self.next = capacity, 0, 0
        self.store: dict[str, torch.Tensor] = {}

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        b = batch["image"].shape[0]
        if not self.store:
            self.store = {k: torch.empty((self.capacity, *batch[k].shape[1:]), dtype=torch.float16 if batch[k].dim() > 1 else torch.float32,
                                         device=batch[k].device) for k in self.KEYS}
        idx = (self.next + torch.arange(b, device=batch["image"].device)) % self.capacity
        for k in self.KEYS:
            self.store[k][idx] = batch[k].to(self.store[k].dtype)
        self.next = (self.next + b) % self.capacity
        self.size = min(self.capacity, self.size + b)

    def sample(self, b: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        dev = self.store["image"].device
        idx = torch.randint(0, self.size, (b,), generator=gen, device=dev)
        return {k: v[idx].float() for k, v in self.store.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="smartnodule train", description="Train the nodule model on synthetic phantoms.")
    options.train(p)
    return p.parse_args(argv)



class Log:
    """Progress lines to stdout (above the progress bar, if any) and to OUT/train.log."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", buffering=1)

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        progress.write(line)
        self.file.write(line + "\n")


def train(args: argparse.Namespace) -> ModelCard:
    if args.minutes <= 0:
        raise ValueError(f"minutes must be > 0, got {args.minutes!r}")
    if args.batch < 2:
        raise ValueError(f"batch must be >= 2, got {args.batch!r}")
    if args.crop is not None and args.data is not None:
        raise ValueError("crop applies to generated images, whose every target it cuts alike, not to --data folders")
    torch_setup.limit_threads(args.threads)
    device = torch_setup.select_device(args.device)
    replay = args.replay if args.replay is not None else (4 if device.type == "cuda" and args.data is None else 0)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log")
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    net = NoduleNet(args.backbone)
    if args.init is not None:
        init = load_card(args.init)
        if init.architecture["backbone"] != args.backbone:
            raise ValueError(f"init card {str(args.init)!r} is a {init.architecture['backbone']}, not --backbone {args.backbone}")
        net = load_weights(build_network(init.architecture), str(verify_weights(init, args.init)))
    net = net.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # Module.to takes memory_format at run time; torch's overloads leave it out
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    curriculum = CURRICULA[args.curriculum]
    budget = args.minutes * 60
    t0 = time.time()
    prefetch = _prefetch(args) if args.workers else None
    stream: TrainStream | LabelledFolder
    hold_out = tuple(k for k in args.hold_out.split(",") if k)
    if args.data is None:
        stream, sampler = TrainStream(args.input_size, t0, budget, curriculum, generator=args.generator,
                                      hold_out=hold_out, mm_per_px=args.mm_per_px), None
    else:
        stream = LabelledFolder(args.data, args.input_size, args.labels, args.mm_per_px)
        sampler = RandomSampler(stream, replacement=True, num_samples=10**8, generator=torch.Generator().manual_seed(0))
        log(f"training data: {len(stream)} labelled images from {args.data}")
    loader = DataLoader(stream, batch_size=args.batch, num_workers=args.workers, worker_init_fn=worker_init if args.workers else None,
                        pin_memory=device.type == "cuda", prefetch_factor=prefetch, drop_last=True, sampler=sampler)
    buffer = Replay(args.buffer) if replay else None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    processor = torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'
    log(f"training {args.backbone} on {device} ({processor}), "
        f"budget {args.minutes} min, batch {args.batch}, workers {args.workers} (prefetch {prefetch}), replay {replay}")
    step = fresh = 0
    sums: dict[str, float] = {}
    last_log = time.time()
    net.train()
    # by steps when they are capped, else by the seconds of the time budget (the ETA is then the budget's end)
    by_steps = args.max_steps is not None
    bar = progress.bar(args.progress, total=args.max_steps if by_steps else round(budget), desc="training",
                       unit="step" if by_steps else "s")

    def optimise(batch: dict[str, torch.Tensor], frac: float) -> None:
        nonlocal step
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (frac + 1e-3) / 0.03) * 0.5 * (1 + math.cos(math.pi * frac))
        if args.crop is not None:
            batch = crop_batch(batch, args.crop, gen)
        batch = augment(batch, gen)
        if device.type == "cuda":
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
        with amp:
            parts = losses(net, batch)
        optimise_step(net, opt, parts)
        step += 1
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        sums["n"] = sums.get("n", 0) + 1

    for batch in loader:
        frac = (time.time() - t0) / budget
        if frac >= 1.0 or (args.max_steps is not None and step >= args.max_steps):
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        fresh += batch["image"].shape[0]
        if buffer is not None:
            buffer.add(batch)
        optimise(batch, frac)
        if buffer is not None and buffer.size >= 4 * args.batch:
            for _ in range(replay):
                optimise(buffer.sample(args.batch, gen), (time.time() - t0) / budget)
        bar.update((min(step, args.max_steps) if by_steps else min(round(time.time() - t0), round(budget))) - bar.n)
        bar.set_postfix(step=step, loss=f"{sum(LOSS_WEIGHTS[k] * sums[k] for k in LOSS_WEIGHTS) / sums['n']:.4f}",
                        refresh=False)
        if time.time() - last_log >= args.log_every:
            el = time.time() - t0
            gain, dmin = curriculum.at(frac)
            parts = " ".join(f"{k} {sums[k] / sums['n']:.4f}" for k in LOSS_WEIGHTS)
            log(f"{el:6.0f}s {100 * frac:5.1f}% step {step} fresh {fresh} ({fresh / el:.1f} img/s) gain {gain} dmin {dmin} "
                f"lr {opt.param_groups[0]['lr']:.2e} | {parts}")
            sums.clear()
            last_log = time.time()
    train_s = time.time() - t0
    bar.close()
    del loader
    log(f"training ended after {train_s:.0f} s, {step} steps, {fresh} fresh images")
    net.eval()
    net = net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # as above

    t1 = time.time()
    images = (ModelImages(args.generator, args.input_size, args.mm_per_px, hold_out) if args.data is None
              else ModelImages("phantom", args.input_size, args.mm_per_px))
    cal = score_heldout(net, images, "calibration", args.calib_n, device, args.workers, progress_mode=args.progress)
    a, b, threshold = fit_calibration(cal.view_scores.mean(axis=1), cal.labels)
    review = ReviewThresholds(margin=0.1, max_uncertainty=0.15)
    cal_figs = summarize(cal, a, b, threshold, **review)
    location_source = "gradcam" if cal_figs["pointing_gradcam"] > cal_figs["pointing_heatmap"] else "heatmap"
    n_cmp = min(200, args.calib_n)
    first = HeldOutScores(**{k: v[:n_cmp] for k, v in vars(cal).items()})
    cam_compare: dict = {"n": n_cmp, "head": float(pointing_hits(first.gradcam_rc, first).mean())}
    for target in ("decoder", "encoder"):
        other = score_heldout(net, images, "calibration", n_cmp, device, args.workers, cam_target=target,
                              progress_mode=args.progress)
        cam_compare[target] = float(pointing_hits(other.gradcam_rc, other).mean())
    log(f"calibration: platt a={a:.4f} b={b:.4f} threshold {threshold:.4f} auc {cal_figs['auc']:.4f} "
        f"pointing heatmap {cal_figs['pointing_heatmap']:.3f} gradcam {cal_figs['pointing_gradcam']:.3f} -> {location_source}; "
        f"Grad-CAM target pointing {cam_compare}")
    test = score_heldout(net, images, "test", args.test_n, device, args.workers, progress_mode=args.progress)
    figs = summarize(test, a, b, threshold, **review)
    figs["test_seeds"] = [SPLITS["test"], SPLITS["test"] + args.test_n - 1]
    log(f"test: {json.dumps(json_safe(figs), sort_keys=True)}")
    log(f"calibration + test scoring took {time.time() - t1:.0f} s")

    weights_name = f"{args.name}-{args.version}.safetensors"
    save_weights(net, str(args.out / weights_name))
    lung_segmentation: dict = {}
    if args.init is not None and init.lung_segmentation:  # the lung fields do not depend on the detector's weights
        source = verify_file(args.init, init.lung_segmentation, "lung_segmentation")
        shutil.copy(source, args.out / source.name)
        lung_segmentation = dict(init.lung_segmentation)
    # the init card's OOD density is not carried: it was fitted on other weights' features (inference.training.ood_fit)
    card = ModelCard(
        name=args.name,
        version=args.version,
        weights_file=weights_name,
        weights_sha256=sha256_file(args.out / weights_name),
        architecture=architecture_of(net),
        input_size=args.input_size,
        input_mm_per_px=args.mm_per_px,
        preprocessing=PREPROCESSING,
        threshold=threshold,
        calibration=Calibration("platt on mean TTA image score (max heatmap logit in lung field)", a, b),
        review=review,
        tta=TTA_DESCRIPTION,
        location_source=location_source,
        training={
            "generator": _generator_version(args.generator, args.hold_out),
            "train_seeds": f"{SPLITS['train']} + i, i < {fresh} (positives on even i, generated at {args.input_size} px)"
            if args.data is None else None,
            "data": None if args.data is None else f"labelled folder {args.data.name} ({len(stream)} images)",
            "init": None if args.init is None else f"{init.name} {init.version} ({init.weights_sha256[:16]})",
            "calibration_seeds": [SPLITS["calibration"], SPLITS["calibration"] + args.calib_n - 1],
            "held_out_generator": _generator_version(args.generator if args.data is None else "phantom", args.hold_out),
            "held_out_gain": HELD_OUT_GAIN,
            "curriculum": curriculum.describe(),
            "steps": step,
            "fresh_images": fresh,
            "replay_steps_per_fresh_batch": replay,
            "batch": args.batch,
            "crop": None if args.crop is None else f"{args.crop} px windows, 80 % of those of positives on the finding, "
                                                    f"the others centred on a lung pixel (inference.training.train.crop_batch)",
            "optimizer": f"AdamW lr {args.lr} wd {args.weight_decay}, 3% warm-up, cosine over the time budget",
            "loss_weights": LOSS_WEIGHTS,
            "training_time_s": round(train_s, 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__,
            "calibration_figures": {k: cal_figs[k] for k in ("auc", "ece", "pointing_heatmap", "pointing_gradcam")},
            "gradcam_target_pointing": cam_compare,
        },
        evaluation=json_safe(figs),
        lung_segmentation=lung_segmentation,
    )
    save_card(card, args.out / "card.json")
    log(f"wrote {args.out / weights_name} and {args.out / 'card.json'}")
    uri = tracking.tracking_uri(args.tracking_uri)
    if uri is not None:
        run_id = tracking.log_run(uri, args.experiment, f"{card.name}-{card.version}", vars(args), card.evaluation,
                                  folder=args.out)
        log(f"logged to MLflow: run {run_id} in experiment {args.experiment!r} at {uri}")
    return card


def _prefetch(args: argparse.Namespace) -> int:
    """Batches each worker keeps ready: up to 4, fewer when /dev/shm cannot hold them."""
    batch_bytes = args.batch * args.input_size**2 * 4 * 1.4
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return 2
    return int(max(1, min(4, free // (2 * batch_bytes * args.workers))))


def _generator_version(generator: str = "phantom", hold_out: str = "") -> str:
    """The generator's identity: its module files' sha256 (it has no version constant)."""
    base = f"inference/training/phantoms.py sha256 {sha256_file(phantoms.__file__)[:16]}"
    if generator != "varied":
        return base
    return f"{base}; varied: {variety.fingerprint()}" + (f"; held out: {hold_out}" if hold_out else "")


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
