"""What a scoring method is: one small interface that ``inspect``, ``evaluate``, the app's Batch tab and its
``/inspect`` API drive, and the registry they read their choices from.

A method encodes a batch of preprocessed images and scores what it encoded: a batch at a time, or, for a
method that scores a set against itself (``whole_set``), the whole set once every image is encoded. It says
what it needs (the prompts, normal reference images, at least ``min_images`` images) and the precision of
its backbone pass. Adding a method is one ``register(MyMethod())`` call: nothing else names methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from ..detector import ReferenceMemory, WinClip


@dataclass(frozen=True)
class Scores:
    """Scores of B images, on the CPU: image scores (B,) and maps on the patch grid (B, gh, gw)."""

    scores: torch.Tensor  # (B,)
    maps: torch.Tensor  # (B, gh, gw) float
    zero_shot: torch.Tensor | None = None  # (B,) WinCLIP's zero-shot part, where a method has one
    few_shot: torch.Tensor | None = None  # (B,) its few-shot map's maximum
    display_scale: float = 1.0  # maps are drawn divided by this (their values beyond [0, 1] otherwise clip)

    @staticmethod
    def concat(parts: Sequence["Scores"]) -> "Scores":
        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        return Scores(torch.cat([p.scores for p in parts]), torch.cat([p.maps for p in parts]), cat("zero_shot"),
                      cat("few_shot"), max(p.display_scale for p in parts))


@dataclass(frozen=True)
class Setup:
    """What a method scores with, prepared once per run."""

    prototypes: torch.Tensor | None = None  # (2, E) the prompts' [normal, anomalous], for methods that use text
    references: "ReferenceMemory | None" = None  # normal shots, for methods that use them
    options: Any = None  # the method's own settings (MuSc: a MuscConfig)

    def to(self, device: "torch.device | str") -> "Setup":
        """The same setup with its tensors on ``device`` (e.g. shipped from a driver to a worker)."""
        return Setup(None if self.prototypes is None else self.prototypes.to(device),
                     None if self.references is None else self.references.to(device), self.options)


class FeatureList:
    """The default store of a whole-set method: every batch's features, in order."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.parts = capacity, []

    def add(self, features: Any) -> None:
        self.parts.append(features)


class Method:
    """The interface; subclasses set the class attributes and override ``encode`` and ``score``."""

    name = ""  # the id: --method NAME, the API's method argument
    title = ""  # shown in the app and the reports
    help = ""  # one line for --help and the app
    uses_text = False  # scores with the prompts (object name, defect words)
    uses_references = False  # scores with normal reference images (K shots)
    whole_set = False  # scores a set against itself: rows only once every image is encoded
    min_images = 1  # readable images a run needs
    ablations = False  # evaluate's --ablation presets (WinCLIP's configuration) apply to it
    published: dict[tuple[str, int], dict[str, float]] = {}  # (dataset, shots) -> metric -> value (evaluate)
    published_source = ""

    def setup(self, detector: "WinClip", prototypes: torch.Tensor | None = None,
              references: "ReferenceMemory | None" = None, options: Any = None, dataset: str | None = None) -> Setup:
        """The run's setup; ``dataset`` (mvtec, visa, folder) lets a method pick its published settings."""
        return Setup(prototypes if self.uses_text else None, references if self.uses_references else None, options)

    def precision(self, detector: "WinClip") -> str | None:
        """The precision of this method's backbone pass; None: the detector's own."""
        return None

    def encode(self, detector: "WinClip", pixels: torch.Tensor, setup: Setup) -> Any:
        """(B, 3, H, W) preprocessed pixels -> whatever ``score`` needs of them (kept per batch, or in
        ``store`` for a whole-set method)."""
        raise NotImplementedError

    def score(self, detector: "WinClip", features: Any, setup: Setup) -> Scores:
        """Scores of one batch's features, or (``whole_set``) of the ``store`` holding the set's."""
        raise NotImplementedError

    def store(self, capacity: int, setup: Setup) -> Any:
        """Where a whole-set method's batches are kept until the set is scored (``add(features)``)."""
        return FeatureList(capacity)

    def auto_threshold(self, detector: "WinClip", setup: Setup) -> dict:
        """``threshold="auto"``: {"value": ..., "how": ...}."""
        return {"value": 0.5, "how": f"auto: 0.5 ({self.title} has no threshold of its own)"}

    def check_count(self, readable: int) -> None:
        """ValueError when a run has too few readable images for this method."""
        if readable < self.min_images:
            raise ValueError(f"{self.title} needs at least {self.min_images} readable images; got {readable}.")

    def describe(self, setup: Setup) -> dict:
        """Extra keys for evaluate's per-category JSON."""
        return {}

    def shots_heading(self, shots: int) -> str:
        return self.title


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` available to the CLI, the evaluation, the app and its API (by ``method.name``)."""
    if not method.name or not method.name.isidentifier():
        raise ValueError(f"a method needs a name that is a plain identifier, got {method.name!r}")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(method: "str | Method") -> Method:
    """The registered method of that name (or title, any case); ValueError naming the choices."""
    if isinstance(method, Method):
        return method
    key = str(method).strip().lower()
    for m in _REGISTRY.values():
        if key in (m.name.lower(), m.title.lower()):
            return m
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(_REGISTRY)}")


def names() -> list[str]:
    return list(_REGISTRY)


def all_methods() -> list[Method]:
    return list(_REGISTRY.values())
