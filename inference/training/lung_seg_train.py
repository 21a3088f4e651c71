"""Owns training the lung-field segmentation (`inference.lung_seg.LungNet`) on the training generator.

Images and targets come from the training generators only (train split seeds), never
from the evaluation family: with `--generator phantom` (the default) from
`inference.training.phantoms` (`Phantom.lung_field`: the whole projected lung, the lung
behind the heart included); with `--generator mixed` every odd pool index is instead a
varied radiograph of the same seed (`inference.training.variety.generate_varied`, whose
`lung_mask` is the whole lung too, behind the heart and in the recesses below the
domes, letterboxed with the image). A pool is generated once at
`SEG_SIZE` (about 30 ms each; a third with a nodule of 5-30 mm, a sixth with a
mass of 30-60 mm, at gain 1-2.5, so opacities inside the lung stay lung), and every
step draws a batch from it with fresh augmentation for the variety the generator
lacks: rotation, scale, shear and a smooth elastic warp; horizontal flip; a
portrait field letterboxed with black bands; tone (gamma, contrast), blur,
unsharp masking and noise; collimation borders (blanked or unexposed); burned-in
text, side markers, wires and lead rings. Each augmented image is normalised the
way `inference.preprocess.prepare_array` normalises a served one. Loss: binary
cross-entropy plus soft Dice. AdamW, cosine learning rate over the step budget.

A checkpoint (weights, optimiser, step) is written every `--checkpoint-every`
steps and at the end; `--resume` continues from it. The shipped weights are
float16 safetensors. `--init WEIGHTS` starts from shipped weights (fine-tuning) instead
of a random initialisation. Run on CPU with one thread; the shipped weights (1.1.0) are
the 700-step default-generator run (1.0.0) fine-tuned on the mixed pool:

    nice -n 19 python -m inference.training.lung_seg_train --out OUT0 --steps 700 --threads 1 \
        --weights-name lung-fields-1.0.0.safetensors
    nice -n 19 python -m inference.training.lung_seg_train --out OUT --generator mixed \
        --init OUT0/lung-fields-1.0.0.safetensors --steps 500 --lr 1e-3 --checkpoint-every 25 --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from inference.lung_seg import SEG_SIZE, LungNet
from inference.model import load_weights, save_weights
from inference.model_card import sha256_file
from inference.geometry import letterbox
from inference.preprocess import prepare_array
from inference.training.phantoms import Phantom, generate_phantom
from inference.training.samples import phantom_model_input, seed_of
from inference.training.variety import generate_varied

GENERATORS = ("phantom", "mixed")

TEXTS = ("PORTABLE", "AP", "SUPINE", "ERECT", "R", "L", "12:04", "CR 3")


def _letterboxed(mask: np.ndarray, size: int) -> np.ndarray:
    """A source-geometry mask placed as `prepare_array` places its image (uint8, size x size)."""
    lb = letterbox(mask.shape, size)
    return lb.pad(lb.resize(mask.astype(np.uint8), cv2.INTER_NEAREST))


def pool_sample(index: int, size: int = SEG_SIZE, generator: str = "phantom") -> tuple[np.ndarray, np.ndarray]:
    """Model input (float32 in [0, 1]) and whole-lung target (uint8) of train-split sample `index`:
    a default phantom, or with `generator` "mixed" on odd indices a varied radiograph."""
    seed = seed_of("train", index)
    if generator == "mixed" and index % 2 == 1:
        ph: Phantom = generate_varied(seed, size)  # findings on half the seeds, masses among them
        whole = ph.lung_mask
    else:
        rng = np.random.default_rng([index, 0x1A46])
        kind = rng.random()
        nodule, diameter = (False, None) if kind < 0.5 else (True, None) if kind < 0.83 else \
            (True, float(rng.uniform(30.0, 60.0)))
        ph = generate_phantom(seed, size, nodule=nodule, gain=float(rng.uniform(1.0, 2.5)), diameter_mm=diameter)
        if ph.lung_field is None:
            raise ValueError(f"phantom {ph.seed} has no lung_field")
        whole = ph.lung_field
    image, _ = phantom_model_input(ph, size)
    return image, _letterboxed(whole, size)


def _geometry(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    angle = rng.uniform(-15.0, 15.0)
    scale = rng.uniform(0.75, 1.2)
    m = np.asarray(cv2.getRotationMatrix2D((size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size),
                                angle, scale), dtype=np.float64)
    m[0, :2] *= rng.uniform(0.85, 1.12)  # anisotropic: narrow or wide chests
    m[:, :2] += rng.uniform(-0.06, 0.06, (2, 2))  # shear
    m[:, 2] += rng.uniform(-0.08, 0.08, 2) * size
    # smooth elastic warp: a coarse random displacement field
    coarse = rng.normal(0.0, size * 0.02, (2, 5, 5)).astype(np.float32)
    dx, dy = (cv2.resize(c, (size, size), interpolation=cv2.INTER_CUBIC) for c in coarse)
    inv = cv2.invertAffineTransform(m)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    map_x = (inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2] + dx).astype(np.float32)
    map_y = (inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2] + dy).astype(np.float32)
    image = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderValue=0.0)
    mask = cv2.remap(mask, map_x, map_y, cv2.INTER_NEAREST, borderValue=0)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def _tone(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    x = np.clip(image, 0.0, 1.0) ** rng.uniform(0.5, 2.0)
    x = (x - 0.5) * rng.uniform(0.6, 1.4) + 0.5 + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.5:
        blur = cv2.GaussianBlur(x, (0, 0), rng.uniform(3.0, 15.0))
        x = x + rng.uniform(-0.3, 1.0) * (x - blur)  # unsharp masking or its opposite
    if rng.random() < 0.4:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 2.0))
    return x + rng.normal(0.0, rng.uniform(0.0, 0.06), x.shape).astype(np.float32)


def _clutter(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Collimation, letterbox bands, burned-in text, markers, wires and lead rings (float32, display scale)."""
    size = image.shape[0]
    ink = np.zeros((size, size), np.uint8)  # drawn at full strength, then laid over the image (bright = dense)
    for _ in range(int(rng.integers(0, 4))):  # wires and ECG lead rings
        pts = np.cumsum(rng.normal(0, size * 0.08, (6, 2)), axis=0) + rng.uniform(0, size, 2)
        cv2.polylines(ink, [pts.astype(np.int32)], False, 255, 1, cv2.LINE_AA)
        cv2.circle(ink, tuple(int(v) for v in pts[0]), int(rng.integers(2, 5)), 255, 1, cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 3))):
        text = TEXTS[int(rng.integers(len(TEXTS)))]
        origin = (int(rng.uniform(0.02, 0.7) * size), int(rng.choice([rng.uniform(0.05, 0.25), rng.uniform(0.85, 0.97)]) * size))
        cv2.putText(ink, text, origin, cv2.FONT_HERSHEY_SIMPLEX, rng.uniform(0.3, 0.8), 255, 1, cv2.LINE_AA)
    x = np.maximum(image, ink.astype(np.float32) / 255.0 * np.float32(rng.uniform(0.7, 1.0)))
    if rng.random() < 0.5:  # collimation: outside a slightly rotated box unexposed (bright) or blanked
        keep = np.zeros((size, size), np.uint8)
        box = cv2.boxPoints(((size / 2 + rng.uniform(-0.05, 0.05) * size, size / 2 + rng.uniform(-0.05, 0.05) * size),
                             (size * rng.uniform(0.75, 0.98), size * rng.uniform(0.75, 0.98)), rng.uniform(-4.0, 4.0)))
        cv2.fillPoly(keep, [np.round(box).astype(np.int32)], 1)
        x = np.where(keep > 0, x, np.float32(rng.uniform(0.85, 1.0) if rng.random() < 0.6 else 0.0))
    if rng.random() < 0.4:  # a portrait field letterboxed into the square: black bands left and right
        band = int(rng.uniform(0.0, 0.09) * size)
        x[:, :band] = 0.0
        x[:, size - band:] = 0.0
    return x.astype(np.float32)


