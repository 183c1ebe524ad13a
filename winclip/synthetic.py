"""Synthetic inspection images: a textured round part, with or without a drawn defect, and its mask.

Used for the demo's examples, the tests and the parity/benchmark scripts, where no dataset may be
downloaded. Deterministic per seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Defect = Literal["none", "scratch", "spot", "crack"]


@dataclass(frozen=True)
class SyntheticSample:
    image: Image.Image  # RGB
    mask: np.ndarray  # (H, W) bool, True on the defect
    defect: Defect


# The demo's example parts (examples/, written by scripts/make_examples.py) and the precision self-check's
# images (winclip.precision_check): (seed, defect) of the queries, seeds of the normal references, their size.
EXAMPLE_QUERIES: tuple[tuple[int, str], ...] = ((11, "scratch"), (12, "spot"), (13, "crack"))
EXAMPLE_GOOD_SEEDS = (0, 1, 2)
EXAMPLE_SIZE = 320


def make_part(seed: int = 0, size: int = 480, defect: Defect = "none") -> SyntheticSample:
    """A metal washer on a dark background; normal shots differ by small shifts, light and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    cx, cy = 0.5 + rng.uniform(-0.02, 0.02), 0.5 + rng.uniform(-0.02, 0.02)
    radius = np.hypot(xx - cx, yy - cy)
    ring = (radius < 0.38) & (radius > 0.14)
    light = 0.9 + rng.uniform(-0.05, 0.05)
    brushed = 0.06 * np.sin(2 * np.pi * 40 * np.arctan2(yy - cy, xx - cx) / (2 * np.pi))  # radial brushing
    metal = light * (0.62 + 0.25 * (1 - radius / 0.38) + brushed)
    background = 0.12 + 0.04 * yy
    gray = np.where(ring, metal, background) + rng.normal(0, 0.015, (size, size))
    rgb = np.stack([gray * 0.97, gray, gray * 1.04], axis=-1)
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))
    mask_img = Image.new("L", (size, size), 0)
    if defect != "none":
        _draw_defect(image, mask_img, defect, rng, size, (cx, cy))
    return SyntheticSample(image, np.asarray(mask_img) > 0, defect)


def _draw_defect(image: Image.Image, mask: Image.Image, defect: Defect, rng, size: int, center) -> None:
    angle = rng.uniform(0, 2 * np.pi)
    r = rng.uniform(0.2, 0.32)
    px, py = (center[0] + r * np.cos(angle)) * size, (center[1] + r * np.sin(angle)) * size
    draw, mdraw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    if defect == "spot":
        rad = size * rng.uniform(0.03, 0.05)
        box = [px - rad, py - rad, px + rad, py + rad]
        draw.ellipse(box, fill=(70, 45, 30))
        mdraw.ellipse(box, fill=255)
    elif defect == "scratch":
        length = size * 0.12
        end = (px + length * np.cos(angle + 1.2), py + length * np.sin(angle + 1.2))
        width = max(2, size // 80)
        draw.line([(px, py), end], fill=(25, 25, 25), width=width)
        mdraw.line([(px, py), end], fill=255, width=width)
    elif defect == "crack":
        points = [(px, py)]
        for _ in range(6):
            step = size * 0.025
            heading = angle + rng.uniform(-0.6, 0.6)
            points.append((points[-1][0] + step * np.cos(heading), points[-1][1] + step * np.sin(heading)))
        width = max(2, size // 120)
        draw.line(points, fill=(10, 10, 10), width=width)
        mdraw.line(points, fill=255, width=width)
    else:
        raise ValueError(f"unknown defect {defect!r}; use none, scratch, spot or crack")
