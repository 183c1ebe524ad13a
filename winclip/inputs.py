"""What a run reads: input files, folders and zips collected into items (labelled when the layout says
so), and items decoded and preprocessed one batch ahead of the model. No model work here.

Labels come from the folder layout of ``evaluate --dataset folder`` (``good/`` + one folder per defect
type), masks from ``masks/<defect>/<stem>.png`` or the MVTec layout ``../ground_truth/<defect>/<stem>_mask.png``.
Zips are extracted with size, count and path checks (``extract_zip``).
"""

from __future__ import annotations

import contextvars
import hashlib
import queue
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image

from .datasets import find_mask
from .images import load_image

MAX_ZIP_FILES = 20_000  # entries in one zip (CLI); the app sets its own, smaller limit
MAX_ZIP_BYTES = 4 << 30  # total uncompressed bytes of one zip, checked before extracting
SKIPPED_DIRS = {"__MACOSX", "masks", "ground_truth"}


@dataclass(frozen=True)
class Item:
    """One input file. ``name`` is unique and says where it came from (relative path, or zip:member)."""

    name: str
    path: Path
    label: int | None = None  # 1 anomalous, 0 good, None unlabelled
    defect: str | None = None
    mask: Path | None = None


@dataclass
class Inputs:
    items: list[Item]
    notes: list[str]  # what was skipped and why (hidden files, nested zips, unsafe zip paths ...)
    labelled: bool



# ---- collecting ------------------------------------------------------------------------------


def _hidden(part: str) -> bool:
    return part.startswith(".") or part in SKIPPED_DIRS


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        _hidden(part) for part in p.relative_to(folder).parts))


def extract_zip(path: Path, dest: Path, notes: list[str], max_files: int = MAX_ZIP_FILES,
                max_bytes: int = MAX_ZIP_BYTES) -> Path:
    """Extract a zip safely into ``dest`` (a fresh folder); return it. Raises ValueError for a bad zip.

    Size and count are checked from the directory before anything is written; ``..`` and absolute
    paths, links, nested zips, ``__MACOSX/`` and hidden files are skipped with a note; each member is
    read with a cap on its declared size, so a lying header cannot expand past the limit.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{path.name}: not a readable zip file ({exc})") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > max_files:
            raise ValueError(f"{path.name}: {len(members)} files in the zip; at most {max_files} are accepted")
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise ValueError(f"{path.name}: {total / 1e6:.0f} MB uncompressed; at most {max_bytes / 1e6:.0f} MB "
                             "are accepted (zip bomb guard)")
        dest.mkdir(parents=True, exist_ok=True)
        written = 0
        for member in members:
            name = member.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or (parts and ":" in parts[0]) or ".." in parts:
                notes.append(f"{path.name}:{name}: unsafe path in the zip, skipped (never written)")
                continue
            if any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue  # __MACOSX/, .DS_Store and other hidden entries
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                notes.append(f"{path.name}:{name}: symbolic link in the zip, skipped")
                continue
            if name.lower().endswith(".zip"):
                notes.append(f"{path.name}:{name}: nested zip ignored (unpack it and add it separately)")
                continue
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(dest.resolve()):
                notes.append(f"{path.name}:{name}: unsafe path in the zip, skipped (never written)")
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(member) as src:
                    data = src.read(member.file_size + 1)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
                data = b""  # an unreadable member becomes an empty file: an error row naming it
                notes.append(f"{path.name}:{name}: could not be extracted ({exc})")
            if len(data) > member.file_size:
                raise ValueError(f"{path.name}:{name}: expands past its declared size (zip bomb guard)")
            written += len(data)
            if written > max_bytes:
                raise ValueError(f"{path.name}: more than {max_bytes / 1e6:.0f} MB uncompressed (zip bomb guard)")
            target.write_bytes(data)
    return dest


def labelled_items(root: Path) -> list[Item] | None:
    """The labelled folder layout (good/ + one folder per defect), or None when ``root`` is not one."""
    if not (root / "good").is_dir():
        return None
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name)):
        label = 0 if folder.name == "good" else 1
        for path in _files_under(folder):
            rel = path.relative_to(root).as_posix()
            mask = find_mask(root, folder.name, path.stem) if label else None
            items.append(Item(rel, path, label, folder.name, mask))
    return items


def _labelled_in(root: Path, prefix: str) -> list[Item] | None:
    """The labelled items of one folder or unpacked zip (names under ``prefix``), or None when it holds no
    labelled layout: ``good/`` at its top, one folder down (zips often hold one top folder) or in a ``test/``
    folder there (MVTec's category layout)."""
    tops = [p for p in root.iterdir() if p.is_dir() and not _hidden(p.name)]
    bases = [root] + (tops if len(tops) == 1 else [])
    for candidate in (c for base in bases for c in (base, base / "test")):
        items = labelled_items(candidate)
        if items is not None:
            if not items:
                raise ValueError(f"{prefix}: no files found in the labelled folders")
            return [Item(f"{prefix}/{it.name}", it.path, it.label, it.defect, it.mask) for it in items]
    return None


def collect_inputs(paths: Sequence[str | Path], workdir: Path, max_zip_files: int = MAX_ZIP_FILES,
                   max_zip_bytes: int = MAX_ZIP_BYTES) -> Inputs:
    """Files, folders (recursive) and zips -> one Item per file. A folder or zip with a ``good/`` folder (at
    its top, or one level down, or in a ``test/`` folder there: an MVTec category) is labelled; a set given in
    several such parts is labelled as a whole. Whatever is not labelled gets a note saying which rule it
    missed, and a run mixing labelled and unlabelled inputs keeps the labels in its rows but has no metrics
    (a note says so). Raises ValueError when nothing is there."""
    notes: list[str] = []
    roots: list[tuple[Path, str]] = []  # (folder, prefix for names)
    singles: list[Item] = []
    for i, raw in enumerate(paths):
        path = Path(raw)
        if path.is_dir():
            roots.append((path, path.name))
        elif path.is_file() and path.suffix.lower() == ".zip":
            roots.append((extract_zip(path, workdir / f"zip{i}", notes, max_zip_files, max_zip_bytes), path.name))
        elif path.is_file() or not path.exists():
            singles.append(Item(path.name, path))  # a missing file becomes an error row naming it
        else:
            notes.append(f"{raw}: not a file or folder, skipped")
    items, labelled, plain = list(singles), [], []
    for root, prefix in roots:
        found = _labelled_in(root, prefix)
        if found is None:
            plain.append(prefix)
            items += [Item(f"{prefix}/{p.relative_to(root).as_posix()}", p) for p in _files_under(root)]
            notes.append(f"{prefix}: unlabelled (no AUROC or other metrics): no good/ folder at its top, one folder "
                         "down or in a test/ folder there (MVTec); a labelled set has good/ plus one folder per "
                         "defect type")
        else:
            labelled.append(prefix)
            items += found
    if not items:
        raise ValueError("no input files found (empty folder or zip?); give image files, folders or .zip files")
    if singles:
        notes.append(f"{len(singles)} single file{'s' if len(singles) > 1 else ''} given: unlabelled (labels come "
                     "from folders: put the images in good/ and one folder per defect type, in a zip or folder)")
    if labelled and (plain or singles):
        notes.append(f"no metrics for this run: {', '.join(labelled)} labelled, the rest not (the labelled rows keep "
                     "their labels); for metrics give labelled zips or folders only")
    return Inputs(items, notes, labelled=bool(labelled) and not plain and not singles)


def shard(items: Sequence[Item], index: int, count: int) -> list[Item]:
    """Deterministic 1/count of the items by a hash of their name (stable when files are added)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be I/N with 0 <= I < N, got {index}/{count}")
    return [it for it in items if int(hashlib.sha1(it.name.encode()).hexdigest(), 16) % count == index]


# ---- decoding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    item: Item
    image: Image.Image | None
    pixels: torch.Tensor | None
    error: str
    seconds: float


def _read(item: Item, preprocess: Callable[[Image.Image], torch.Tensor]) -> Decoded:
    start = time.perf_counter()
    try:
        loaded = load_image(item.path, name=item.name)
        return Decoded(item, loaded.image, preprocess(loaded.image), "", time.perf_counter() - start)
    except ValueError as exc:
        return Decoded(item, None, None, str(exc), time.perf_counter() - start)


def decoded_batches(preprocess: Callable[[Image.Image], torch.Tensor], items: Sequence[Item],
                    batch_size: int) -> Iterator[list[Decoded]]:
    """Items read and preprocessed (e.g. ``WinClip.preprocess``) in a background thread, one batch ahead
    of the consumer. Closing the generator stops the thread."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")

    def read() -> Iterator[list[Decoded]]:
        for i in range(0, len(items), batch_size):
            yield [_read(it, preprocess) for it in items[i : i + batch_size]]

    yield from ahead_in_a_thread(read, 2, "winclip-decode")


