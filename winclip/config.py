"""Every choice WinCLIP / WinCLIP+ makes, in one frozen dataclass.

Defaults reproduce the paper (CVPR 2023, §4). Fields marked "ablation" switch the rows of paper
Tables 3 and 8; fields marked "open choice" are where the paper is silent and we chose (docs/design.md,
"Design choices").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scoring = Literal["two_class", "one_class"]
Aggregation = Literal["harmonic", "arithmetic"]
MAX_TOKENS_PER_CALL = 4096  # tokens per transformer call (1 image of ViT-B/16+ with its windows)
Prototype = Literal["mean_raw", "mean_normalized"]


@dataclass(frozen=True)
class WinClipConfig:
    temperature: float = 0.07  # CLIP's softmax temperature (§4.1); 0.01 reproduces worse
    scoring: Scoring = "two_class"  # ablation (Table 3a): "one_class" scores (1 - cos(e, normal)) / 2
    state_ensemble: bool = True  # ablation (Table 3b): False -> one state per class, see baseline_* below
    template_ensemble: bool = True  # ablation (Table 3c): False -> the single baseline template
    baseline_normal_state: str = "normal {}"  # the CLIP-AC two-class prompt of §4.1 ("normal [o]")
    baseline_anomalous_state: str = "anomalous {}"  # ... and "anomalous [o]"
    baseline_template: str = "a photo of a {}."  # CLIP's plain template, used when template_ensemble=False
    prototype: Prototype = "mean_raw"  # open choice: mean of raw text embeddings, as the reproductions do
    window_scales: tuple[int, ...] = (2, 3)  # ablation (Table 8): k x k patch windows; paper: small 2, mid 3
    window_stride: int = 1  # paper §5: stride 1 patch (16 px on ViT-B/16+)
    image_scale: bool = True  # ablation (Table 8): include the class-token score in the multi-scale mean
    aggregation: Aggregation = "harmonic"  # ablation (Table 8): eq. 3 harmonic vs plain arithmetic mean
    few_shot_patch_memory: bool = True  # eq. 5: the patch-token memory R^P joins the window memories
    # open choice: tokens per transformer call (1 image of ViT-B/16+), bounds memory
    max_tokens_per_call: int = MAX_TOKENS_PER_CALL
    packed: bool = True  # speed: image + all windows share matmuls; False = reference path, same numbers
    max_defect_words: int = 32  # open choice: more anomalous states than this is rejected (prompt count, latency)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.scoring not in ("two_class", "one_class"):
            raise ValueError(f"scoring must be 'two_class' or 'one_class', got {self.scoring!r}")
        if self.aggregation not in ("harmonic", "arithmetic"):
            raise ValueError(f"aggregation must be 'harmonic' or 'arithmetic', got {self.aggregation!r}")
        if self.prototype not in ("mean_raw", "mean_normalized"):
            raise ValueError(f"prototype must be 'mean_raw' or 'mean_normalized', got {self.prototype!r}")
        scales = tuple(self.window_scales)
        if any((not isinstance(k, int)) or k < 1 for k in scales) or len(set(scales)) != len(scales):
            raise ValueError(f"window_scales must be distinct positive integers, got {self.window_scales!r}")
        object.__setattr__(self, "window_scales", scales)
        if not scales and not self.image_scale:
            raise ValueError("nothing to score: window_scales is empty and image_scale is False")
        if self.window_stride < 1:
            raise ValueError(f"window_stride must be >= 1, got {self.window_stride}")
        if self.max_tokens_per_call < 1:
            raise ValueError(f"max_tokens_per_call must be >= 1, got {self.max_tokens_per_call}")
        for name in ("baseline_normal_state", "baseline_anomalous_state", "baseline_template"):
            if getattr(self, name).count("{}") != 1:
                raise ValueError(f"{name} must contain exactly one '{{}}', got {getattr(self, name)!r}")
