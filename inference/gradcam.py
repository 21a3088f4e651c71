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

from inference.model import ModelOutput, NoduleNet, image_score, lung_region

TARGETS = {"head": "head_features", "decoder": "decoder_features", "encoder": "deep_features",
           "encoder8": "mid_features"}
METHODS = ("gradcam", "hirescam")


def gradcam(out: ModelOutput, score: torch.Tensor, target: str = "head", method: str = "gradcam") -> torch.Tensor:
    """Grad-CAM for each image of a batch, (B, H, W) at the output maps' resolution, in [0, 1].

    `out` must come from a forward pass with gradients enabled; `score` is (B,)
    and each element depends only on its own image (eval mode), so one
    backward of the sum gives every image's gradient. `method` "gradcam"
    weighs each channel by its spatially averaged gradient (Selvaraju et al.);
    "hirescam" multiplies gradient and activation element-wise before the sum
    over channels (Draelos and Carin 2020), which keeps where the evidence is.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {tuple(TARGETS)}, got {target!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    features = getattr(out, TARGETS[target])
    (grads,) = torch.autograd.grad(score.sum(), features)
    weights = grads.float().mean(dim=(2, 3), keepdim=True) if method == "gradcam" else grads.float()
    cam = F.relu((weights * features.float()).sum(dim=1, keepdim=True))
    size = out.maps.shape[-2:]
    if cam.shape[-2:] != size:
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    cam = cam[:, 0] * lung_region(out.maps.detach())
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (cam / peak[:, None, None]).detach()


def explained_forward(net: NoduleNet, x: torch.Tensor, n_explain: int, target: str = "head", method: str = "gradcam"
                      ) -> tuple[ModelOutput, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward `x`, image scores and argmax indices of every image, Grad-CAM of the first `n_explain`.

    The network runs once without autograd; only the part after the target map
    is re-run with it, for the explained images only: the last convolution for
    the head target (Grad-CAM costs next to nothing); for the stride-8 encoder
    target the encoder stage that makes the stride-16 map, the decoder and the
    head (most of the cost is the stride-2 decoder; bench/inference.py measures it).
    The decoder and deepest-encoder targets re-run the whole network.
    """
    if target in ("head", "encoder8"):
        with torch.no_grad():
            plain = net(x)
        if target == "head":
            hidden = plain.head_features[:n_explain].detach().requires_grad_(True)
            with torch.enable_grad():
                part = ModelOutput(net.head_output(hidden), hidden, plain.decoder_features[:n_explain],
                                   plain.deep_features[:n_explain], plain.mid_features[:n_explain])
        else:
            f2, f4 = (f[:n_explain].detach() for f in plain.fine_features)
            f8 = plain.mid_features[:n_explain].detach().requires_grad_(True)
            with torch.enable_grad():
                part = net.from_stride8(f2, f4, f8)
        with torch.enable_grad():
            cam = gradcam(part, image_score(part.maps)[0], target, method)
        scores, idx = image_score(plain.maps)
        return plain, scores, idx, cam
    with torch.enable_grad():
        out = net(x.detach().requires_grad_(True))
        scores, idx = image_score(out.maps)
        cam = gradcam(out, scores[:n_explain], target, method)
    return out, scores.detach(), idx, cam[:n_explain]
