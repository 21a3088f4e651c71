"""Owns Grad-CAM: where in the image the image score comes from.

The gradient of the image score (pre-sigmoid heatmap maximum inside the lung
field) with respect to a feature map gives channel weights; the weighted sum,
ReLU'd, restricted to the predicted lung field and normalised to [0, 1], is
the map. `TARGETS` names the feature maps it can use; the decoder's last map
(stride 2) is the default because it pointed better on held-out phantoms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.model import ModelOutput, lung_region

TARGETS = ("decoder", "encoder")


def gradcam(out: ModelOutput, score: torch.Tensor, target: str = "decoder") -> torch.Tensor:
    """Grad-CAM for each image of a batch, (B, H, W) at the output maps' resolution, in [0, 1].

    `out` must come from a forward pass with gradients enabled; `score` is (B,)
    and each element depends only on its own image (eval mode), so one
    backward of the sum gives every image's gradient.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    features = out.decoder_features if target == "decoder" else out.deep_features
    (grads,) = torch.autograd.grad(score.sum(), features)
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features.float()).sum(dim=1, keepdim=True))
    size = out.maps.shape[-2:]
    if cam.shape[-2:] != size:
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    cam = cam[:, 0] * lung_region(out.maps.detach())
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (cam / peak[:, None, None]).detach()
