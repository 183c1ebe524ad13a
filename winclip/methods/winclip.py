"""WinCLIP / WinCLIP+ as a method: text prompts, optional normal shots, every batch scored on its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import Method, Scores, Setup

if TYPE_CHECKING:
    from ..detector import ImageFeatures, WinClip

# Published means over categories (%), WinCLIP paper Tables 1 and 4: (dataset, shots) -> metric -> value.
PUBLISHED: dict[tuple[str, int], dict[str, float]] = {
    ("mvtec", 0): {"auroc": 91.8, "aupr": 96.5, "f1_max": 92.9, "pauroc": 85.1, "pro": 64.6, "pixel_f1_max": 31.7},
    ("mvtec", 1): {"auroc": 93.1, "aupr": 96.5, "f1_max": 93.7, "pauroc": 95.2, "pro": 87.1},
    ("mvtec", 2): {"auroc": 94.4, "aupr": 97.0, "f1_max": 94.4},
    ("mvtec", 4): {"auroc": 95.2, "aupr": 97.3, "f1_max": 94.7, "pauroc": 96.2, "pro": 89.0},
    ("visa", 0): {"auroc": 78.1, "pauroc": 79.6, "pro": 56.8, "pixel_f1_max": 14.8},
    ("visa", 1): {"auroc": 83.8, "aupr": 85.1, "f1_max": 83.1, "pauroc": 96.4, "pro": 85.1},
    ("visa", 2): {"auroc": 84.6, "aupr": 85.8, "f1_max": 83.0},
    ("visa", 4): {"auroc": 87.3, "aupr": 88.8, "f1_max": 84.2, "pauroc": 97.2, "pro": 87.6},
}


class WinClipMethod(Method):
    name = "winclip"
    title = "WinCLIP"
    help = "per image, with the prompts, and WinCLIP+ with normal reference images"
    uses_text = True
    uses_references = True
    ablations = True

    published = PUBLISHED
    published_source = "WinCLIP paper"

    def encode(self, detector: "WinClip", pixels: torch.Tensor, setup: Setup) -> "ImageFeatures":
        return detector.encode(pixels)

    def score(self, detector: "WinClip", features: "ImageFeatures", setup: Setup) -> Scores:
        out = detector.score(features, setup.prototypes, references=setup.references)
        few = None if out.few_shot_maps is None else out.few_shot_maps.amax(dim=(-2, -1)).float().cpu()
        return Scores(out.image_scores.float().cpu(), out.grid_maps.float().cpu(),
                      out.zero_shot_scores.float().cpu(), few)

    def auto_threshold(self, detector: "WinClip", setup: Setup) -> dict:
        refs = setup.references
        if refs is not None and refs.shots >= 2:
            value = max(detector.leave_one_out_scores(refs, setup.prototypes))
            return {"value": value, "how": f"auto: highest leave-one-out score of the {refs.shots} normal shots"}
        return {"value": 0.5, "how": "auto: 0.5 (give at least 2 normal images for a threshold from normal shots)"}

    def shots_heading(self, shots: int) -> str:
        return "WinCLIP" if shots == 0 else "WinCLIP+"
