"""Owns the network: a timm encoder, an FPN-lite decoder and the three output maps.

Output maps at stride 2 of the model input: channel 0 nodule-centre heatmap
logits, channel 1 lung-field logits, channel 2 log nodule radius (heatmap px).
The image score is the heatmap's maximum logit inside a lung region (the lung
segmentation's grown field, `inference.lung_seg`, or the network's own dilated
lung channel); it is what calibration and Grad-CAM work on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from inference import torch_setup  # noqa: F401  (must precede timm)

import numpy as np
import timm
from timm.models import FeatureListNet
import torch
import torch.nn.functional as F
from torch import nn

HEATMAP, LUNG, RADIUS = 0, 1, 2
OUT_CHANNELS = 3
HEAD_STRIDE = 2


def heatmap_coord(model_px: float) -> float:
    """Model-input pixel coordinate -> output-map pixel coordinate (pixel centres)."""
    return (model_px - (HEAD_STRIDE - 1) / 2) / HEAD_STRIDE


def model_coord(heatmap_px: float | np.ndarray) -> float | np.ndarray:
    return heatmap_px * HEAD_STRIDE + (HEAD_STRIDE - 1) / 2


LUNG_DILATION_PX = 9  # heatmap px the predicted lung field is grown by before scoring


@dataclass(frozen=True)
class ModelOutput:
    """Maps (B,3,H/2,W/2), the head's hidden features, the decoder's last map, the encoder's stride-8 and
    deepest (stride-16) features."""

    maps: torch.Tensor
    head_features: torch.Tensor
    decoder_features: torch.Tensor
    deep_features: torch.Tensor
    mid_features: torch.Tensor
    fine_features: tuple[torch.Tensor, ...] = ()  # the encoder's stride-2 and stride-4 maps


def _conv_bn(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class NoduleNet(nn.Module):
    """timm encoder (strides 2/4/8/16) + FPN-lite decoder to stride-2 maps."""

    def __init__(self, backbone: str = "resnet18", width: int = 64, fine_width: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        encoder = timm.create_model(backbone, features_only=True, in_chans=1, pretrained=False, out_indices=(0, 1, 2, 3))
        if not isinstance(encoder, FeatureListNet):
            raise ValueError(f"backbone {backbone!r} gives no feature list ({type(encoder).__name__})")
        self.encoder = encoder
        reductions = self.encoder.feature_info.reduction()
        if reductions != [2, 4, 8, 16]:
            raise ValueError(f"backbone {backbone!r} gives strides {reductions}, need [2, 4, 8, 16]")
        c2, c4, c8, c16 = self.encoder.feature_info.channels()
        self.lat16 = nn.Conv2d(c16, width, 1)
        self.lat8 = nn.Conv2d(c8, width, 1)
        self.lat4 = nn.Conv2d(c4, width, 1)
        self.smooth4 = _conv_bn(width, width)
        self.reduce4 = nn.Conv2d(width, fine_width, 1)
        self.lat2 = nn.Conv2d(c2, fine_width, 1)
        self.smooth2 = _conv_bn(fine_width, fine_width)
        last = nn.Conv2d(fine_width, OUT_CHANNELS, 1)
        prior = torch.zeros(OUT_CHANNELS)
        prior[HEATMAP] = -2.19  # CenterNet prior: p ~ 0.1 everywhere at start
        last.bias = nn.Parameter(prior)
        self.head = nn.Sequential(_conv_bn(fine_width, fine_width), last)
        self.embedding_dim = c16

    def forward(self, x: torch.Tensor) -> ModelOutput:
        f2, f4, f8, f16 = self.encoder(x)
        return self.decode(f2, f4, f8, f16)

    def from_stride8(self, f2: torch.Tensor, f4: torch.Tensor, f8: torch.Tensor) -> ModelOutput:
        """The rest of the forward pass from the encoder's stride-8 features (for an explanation there)."""
        names = list(self.encoder.keys())
        stages = self.encoder.feature_info.module_name()
        f16 = f8
        for name in names[names.index(stages[2]) + 1:names.index(stages[3]) + 1]:
            f16 = self.encoder[name](f16)
        return self.decode(f2, f4, f8, f16)

    def decode(self, f2: torch.Tensor, f4: torch.Tensor, f8: torch.Tensor, f16: torch.Tensor) -> ModelOutput:
        """Decoder and head from the four encoder feature maps."""
        p = self.lat16(f16)
        p = self.lat8(f8) + F.interpolate(p, size=f8.shape[-2:], mode="nearest")
        p = self.lat4(f4) + F.interpolate(p, size=f4.shape[-2:], mode="nearest")
        p = self.reduce4(self.smooth4(p))
        p = self.lat2(f2) + F.interpolate(p, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        dec = self.smooth2(p)
        hidden = self.head[0](dec)
        return ModelOutput(self.head_output(hidden), hidden, dec, f16, f8, (f2, f4))

    def head_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output maps from the head's hidden features (the last, 1x1, convolution)."""
        return self.head[1](hidden)


def embed(deep_features: torch.Tensor) -> torch.Tensor:
    """Global-average-pooled deepest features, L2-normalised (B, C) float32."""
    return F.normalize(deep_features.float().mean(dim=(2, 3)), dim=1)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(B,H,W) bool mask grown by `radius` px in a square, as two 1-D max-pools (the same as one 2-D pool,
    2k instead of k^2 comparisons a pixel)."""
    m = mask.float().unsqueeze(1)
    if radius > 0:
        m = F.max_pool2d(m, (2 * radius + 1, 1), stride=1, padding=(radius, 0))
        m = F.max_pool2d(m, (1, 2 * radius + 1), stride=1, padding=(0, radius))
    return m[:, 0] > 0


def lung_region(maps: torch.Tensor) -> torch.Tensor:
    """Predicted lung field grown by LUNG_DILATION_PX; whole image where none is predicted (B,H,W bool)."""
    grown = dilate(maps[:, LUNG] > 0, LUNG_DILATION_PX)
    empty = ~grown.flatten(1).any(dim=1)
    return grown | empty[:, None, None]


def restricted(maps: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Heatmap logits (B,H,W) with everything outside `region` at -inf (no finding can lie there).

    `region` is (B,h,w) bool at any size (nearest-resized to the maps); None takes the
    network's own lung field (`lung_region`).
    """
    if region is None:
        region = lung_region(maps)
    elif region.shape[-2:] != maps.shape[-2:]:
        region = F.interpolate(region.float().unsqueeze(1), size=maps.shape[-2:], mode="nearest")[:, 0] > 0
    return maps[:, HEATMAP].float().masked_fill(~region.to(maps.device), float("-inf"))


def image_score(maps: torch.Tensor, region: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Image score (max heatmap logit inside `region`, see `restricted`; B) and its flat argmax index (B)."""
    score, idx = restricted(maps, region).flatten(1).max(dim=1)
    return score, idx


TTA_DESCRIPTION = "2 views in one batch: original; horizontal flip with contrast x0.9 about the image mean"


def tta_views(x: torch.Tensor) -> torch.Tensor:
    """(B,1,S,S) -> (2B,1,S,S): originals first, then their flipped, contrast-jittered copies."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return torch.cat([x, torch.flip(x, dims=[-1]) * 0.9 + 0.1 * mean])


def build_network(architecture: dict) -> NoduleNet:
    """A network from a card's `architecture` entry."""
    return NoduleNet(architecture["backbone"], architecture["width"], architecture["fine_width"])


def architecture_of(net: NoduleNet) -> dict:
    return {
        "backbone": net.backbone,
        "width": net.lat16.out_channels,
        "fine_width": net.lat2.out_channels,
        "encoder_strides": [2, 4, 8, 16],
        "head_stride": HEAD_STRIDE,
        "outputs": ["nodule_centre_heatmap_logit", "lung_field_logit", "log_radius_heatmap_px"],
        "embedding": f"GAP of stride-16 features, L2-normalised, {net.embedding_dim}-d",
        "parameters": sum(p.numel() for p in net.parameters()),
    }


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def save_weights(net: nn.Module, path: str) -> None:
    """Write the state dict as float16 safetensors (integer buffers kept)."""
    from safetensors.torch import save_file

    state = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, path)


def load_weights(net: ModuleT, path: str) -> ModuleT:
    from safetensors.torch import load_file

    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    net.load_state_dict(state)
    return net
