"""What the service's handlers take and give: typed options and results, and the small caches they use."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .config import WinClipConfig
from .detector import Prediction
from .images import LoadedImage, load_image
from .lru import LRU
from .settings import env


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
    panels: list[tuple[Image.Image, str]]  # component maps with captions, at most PANEL_SIDE px
    suggested_threshold: float | None  # from the shots alone, K >= 2
    shots: int
    prediction: Prediction  # scores, and maps at the panels' size (visualize.panel_size)
    anomaly_map: np.ndarray  # (H, W) in [0, 1], query size: the overlay's and the mask's
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


class DecodedUploads:
    """Decoded images (up to ``max_pixels`` each, the ``size`` most recent) by their file's bytes: a repeat
    click does not decode again, whether it hands over the same upload path (the browser) or uploads the
    same file anew (API clients upload on every call, to a fresh path). Hashing a 900 px PNG takes ~1 ms,
    decoding it ~20."""

    def __init__(self, size: int, max_pixels: int) -> None:
        self._lru, self.max_pixels, self._lock = LRU(size), max_pixels, threading.Lock()

    def read(self, source: Any, name: str) -> LoadedImage:
        """``source`` (a path, a file wrapper or a PIL image) decoded; ``name`` says which image in errors."""
        path = getattr(source, "name", source)
        if not isinstance(path, (str, os.PathLike)):
            return _load(source, name)
        try:
            key = (file_digest(path), name, os.path.basename(str(path)))  # the name goes into its notes
        except FileNotFoundError:  # e.g. a tab left open longer than the server keeps uploads
            raise ValueError(f"{name} ({os.path.basename(str(path))}): {expired_uploads(1)}") from None
        except OSError:
            return _load(source, name)  # reports the unreadable file
        with self._lock:
            if key in self._lru.items:
                return self._lru.get(key, lambda: None)
        loaded = _load(source, name)
        if loaded.image.width * loaded.image.height <= self.max_pixels:
            with self._lock:
                self._lru.get(key, lambda: loaded)
        return loaded


def expired_uploads(count: int) -> str:
    """What to say about uploads that are no longer on the server (Gradio's cache is swept after
    WINCLIP_OUTPUT_HOURS, see app.py)."""
    what = "the uploaded file is" if count == 1 else f"{count} uploaded files are"
    return (f"{what} no longer on the server (uploads are deleted after {env('WINCLIP_OUTPUT_HOURS')} hours, "
            f"WINCLIP_OUTPUT_HOURS); upload {'it' if count == 1 else 'them'} again")


def uploaded_paths(files: Sequence[Any] | None, missing: str, max_bytes: int) -> list[Path]:
    """Uploaded files (Gradio wrappers or paths) as paths, within ``max_bytes`` in all (a batch's limit)."""
    paths = [Path(getattr(f, "name", f)) for f in files or []]
    if not paths:
        raise ValueError(missing)
    gone = [p.name for p in paths if not p.exists()]
    if gone:  # e.g. a tab left open longer than the server keeps uploads
        raise ValueError(f"{', '.join(gone[:3])}{' …' if len(gone) > 3 else ''}: {expired_uploads(len(gone))}")
    total = sum(p.stat().st_size for p in paths if p.is_file())
    if total > max_bytes:
        raise ValueError(f"the upload is {total / 1e6:.0f} MB; at most {max_bytes // 2**20} MB per batch "
                         "(use `python -m winclip inspect` or `prompts` for larger sets)")
    return paths


def file_digest(path: str | os.PathLike) -> str:
    """A file's bytes' BLAKE2b digest, read in 1 MB pieces."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def _load(source: Any, name: str) -> LoadedImage:
    if isinstance(source, Image.Image):
        return load_image(source, name)
    path = getattr(source, "name", source)  # gradio may hand over a tempfile wrapper or a path
    return load_image(path, name=f"{name} ({os.path.basename(str(path))})")
