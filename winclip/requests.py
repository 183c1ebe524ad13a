"""What the service's handlers take and give: typed options and results, and the small caches they use."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Hashable

from PIL import Image

from .config import WinClipConfig
from .detector import Prediction


@dataclass(frozen=True)
class DetectOptions:
    object_name: str = "object"
    defect_words: tuple[str, ...] = ()
    min_window: int = 2  # window sizes min_window..max_window are used; 0 = no windows
    max_window: int = 3
    image_scale: bool = True
    threshold: float = 0.5
    normal_states: tuple[str, ...] | None = None  # None = the paper's lists
    anomalous_states: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None
    scoring: str = "two_class"
    aggregation: str = "harmonic"

    def config(self, base: WinClipConfig) -> WinClipConfig:
        scales = tuple(range(self.min_window, self.max_window + 1)) if self.min_window >= 1 else ()
        return replace(base, window_scales=scales, image_scale=self.image_scale, scoring=self.scoring,
                       aggregation=self.aggregation)


@dataclass(frozen=True)
class DetectResult:
    score: float
    threshold: float
    verdict: str  # "anomalous" / "normal"
    overlay: Image.Image  # heat map over the query, query size
    mask: Image.Image  # above-threshold region tinted and outlined, query size
    panels: list[tuple[Image.Image, str]]  # component maps with captions
    suggested_threshold: float | None  # from the shots alone, K >= 2
    shots: int
    prediction: Prediction
    notes: tuple[str, ...]
    seconds: float
    image: Image.Image  # the query as decoded (a threshold move redraws the mask from it)
    steps: dict[str, float] = field(default_factory=dict)  # where ``seconds`` went, stage -> seconds


@dataclass(frozen=True)
class PromptComparison:
    """The playground's measurements on a labelled set (see winclip.prompt_experiments)."""

    sets: list[list[Any]]  # [set, zero-shot AUROC, AP, F1-max, WinCLIP+ AUROC, pixel AUROC, PRO]
    prompts: list[list[Any]]  # [class, prompt, AUROC alone] for the current edit
    words: list[list[Any]]  # [defect word, AUROC with, without, contribution]
    suggestion: Any  # prompt_experiments.Suggestion, or None when not asked for
    images: int
    good: int
    defective: int
    errors: list[str]
    encode_seconds: float  # 0 when the set came from the cache
    score_seconds: float
    current: dict  # the current edit as a prompt-set JSON object


@dataclass(frozen=True)
class PromptReport:
    rows: list[list[Any]]  # [class, prompt, cosine, anomaly probability]
    word_rows: list[list[Any]]  # [defect word, score with all, score without it, contribution]
    score: float
    prompt_count: tuple[int, int]


class LRU:
    def __init__(self, size: int) -> None:
        self.size, self.items = size, OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = make()
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def image_key(image: Image.Image) -> str:
    digest = hashlib.sha1(image.tobytes())
    digest.update(f"{image.size}{image.mode}".encode())
    return digest.hexdigest()
