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
from .visualize import overlay

THUMB_SIDE = 192  # report thumbnails (JPEG in report.html)


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
        d.item.name, "ok", score=score, verdict="anomalous" if score >= threshold else "normal",
        zero_shot_score=zero_shot, few_shot_score=few_shot,
        peak_x=int((px + 0.5) * width / gw), peak_y=int((py + 0.5) * height / gh),
        width=width, height=height, seconds=seconds + d.seconds,
        label=d.item.label, defect=d.item.defect or "", grid_map=grid.numpy(),
    )


def draw_later(drawer: ThreadPoolExecutor, d: Decoded, grid: torch.Tensor, overlay_dir: Path | None,
               thumbnails: bool) -> Future | None:
    """The overlay file and thumbnail of one image, drawn in ``drawer``'s thread (None: nothing to draw)."""
    if d.image is None or not (thumbnails or overlay_dir is not None):
        return None
    return drawer.submit(draw, d.image, grid, d.item.name, overlay_dir, thumbnails)


def overlay_filename(name: str) -> str:
    """'washer.zip/good/001.png' -> 'washer.zip__good__001.png' (one flat folder, names stay unique)."""
    return name.replace("/", "__").rsplit(".", 1)[0] + ".png"


def draw(image: Image.Image, grid: torch.Tensor, name: str, overlay_dir: Path | None, thumbnails: bool) -> bytes:
    """Write the overlay file (with ``overlay_dir``); return the thumbnail's JPEG bytes (b"" without)."""
    if overlay_dir is not None:
        full = upsample(grid[None], (image.height, image.width))[0].clamp(0, 1).numpy()
        overlay(image, full).save(overlay_dir / overlay_filename(name), format="PNG")
    if not thumbnails:
        return b""
    small = image.copy()
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    heat = upsample(grid[None], (small.height, small.width))[0].clamp(0, 1).numpy()
    buffer = io.BytesIO()
    overlay(small, heat).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()
