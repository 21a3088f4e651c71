"""Owns the node's entry point: load a carded model once, turn a PreparedImage into a Prediction.

One forward pass of a two-view TTA batch (original + flipped, contrast-jittered
copy) gives the calibrated probability (Platt on the mean view score), the
uncertainty (std of the views' calibrated probabilities), the location (the
detection heatmap's peak) and the out-of-distribution score (Mahalanobis
distance of the pooled encoder features, `inference.ood`); a backward pass of
the image score to an encoder stage (`EXPLAIN_TARGET`, HiResCAM) gives the map
of the original view, an explanation that is not the detection heatmap itself. Heatmap
and location are mapped back to the source geometry through the image's
placement (`inference.geometry`).

Where the card ships a lung-field segmentation (`inference.lung_seg`), it runs
first (256 px, about 40 ms on 2 CPU threads) and the heatmap outside the grown lung field is
zeroed (-inf logits) before the peak, the image score and the explanation are
taken: no finding outside the lungs. A field of implausible area, or one the
segmentation is undecided about, is a failed segmentation: the image goes to review, read inside the network's own lung
channel as before the segmentation existed.

The review decision lists its reasons: `near_threshold`, `uncertain`,
`out_of_distribution`, `lung_fields_not_found`, `view_not_frontal` (the lung fields do not lie
side by side), and every quality flag of the image that the policy
names (a portable AP film, no pixel spacing, a secondary capture).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom import Dataset

from config.settings import ModelSettings
from inference import torch_setup
from inference.geometry import Letterbox
from inference.gradcam import explained_forward
from inference.lung_seg import NOT_FRONTAL
from inference.lung_seg import REASON as LUNG_REASON
from inference.lung_seg import LungField, LungSegmenter
from inference.model import LUNG, RADIUS, NoduleNet, build_network, embed, image_score, load_weights, model_coord, tta_views
from inference.model_card import ModelCard, load_card, verify_weights
from inference.ood import REASON as OOD_REASON
from inference.ood import FeatureDensity, load_density, pooled_features
from inference.preprocess import prepare
from inference.types import Location, ModelIdentity, PreparedImage, Prediction

DEFAULT_CARD = Path(__file__).resolve().parent / "models" / "card.json"
# Explanation: HiResCAM of the image score on the encoder's stride-8 stage, the target and method that
# pointed best on calibration phantoms (figures in inference/gradcam.py).
EXPLAIN_TARGET, EXPLAIN_METHOD = "encoder8", "hirescam"
# Quality flags (inference.preprocess) that make a read unreliable: the image goes to review with the flag as reason.
REVIEW_FLAGS = ("ap_view", "no_pixel_spacing", "invalid_pixel_spacing", "secondary_capture")


@dataclass(frozen=True)
class ReviewPolicy:
    """Review when |p - threshold| < margin, uncertainty > max_uncertainty, the image is out of
    distribution, or it carries one of `flags`."""

    margin: float = 0.1
    max_uncertainty: float = 0.15
    flags: tuple[str, ...] = REVIEW_FLAGS

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"margin must be in [0, 1], got {self.margin!r}")
        if not 0.0 <= self.max_uncertainty <= 0.5:
            raise ValueError(f"max_uncertainty must be in [0, 0.5], got {self.max_uncertainty!r}")

    def reasons(self, p: float, threshold: float, uncertainty: float, ood: bool, quality_flags: tuple[str, ...],
                lungs_found: bool = True, frontal: bool = True) -> tuple[str, ...]:
        found = []
        if abs(p - threshold) < self.margin:
            found.append("near_threshold")
        if uncertainty > self.max_uncertainty:
            found.append("uncertain")
        if ood:
            found.append(OOD_REASON)
        if not lungs_found:
            found.append(LUNG_REASON)
        elif not frontal:
            found.append(NOT_FRONTAL)
        return tuple(found + [f for f in quality_flags if f in self.flags])


class Detector:
    """A loaded, verified model; `predict` is safe to call repeatedly from one thread."""

    def __init__(self, card: ModelCard, net: NoduleNet, device: torch.device, review: ReviewPolicy,
                 density: FeatureDensity | None = None, lungs: LungSegmenter | None = None) -> None:
        self.card, self.net, self.device, self.review, self.density = card, net, device, review, density
        self.lungs = lungs
        self.identity = ModelIdentity(card.name, card.version, card.weights_sha256)
        self.input_size = card.input_size
        self.mm_per_px = card.input_mm_per_px
        # estimates a missing pixel spacing from the lung fields (`inference.preprocess.place`)
        self.thorax_spacing = lungs.thorax_spacing if lungs is not None else None

    @classmethod
    def load(cls, card_path: str | Path | None = None, *, device: str = "auto", threads: int | None = None,
             review: ReviewPolicy | None = None) -> "Detector":
        """Load the card (None: DEFAULT_CARD), verify the weights' sha256, build the network once."""
        card_path = Path(card_path) if card_path is not None else DEFAULT_CARD
        card = load_card(card_path)
        weights = verify_weights(card, card_path)
        torch_setup.limit_threads(threads)
        dev = torch_setup.select_device(device)
        net = load_weights(build_network(card.architecture), str(weights)).to(dev).eval()
        if dev.type == "cpu":  # 1.26x faster on these CPUs, same outputs within 1e-6 (bench/inference.py)
            # Module.to takes memory_format at run time; torch's overloads leave it out
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        for p in net.parameters():
            p.requires_grad_(False)
        density = load_density(card_path, card.ood) if card.ood else None
        lungs = LungSegmenter.of_card(card, card_path, dev)
        return cls(card, net, dev, review or ReviewPolicy(**card.review), density, lungs)

    @classmethod
    def from_settings(cls, model: ModelSettings, card_path: str | Path | None = None) -> "Detector":
        """The detector the `[model]` settings describe (`card_path` overrides `model.card`)."""
        return cls.load(card_path or model.card, device=model.device, threads=model.threads or None,
                        review=ReviewPolicy(model.review_margin, model.review_max_uncertainty,
                                            tuple(model.review_flags)))

    def prepare(self, ds: Dataset) -> PreparedImage:
        """`inference.preprocess.prepare` for this model: its input size and physical scale (without a pixel
        spacing, estimated from the lung fields when the card ships a segmentation)."""
        return prepare(ds, input_size=self.input_size, mm_per_px=self.mm_per_px, thorax_spacing=self.thorax_spacing)

    def _input(self, image: PreparedImage) -> torch.Tensor:
        x = np.asarray(image.model_input, dtype=np.float32)
        if x.shape != (self.input_size, self.input_size):
            raise ValueError(f"image.model_input has shape {x.shape}, model expects {(self.input_size, self.input_size)}")
        return torch.from_numpy(x)[None, None].to(self.device)

    def _calibrated(self, view_scores: torch.Tensor) -> tuple[float, float]:
        cal = self.card.calibration
        scores = view_scores.detach().double().cpu().numpy()
        views = np.array([cal.probability(float(s)) for s in scores])
        return cal.probability(float(scores.mean())), float(views.std())

    def lung_field(self, image: PreparedImage) -> tuple[LungField | None, torch.Tensor | None]:
        """The segmented lung field (None without a segmenter) and the region of both TTA views the image
        score may come from (None: the network's own lung field, also where the segmentation failed)."""
        if self.lungs is None:
            return None, None
        field = self.lungs.field(image.model_input)
        if not field.plausible:
            return field, None
        r = field.region.to(self.device)
        return field, torch.stack([r, torch.flip(r, dims=[-1])])

    def view_scores(self, image: PreparedImage) -> torch.Tensor:
        """The uncalibrated image score of each TTA view (max heatmap logit inside the lung region)."""
        _, region = self.lung_field(image)
        with torch.inference_mode():
            out = self.net(tta_views(self._input(image)))
            scores, _ = image_score(out.maps, region)
        return scores

    def probability(self, image: PreparedImage) -> tuple[float, float]:
        """Calibrated probability and uncertainty only (no Grad-CAM, no location)."""
        return self._calibrated(self.view_scores(image))

    def predict(self, image: PreparedImage) -> Prediction:
        """Probability, uncertainty, decision, review reasons, location and Grad-CAM in source geometry,
        embedding, OOD score.

        `location` is the most suspicious spot; it is given when the case is
        positive or flagged for review, else None.
        """
        return self.read(image)[0]

    def read(self, image: PreparedImage) -> tuple[Prediction, Location]:
        """`predict`'s Prediction and the detection peak (always given, for evaluation)."""
        field, region = self.lung_field(image)
        out, scores, idx, cam = explained_forward(self.net, tta_views(self._input(image)), 1, EXPLAIN_TARGET,
                                                  EXPLAIN_METHOD, region)
        p, unc = self._calibrated(scores)
        positive = p >= self.card.threshold
        ood, out_of_distribution = None, False
        if self.density is not None:
            ood = float(self.density.score(pooled_features(out.deep_features[:1]))[0])
            out_of_distribution = ood > self.density.threshold
        reasons = self.review.reasons(p, self.card.threshold, unc, out_of_distribution, image.quality_flags,
                                      lungs_found=field is None or field.plausible,
                                      frontal=field is None or field.frontal)
        cam_np = cam[0].cpu().numpy()
        w = out.maps.shape[-1]
        peak = int(np.argmax(cam_np)) if self.card.location_source == "gradcam" else int(idx[0])
        radius_model = float(torch.exp(out.maps[0, RADIUS].detach().flatten()[peak].float())) * (self.input_size / w)
        geometry = image.placement
        spot = self._location(peak // w, peak % w, radius_model, geometry)
        prediction = Prediction(
            probability=p,
            uncertainty=unc,
            positive=positive,
            review=bool(reasons),
            location=spot if positive or reasons else None,
            heatmap=np.clip(geometry.map_to_source(cam_np), 0.0, 1.0),
            embedding=embed(out.deep_features[:1].detach())[0].cpu().numpy().astype(np.float32),
            model=self.identity,
            threshold=self.card.threshold,
            lung_rows=self._lung_rows(out.maps[0, LUNG] > 0 if field is None or not field.plausible
                                      else torch.from_numpy(field.mask), geometry),
            review_reasons=reasons,
            ood_score=ood,
        )
        return prediction, spot

    def _lung_rows(self, lung: torch.Tensor, geometry: Letterbox) -> tuple[float, float] | None:
        """First and last source row of a lung mask over the model input (original view, any square size),
        None if it is empty."""
        rows = np.nonzero(lung.any(dim=1).cpu().numpy())[0]
        if rows.size == 0:
            return None
        k = self.input_size / lung.shape[0]  # model px per mask px
        top, bottom = (geometry.to_source((r + 0.5) * k - 0.5, 0.0)[0] for r in (rows[0], rows[-1]))
        return max(top, 0.0), min(bottom, geometry.source_shape[0] - 1.0)

    @staticmethod
    def _location(hm_row: int, hm_col: int, radius_model: float, geometry: Letterbox) -> Location:
        row, col = geometry.to_source(float(model_coord(hm_row)), float(model_coord(hm_col)))
        rows, cols = geometry.source_shape
        row, col = min(max(row, 0.0), rows - 1.0), min(max(col, 0.0), cols - 1.0)
        return Location(row=float(row), col=float(col), radius=radius_model / geometry.scale)