def augment(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One augmented (input, target) pair, the input normalised as `prepare_array` normalises a served image."""
    image, mask = _geometry(rng, image, mask)
    x = _clutter(rng, _tone(rng, image))
    return prepare_array(np.clip(x, 0.0, 1.0), letterbox(x.shape, image.shape[0])), mask


def dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per image of (B,1,H,W) logits against a 0/1 target."""
    pred = (logits > 0).float()
    inter = (pred * target).flatten(1).sum(1)
    return 2 * inter / (pred.flatten(1).sum(1) + target.flatten(1).sum(1)).clamp_min(1.0)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    soft = 1 - (2 * (p * target).flatten(1).sum(1) + 1) / (p.flatten(1).sum(1) + target.flatten(1).sum(1) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + soft.mean()


def train(args: argparse.Namespace, net: LungNet, opt: torch.optim.Optimizer, sched, step: int, last: int,
          ckpt_path: Path) -> int:
    """Steps `step` ... `last` on a pool generated once, a checkpoint every `args.checkpoint_every` steps."""
    t0 = time.perf_counter()
    pool = [pool_sample(i, generator=args.generator) for i in range(args.pool)]
    val = [pool_sample(i, generator=args.generator) for i in range(args.pool, args.pool + args.val)]  # unseen seeds
    print(f"pool of {args.pool} + {args.val} phantoms in {time.perf_counter() - t0:.0f} s", flush=True)
    vx = torch.from_numpy(np.stack([v[0] for v in val]))[:, None]
    vy = torch.from_numpy(np.stack([v[1] for v in val]).astype(np.float32))[:, None]
    t_train, running = time.perf_counter(), []
    while step < last:
        rng = np.random.default_rng([step, 0x5E6])
        pairs = [augment(rng, *pool[int(k)]) for k in rng.integers(0, len(pool), args.batch)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))[:, None]
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32))[:, None]
        net.train()
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        running.append(float(loss.detach()))
        if step % args.checkpoint_every == 0 or step == last:
            net.eval()
            with torch.no_grad():
                d = dice(net(vx), vy)
            print(f"step {step}: loss {np.mean(running):.4f}, val Dice (training family) mean {float(d.mean()):.4f}, "
                  f"{time.perf_counter() - t_train:.0f} s", flush=True)
            running = []
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step},
                       ckpt_path)
    return step


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "lung_seg.ckpt"
    t0 = time.perf_counter()
    net = LungNet() if args.init is None else load_weights(LungNet(), str(args.init))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1.0))))
    step = 0
    if args.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=True)
        net.load_state_dict(state["net"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        step = int(state["step"])
        print(f"resumed at step {step}", flush=True)
    last = min(args.steps, args.stop_after or args.steps)
    if step < last:
        step = train(args, net, opt, sched, step, last, ckpt_path)
    weights = args.out / args.weights_name
    save_weights(net.eval(), str(weights))
    print(json.dumps({"weights": str(weights), "sha256": sha256_file(weights), "bytes": weights.stat().st_size,
                      "steps": step, "batch": args.batch, "pool": args.pool,
                      "parameters": sum(p.numel() for p in net.parameters()),
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m inference.training.lung_seg_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the checkpoint and the weights")
    p.add_argument("--generator", choices=GENERATORS, default="phantom",
                   help="phantom: default phantoms only; mixed: half of the pool varied radiographs")
    p.add_argument("--init", type=Path, default=None, help="start from these weights (safetensors) instead of random")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pool", type=int, default=1500, help="train-split phantoms generated once")
    p.add_argument("--val", type=int, default=32, help="further train-split phantoms for the progress Dice")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from OUT/lung_seg.ckpt")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this step, the learning-rate schedule still that of --steps (with --resume from "
                        "a checkpoint of that step: only write its weights)")
    p.add_argument("--weights-name", default="lung-fields-1.1.0.safetensors")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "pool", "val", "threads", "checkpoint_every") + (("stop_after",) if args.stop_after is not None else ()):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.init is not None and not args.init.is_file():
        print(f"error: --init {args.init} is not a file", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
