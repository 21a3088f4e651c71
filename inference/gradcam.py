"""Owns Grad-CAM and HiResCAM: where in the image the image score comes from.

The gradient of the image score (pre-sigmoid heatmap maximum inside the lung
field) with respect to a feature map, times the map (channel-averaged gradient
weights for Grad-CAM, element-wise for HiResCAM), summed over channels,
ReLU'd, restricted to the predicted lung field and normalised to [0, 1], is
the map. `TARGETS` names the feature maps it can use. The head's hidden map
(the input of the last 1x1 convolution) only reproduces the detection heatmap
(max difference 6e-8, issue #17), so the node explains on an encoder stage
(`inference.predictor.EXPLAIN_TARGET`). Pointing (peak within the nodule
radius + 3 mm), shipped model, calibration phantoms: Grad-CAM on the stride-8
stage 1 of 40 positives (indices 500-579), on the stride-16 stage 5 of 30;
HiResCAM on the stride-8 stage 25 of 30, on the stride-16 stage 20 of 30
(positives of indices 500-559).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.model import HEATMAP, ModelOutput, NoduleNet, image_score, restricted

TARGETS = {"head": "head_features", "decoder": "decoder_features", "encoder": "deep_features",
           "encoder8": "mid_features"}
METHODS = ("gradcam", "hirescam")


CROP_MARGIN8 = 12  # stride-8 px around the peak the explanation's backward pass sees (its support is about 8)


def _cam(features: torch.Tensor, grads: torch.Tensor, size: torch.Size, method: str, region: torch.Tensor
         ) -> torch.Tensor:
    """Grad-CAM or HiResCAM of features and their gradients, at `size`, inside `region`, in [0, 1] (B,H,W)."""
    weights = grads.float().mean(dim=(2, 3), keepdim=True) if method == "gradcam" else grads.float()
    cam = F.relu((weights * features.float()).sum(dim=1, keepdim=True))
    if cam.shape[-2:] != size:
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    cam = cam[:, 0] * region
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (cam / peak[:, None, None]).detach()


def _check(target: str, method: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target must be one of {tuple(TARGETS)}, got {target!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _region(maps: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """The (B,H,W) bool region of the image score at the maps' size (`inference.model.restricted`)."""
    return torch.isfinite(restricted(maps.detach(), region))


def gradcam(out: ModelOutput, score: torch.Tensor, target: str = "head", method: str = "gradcam",
            region: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM for the first len(score) images of a batch, (len(score), H, W) at the output maps' resolution, in [0, 1].

    `out` must come from a forward pass with gradients enabled; `score` is (n,), n <= B,
    and each element depends only on its own image (eval mode), so one
    backward of the sum gives every image's gradient. `method` "gradcam"
    weighs each channel by its spatially averaged gradient (Selvaraju et al.);
    "hirescam" multiplies gradient and activation element-wise before the sum
    over channels (Draelos and Carin 2020), which keeps where the evidence is.
    The map is zero outside `region` (as in `inference.model.image_score`).
    """
    _check(target, method)
    features = getattr(out, TARGETS[target])
    (grads,) = torch.autograd.grad(score.sum(), features)
    n = len(score)  # the scored images are the batch's first n; the rest have no gradient and no map
    return _cam(features[:n], grads[:n], out.maps.shape[-2:], method, _region(out.maps, region)[:n])


def _crop_grads8(net: NoduleNet, plain: ModelOutput, i: int, peak: int) -> torch.Tensor:
    """Gradient of image i's heatmap logit at flat map index `peak` w.r.t. its stride-8 features (1,C,H8,W8).

    The logit depends on the stride-8 features within about 8 px of the peak (the decoder's and the last
    encoder stage's receptive field), so the rest of the network is re-run on a crop of CROP_MARGIN8 px
    around it, aligned to the stride-16 grid; outside the crop the gradient is exactly zero, and inside it
    equals the full pass's (the crop's padded borders lie outside the peak's receptive field). The crop has
    the same size wherever the peak lies (shifted inward at the image border), so the CPU kernels' set-up
    is not paid again for every new shape.
    """
    f2, f4, f8 = plain.fine_features[0][i:i + 1], plain.fine_features[1][i:i + 1], plain.mid_features[i:i + 1]
    h8, w8 = f8.shape[-2:]
    w = plain.maps.shape[-1]
    s = f2.shape[-1] // w8  # map px per stride-8 px
    r8, c8 = (peak // w) // s, (peak % w) // s
    side = 2 * CROP_MARGIN8 + 2  # one crop shape for every peak: the CPU kernels are set up once

    def span(centre: int, length: int) -> tuple[int, int]:
        start = min(max(0, (centre - CROP_MARGIN8) // 2 * 2), max(0, (length - side) // 2 * 2))
        return start, min(length, start + side)

    (r0, r1), (c0, c1) = span(r8, h8), span(c8, w8)
    def dense(t: torch.Tensor) -> torch.Tensor:  # a slice is strided: a dense copy takes the fast kernels
        return t.detach().contiguous(memory_format=torch.channels_last)

    crop8 = dense(f8[..., r0:r1, c0:c1]).requires_grad_(True)
    with torch.enable_grad():
        part = net.from_stride8(dense(f2[..., s * r0:s * r1, s * c0:s * c1]),
                                dense(f4[..., 2 * r0:2 * r1, 2 * c0:2 * c1]), crop8)
        logit = part.maps[0, HEATMAP, peak // w - s * r0, peak % w - s * c0]
        (g,) = torch.autograd.grad(logit, crop8)
    grads = torch.zeros_like(f8)
    grads[..., r0:r1, c0:c1] = g
    return grads


def explained_forward(net: NoduleNet, x: torch.Tensor, n_explain: int, target: str = "head", method: str = "gradcam",
                      region: torch.Tensor | None = None) -> tuple[ModelOutput, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward `x`, image scores and argmax indices of every image, Grad-CAM of the first `n_explain`.

    `region` (B,H,W bool, every image of `x`) is where the image score may lie (None: the network's own
    lung field). The network runs once without autograd; only the part after the target map is re-run
    with it, for the explained images only: the last convolution for the head target (next to nothing);
    for the stride-8 encoder target the last encoder stage, the decoder and the head on a crop around
    each explained image's peak (`_crop_grads8`; bench/inference.py measures it). The decoder and
    deepest-encoder targets re-run the whole network.
    """
    _check(target, method)
    if target in ("head", "encoder8"):
        with torch.no_grad():
            plain = net(x)
            logits = restricted(plain.maps, region)
        scores, idx = logits.flatten(1).max(dim=1)
        inside = torch.isfinite(logits[:n_explain])
        if target == "head":
            hidden = plain.head_features[:n_explain].detach().requires_grad_(True)
            with torch.enable_grad():
                score = image_score(net.head_output(hidden), None if region is None else region[:n_explain])[0]
                (grads,) = torch.autograd.grad(score.sum(), hidden)
            cam = _cam(hidden, grads, plain.maps.shape[-2:], method, inside)
        else:
            grads = torch.cat([_crop_grads8(net, plain, i, int(idx[i])) for i in range(n_explain)])
            cam = _cam(plain.mid_features[:n_explain], grads, plain.maps.shape[-2:], method, inside)
        return plain, scores, idx, cam
    with torch.enable_grad():
        out = net(x.detach().requires_grad_(True))
        scores, idx = image_score(out.maps, region)
        cam = gradcam(out, scores[:n_explain], target, method, region)
    return out, scores.detach(), idx, cam[:n_explain]
