"""MuSc as a method: no text, no references; the set is encoded (block tokens) and scored against itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..musc import MIN_IMAGES, BlockTokens, MuscConfig, MuscOutput, quarter_layers, score_batch
from .base import Method, Scores, Setup

if TYPE_CHECKING:
    from ..detector import WinClip

# MuSc's README (official code), ViT-B-16-plus-240 / laion400m_e31 at 240 px, whole test set as the batch.
PUBLISHED_MUSC: dict[tuple[str, int], dict[str, float]] = {
    ("mvtec", 0): {"auroc": 94.77, "pauroc": 96.26},
    ("visa", 0): {"auroc": 82.62, "pauroc": 96.11},
}


def musc_precision(detector: "WinClip") -> str | None:
    """The precision MuSc's backbone pass runs in: fp32 where ``auto`` chose the precision (a candidate,
    checked or not yet; see winclip.precision_check); None = the detector's own (an explicit precision)."""
    runtime = detector.source.runtime if detector.source is not None else None
    return "fp32" if runtime is not None and runtime.candidate else None


def musc_features(detector: "WinClip", pixels: torch.Tensor, layers: tuple[int, ...],
                  precision: str | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One batch for MuSc, (B, 3, H, W) -> ({block: (B, P, D)} float patch tokens, (B, E) class embeddings),
    from one pass over the full image only (MuSc uses no windows), in ``precision`` (default
    ``musc_precision``: fp32 under auto)."""
    precision = precision or musc_precision(detector)
    with detector.backbone.precision_for_this_thread(precision):
        full, _ = detector.backbone.encode_all(pixels, {}, layers=layers)
    assert full.layer_tokens is not None
    return {k: v.float() for k, v in full.layer_tokens.items()}, full.image_embeddings


def musc_scores(store: BlockTokens, detector: "WinClip", config: MuscConfig) -> MuscOutput:
    """MuSc's mutual scoring of the stored set, where it was encoded (a GPU too), returned on the CPU."""
    out = score_batch(*store.tensors(), detector.grid, detector.image_size, config)
    return MuscOutput(out.maps.cpu(), out.raw_scores.cpu(), out.scores.cpu())


class _Store:
    def __init__(self, tokens: BlockTokens) -> None:
        self.tokens = tokens

    def add(self, features: tuple[dict[int, torch.Tensor], torch.Tensor]) -> None:
        self.tokens.add(*features)


class MuscMethod(Method):
    name = "musc"
    title = "MuSc"
    help = ("scores the set against itself (no text, no references; at least 5 images; a defect in ~30% or more "
            "of the set scores as normal; scores are relative to this set)")
    whole_set = True
    min_images = MIN_IMAGES
    published = PUBLISHED_MUSC
    published_source = "MuSc's README, ViT-B-16-plus-240 / laion400m_e31"

    def setup(self, detector: "WinClip", prototypes=None, references=None, options: Any = None,
              dataset: str | None = None) -> Setup:
        config = options or MuscConfig(layers=quarter_layers(detector.backbone.n_blocks),  # blocks of this tower
                                       rescore_k=(1, 8, 9) if dataset == "visa" else (1, 2, 3))  # their per-dataset k
        return Setup(options=config)

    def precision(self, detector: "WinClip") -> str | None:
        return musc_precision(detector)

    def encode(self, detector: "WinClip", pixels: torch.Tensor, setup: Setup):
        return musc_features(detector, pixels, setup.options.layers)

    def store(self, capacity: int, setup: Setup) -> _Store:
        return _Store(BlockTokens(setup.options.layers, capacity))

    def score(self, detector: "WinClip", features: _Store, setup: Setup) -> Scores:
        out = musc_scores(features.tokens, detector, setup.options)
        # maps are shown scaled by the set's largest patch score (distances of unit vectors, in [0, 2])
        return Scores(out.scores.float(), out.maps.float(), display_scale=float(out.maps.max()) or 1.0)

    def auto_threshold(self, detector: "WinClip", setup: Setup) -> dict:
        return {"value": 0.5, "how": "auto: 0.5 on MuSc's re-scored score (min-max over this set: 0 = least, "
                "1 = most anomalous image)"}

    def check_count(self, readable: int) -> None:
        if readable < self.min_images:
            raise ValueError(f"MuSc scores a set against itself and needs at least {self.min_images} readable "
                             f"images; got {readable}. Use WinCLIP for fewer images.")

    def describe(self, setup: Setup) -> dict:
        c = setup.options
        return {"method": "musc", "musc": {"layers": list(c.layers), "radii": list(c.radii),
                                           "rescore_k": list(c.rescore_k)}}

    def shots_heading(self, shots: int) -> str:
        return "MuSc"