_END = object()


def ahead_in_a_thread(make: Callable[[], Iterator[Any]], ahead: int, name: str) -> Iterator[Any]:
    """``make()``'s items, produced in a thread of its own, at most ``ahead`` items ahead of the consumer.

    What ``make`` sets up for its thread (e.g. a run's thread-local precision) holds for all of its items,
    whichever thread asks for the next one (Gradio moves a generator between worker threads); the thread
    runs in a copy of the caller's contextvars (Gradio's progress bar is found there). An exception in the
    thread is raised here. Closing the iterator stops the thread before its next item and waits for it."""
    out: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def produce() -> None:
        try:
            source = iter(make())
            try:
                while not stop.is_set():
                    try:
                        item = next(source)
                    except StopIteration:
                        break
                    out.put((item, None))
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # raised again in the consumer
            out.put((_END, exc))
            return
        out.put((_END, None))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(produce,), name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, error = out.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock the producer if it waits on a full queue
            try:
                out.get(timeout=0.05)
            except queue.Empty:
                pass


@dataclass(frozen=True)
class Encoded:
    """One batch through the model: every decoded item, the readable ones and their features."""

    batch: list[Decoded]
    readable: list[Decoded]
    features: Any  # what ``encode`` returned for the readable items' pixels; None when none was readable
    seconds: float  # encoding time of the batch


def encoded_batches(preprocess: Callable[[Image.Image], torch.Tensor], encode: Callable[[torch.Tensor], Any],
                    items: Sequence[Item], batch_size: int) -> Iterator[Encoded]:
    """The one batch-encoding loop (inspection, evaluation, prompt experiments): items decoded one batch
    ahead, then each batch's readable pixels, stacked (B, 3, H, W), through ``encode``."""
    for batch in decoded_batches(preprocess, items, batch_size):
        readable = [d for d in batch if d.pixels is not None]
        start = time.perf_counter()
        features = encode(torch.stack([d.pixels for d in readable])) if readable else None
        yield Encoded(batch, readable, features, time.perf_counter() - start)
