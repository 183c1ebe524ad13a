"""Reading user images safely: every failure is a ValueError naming the file and the problem.

Decompression bombs are refused by an explicit pixel cap (not only PIL's warning), EXIF orientation
is applied, animated images give their first frame, and every mode (L, LA, P, RGBA, CMYK, I;16, I, F)
becomes 8-bit RGB with its full range kept.
"""

from __future__ import annotations

import functools
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # ~6300 x 6300; the model sees 240 x 240, larger only costs memory
MAX_FILE_BYTES = 50 * 1024 * 1024  # 50 MB
MIN_SIDE = 2  # a 1-pixel side cannot be resized meaningfully
MAX_ASPECT = 20.0  # squashing beyond this destroys the object


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF-oriented
    name: str
    notes: tuple[str, ...]  # what was done that a user should know (first frame of an animation, ...)

    @functools.cached_property
    def key(self) -> str:
        """The pixels' SHA-1 (with size and mode): the service's caches' key, hashed once per decoded image
        (~3 ms for 900 px; a repeat click's decoded images come from a cache, so it is not hashed again)."""
        digest = hashlib.sha1(self.image.tobytes())
        digest.update(f"{self.image.size}{self.image.mode}".encode())
        return digest.hexdigest()


def load_image(source: str | Path | bytes | BinaryIO | Image.Image, name: str | None = None) -> LoadedImage:
    """Open, validate and convert one image to RGB."""
    label = name or (str(source) if isinstance(source, (str, Path)) else "image")
    if isinstance(source, Image.Image):
        return _finish(source, label, [])
    data = _read_bytes(source, label)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.size, label)
            image.load()
    except ValueError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ValueError(f"{label}: image is too large to decode safely ({exc}); max {MAX_PIXELS:,} pixels") from exc
    except UnidentifiedImageError as exc:
        raise ValueError(f"{label}: not an image file PIL can read (PNG, JPEG, BMP, TIFF, WebP, GIF ...)") from exc
    except (OSError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise ValueError(f"{label}: image data is corrupt or truncated ({exc}); save or export it again") from exc
    notes = []
    if getattr(image, "n_frames", 1) > 1:
        notes.append(f"{label}: animated image with {image.n_frames} frames; the first frame is used")
    return _finish(image, label, notes)


def _read_bytes(source: str | Path | bytes | BinaryIO, label: str) -> bytes:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{label}: file not found")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ValueError(f"{label}: file is {path.stat().st_size / 1e6:.0f} MB; max {MAX_FILE_BYTES // 2**20} MB")
        data = path.read_bytes()
    elif isinstance(source, bytes):
        data = source
    elif hasattr(source, "read"):
        data = source.read(MAX_FILE_BYTES + 1)
    else:
        raise ValueError(f"{label}: expected a file path, bytes or an image, got {type(source).__name__}")
    if len(data) == 0:
        raise ValueError(f"{label}: file is empty (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{label}: file is larger than {MAX_FILE_BYTES // 2**20} MB")
    return data


def _check_size(size: tuple[int, int], label: str) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ValueError(f"{label}: {width}x{height} is {width * height:,} pixels; max {MAX_PIXELS:,}")
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"{label}: {width}x{height} is too small; each side needs at least {MIN_SIDE} pixels")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ValueError(
            f"{label}: {width}x{height} has aspect ratio above {MAX_ASPECT:.0f}:1; crop it to the part first"
        )


def _finish(image: Image.Image, label: str, notes: list[str]) -> LoadedImage:
    _check_size(image.size, label)
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as exc:
        notes.append(f"{label}: EXIF orientation unreadable ({exc}); used as stored")
    try:
        rgb = to_rgb(image, label)
    except (OSError, SyntaxError, EOFError) as exc:  # lazily decoded data (e.g. a later frame) is corrupt
        raise ValueError(f"{label}: image data is corrupt or truncated ({exc}); save or export it again") from exc
    return LoadedImage(rgb, label, tuple(notes))


def to_rgb(image: Image.Image, label: str = "image") -> Image.Image:
    """Any PIL mode -> 8-bit RGB. High-bit-depth and float images are min-max scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            raise ValueError(f"{label}: image holds no finite pixel values (all NaN or infinite)")
        low, high = values[finite].min(), values[finite].max()
        scaled = np.zeros_like(values) if high == low else (np.where(finite, values, low) - low) / (high - low)
        return Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
