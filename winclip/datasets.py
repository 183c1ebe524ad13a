"""Benchmark datasets from local folders (never downloaded): MVTec-AD, VisA, and a plain folder layout.

A category gives its normal training images (the pool k-shot references are drawn from) and its test
samples with labels and optional ground-truth masks.

- MVTec-AD: <root>/<category>/train/good, test/<defect or good>, ground_truth/<defect>/<stem>_mask.png
- VisA: <root>/split_csv/1cls.csv (object,split,label,image,mask; paths relative to <root>)
- folder: <root>/good/ and one folder per defect type; masks optional in <root>/masks/<defect>/<stem>.png
  (or <stem>_mask.png, or the MVTec layout <root>/../ground_truth/<defect>/<stem>_mask.png). k-shot
  references are drawn from good/ and left out of the test set.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from .images import load_image

DatasetName = Literal["mvtec", "visa", "folder"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".JPG", ".PNG"}
@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 1 = anomalous
    defect: str  # "good" for normal samples
    mask: Path | None  # ground truth; None = all normal, or no mask given


@dataclass(frozen=True)
class Category:
    dataset: str
    name: str
    train_good: tuple[Path, ...]
    test: tuple[Sample, ...]

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.test if s.label == 1)

    @property
    def defect_types(self) -> tuple[str, ...]:
        return tuple(sorted({s.defect for s in self.test if s.label == 1}))

    def references(self, shots: int, seed: int) -> list[Path]:
        """k normal references drawn from train/good by seed (sorted pool, so runs repeat exactly)."""
        if shots > len(self.train_good):
            raise ValueError(f"{self.name}: {shots} shots asked, only {len(self.train_good)} normal training images")
        return random.Random(seed).sample(sorted(self.train_good), shots)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES) if folder.is_dir() else []


def list_categories(dataset: DatasetName, root: str | Path) -> list[str]:
    root = Path(root)
    if dataset == "mvtec":
        if not root.is_dir():
            raise ValueError(f"dataset root not found: {root}")
        return sorted(p.name for p in root.iterdir() if (p / "test").is_dir())
    if dataset == "visa":
        rows = _visa_rows(root)
        return sorted({r["object"] for r in rows})
    if dataset == "folder":
        return [root.name]
    raise ValueError(f"unknown dataset {dataset!r}; use mvtec, visa or folder")


def load_category(dataset: DatasetName, root: str | Path, name: str) -> Category:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset root not found: {root}")
    if dataset == "mvtec":
        return _mvtec(root, name)
    if dataset == "visa":
        return _visa(root, name)
    if dataset == "folder":
        return _folder(root)
    raise ValueError(f"unknown dataset {dataset!r}; use mvtec, visa or folder")


def _mvtec(root: Path, name: str) -> Category:
    base = root / name
    if not (base / "test").is_dir():
        raise ValueError(f"{base}: not an MVTec-AD category (no test/ folder)")
    test = []
    for defect_dir in sorted(p for p in (base / "test").iterdir() if p.is_dir()):
        for image in _images(defect_dir):
            if defect_dir.name == "good":
                test.append(Sample(image, 0, "good", None))
            else:
                mask = base / "ground_truth" / defect_dir.name / f"{image.stem}_mask.png"
                test.append(Sample(image, 1, defect_dir.name, mask if mask.is_file() else None))
    return Category("mvtec", name, tuple(_images(base / "train" / "good")), tuple(test))


def _visa_rows(root: Path) -> list[dict[str, str]]:
    split = root / "split_csv" / "1cls.csv"
    if not split.is_file():
        raise ValueError(f"{root}: VisA needs split_csv/1cls.csv (the official split)")
    with open(split, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    required = {"object", "split", "label", "image", "mask"}
    if not rows or not required <= set(rows[0]):
        raise ValueError(f"{split}: expected columns {sorted(required)}")
    return rows


def _visa(root: Path, name: str) -> Category:
    rows = [r for r in _visa_rows(root) if r["object"] == name]
    if not rows:
        raise ValueError(f"{root}: no rows for VisA category {name!r} in split_csv/1cls.csv")
    train = tuple(root / r["image"] for r in rows if r["split"] == "train" and r["label"] == "normal")
    test = []
    for r in rows:
        if r["split"] != "test":
            continue
        anomalous = r["label"] != "normal"
        mask = root / r["mask"] if anomalous and r["mask"] else None
        test.append(Sample(root / r["image"], int(anomalous), "anomaly" if anomalous else "good", mask))
    return Category("visa", name, train, tuple(test))


def _folder(root: Path) -> Category:
    good = _images(root / "good")
    if not good:
        raise ValueError(f"{root}: the folder layout needs a good/ folder of normal images")
    test = [Sample(p, 0, "good", None) for p in good]
    for defect_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("good", "masks")):
        for image in _images(defect_dir):
            test.append(Sample(image, 1, defect_dir.name, find_mask(root, defect_dir.name, image.stem)))
    return Category("folder", root.name, tuple(good), tuple(test))


def find_mask(root: Path, defect: str, stem: str) -> Path | None:
    """The ground truth of ``root/<defect>/<stem>.*`` in the folder layout: ``masks/<defect>/<stem>.png`` or
    ``<stem>_mask.png``, or MVTec's ``../ground_truth/<defect>/<stem>_mask.png`` (root = a test/ folder)."""
    candidates = (root / "masks" / defect / f"{stem}.png", root / "masks" / defect / f"{stem}_mask.png",
                  root.parent / "ground_truth" / defect / f"{stem}_mask.png")
    return next((m for m in candidates if m.is_file()), None)


def load_mask(path: Path | None, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool at ``size`` (W, H): any non-zero pixel is anomalous (0/255, 0/1, RGB, palette masks)."""
    if path is None:
        return np.zeros((size[1], size[0]), dtype=bool)
    with Image.open(path) as mask:
        mask.load()
        if mask.mode in ("P", "RGB", "RGBA", "LA"):
            array = np.asarray(mask.convert("RGBA" if "A" in mask.mode else "RGB"))[..., :3].max(axis=-1)
        else:
            array = np.asarray(mask)
    binary = Image.fromarray((array > 0).astype(np.uint8) * 255)
    if binary.size != size:
        binary = binary.resize(size, Image.Resampling.NEAREST)
    return np.asarray(binary) > 0


def read_image(path: Path) -> Image.Image:
    """Dataset images go through the same checks as user uploads (grayscale, 16-bit, EXIF ...)."""
    return load_image(path).image
