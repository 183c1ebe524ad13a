"""One result row per input file (``results.csv``), and its drawings: overlay files and report thumbnails."""

from __future__ import annotations

import io
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .inputs import Decoded
from .detector import upsample
from .visualize import overlay, verdict_at

THUMB_SIDE = 192  # report thumbnails (JPEG in report.html)


OVERLAY_FORMATS = {"jpeg": ".jpg", "png": ".png"}  # format -> file suffix
DEFAULT_OVERLAY_FORMAT = "jpeg"  # open choice, see OverlayFiles


@dataclass(frozen=True)
class OverlayFiles:
    """Where and how each image's full-size heat-map overlay is written (``inspect --overlays``, the app's
    overlays.zip): one flat folder, one file per image named after its path.

    Open choice: JPEG at quality 90 by default. A 3000 px overlay encodes in ~0.02 s as JPEG (1.1 MB) and
    ~2.3 s as PNG (14 MB): with PNG the drawing thread, not the model, set a batch's pace on large images
    (docs/cli.md has the measurement). ``format="png"`` for lossless files."""

    folder: Path
    format: str = DEFAULT_OVERLAY_FORMAT  # a key of OVERLAY_FORMATS
    quality: int = 90  # JPEG only

    def __post_init__(self) -> None:
        if self.format not in OVERLAY_FORMATS:
            raise ValueError(f"overlay format must be one of {', '.join(OVERLAY_FORMATS)}, got {self.format!r}")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"JPEG quality must be 1-95, got {self.quality}")

    def filename(self, name: str) -> str:
        """'washer.zip/good/001.png' -> 'washer.zip__good__001.jpg' (one flat folder, names stay unique)."""
        return name.replace("/", "__").rsplit(".", 1)[0] + OVERLAY_FORMATS[self.format]

    def write(self, image: Image.Image, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.filename(name)
        if self.format == "jpeg":
            image.convert("RGB").save(path, format="JPEG", quality=self.quality)
        else:
            image.save(path, format="PNG")
        return path


@dataclass
class Row:
    """One result row (``results.csv``). ``score`` is None for an unreadable file."""

    file: str
    status: str  # "ok" | "error"
    score: float | None = None
    verdict: str = ""
    zero_shot_score: float | None = None
    few_shot_score: float | None = None
    peak_x: int | None = None
    peak_y: int | None = None
    width: int | None = None
    height: int | None = None
    seconds: float | None = None
    error: str = ""
    label: int | None = None
    defect: str = ""
    grid_map: np.ndarray | None = field(default=None, repr=False)  # (gh, gw) for pixel metrics
    thumbnail: bytes = field(default=b"", repr=False)  # JPEG of the overlay, for the report

    CSV_FIELDS = ("file", "status", "score", "verdict", "zero_shot_score", "few_shot_score", "peak_x", "peak_y",
                  "width", "height", "seconds", "error", "label", "defect")

    def csv(self) -> dict:
        out = {}
        for key in self.CSV_FIELDS:
            value = getattr(self, key)
            out[key] = "" if value is None else (f"{value:.6f}" if isinstance(value, float) else value)
        return out


def error_row(d: Decoded) -> Row:
    return Row(d.item.name, "error", error=d.error, seconds=d.seconds, label=d.item.label, defect=d.item.defect or "")


def scored_row(d: Decoded, threshold: float, seconds: float, grid: torch.Tensor, score: float,
               zero_shot: float | None, few_shot: float | None, size: tuple[int, int] | None = None) -> Row:
    """The row of one scored image; ``grid`` (gh, gw) its map, ``size`` (W, H) when ``d`` holds no image."""
    width, height = size if size is not None else d.image.size  # type: ignore[union-attr]
    gh, gw = grid.shape
    py, px = divmod(int(grid.argmax()), gw)  # peak patch -> its centre in image pixels
    return Row(
        d.item.name, "ok", score=score, verdict=verdict_at(score, threshold),
        zero_shot_score=zero_shot, few_shot_score=few_shot,
        peak_x=int((px + 0.5) * width / gw), peak_y=int((py + 0.5) * height / gh),
        width=width, height=height, seconds=seconds + d.seconds,
        label=d.item.label, defect=d.item.defect or "", grid_map=grid.numpy(),
    )


def draw_later(drawer: ThreadPoolExecutor, d: Decoded, grid: torch.Tensor, overlays: OverlayFiles | None,
               thumbnails: bool) -> Future | None:
    """The overlay file and thumbnail of one image, drawn in ``drawer``'s thread (None: nothing to draw)."""
    if d.image is None or not (thumbnails or overlays is not None):
        return None
    return drawer.submit(draw, d.image, grid, d.item.name, overlays, thumbnails)


def draw(image: Image.Image, grid: torch.Tensor, name: str, overlays: OverlayFiles | None, thumbnails: bool) -> bytes:
    """Write the overlay file (with ``overlays``); return the thumbnail's JPEG bytes (b"" without)."""
    if overlays is not None:
        full = upsample(grid[None], (image.height, image.width))[0].clamp(0, 1).numpy()
        overlays.write(overlay(image, full), name)
    if not thumbnails:
        return b""
    small = image.copy()
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    heat = upsample(grid[None], (small.height, small.width))[0].clamp(0, 1).numpy()
    buffer = io.BytesIO()
    overlay(small, heat).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()
