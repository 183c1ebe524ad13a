"""Batch inspection: score a whole set of files (folders, zips), stream results, summarise and report.

Images are decoded in a background thread while the previous batch is encoded; per image only its row,
its patch-grid map (gh x gw floats, for pixel metrics) and a small thumbnail are kept, never features.
An unreadable file becomes an error row with its reason and the run goes on. Labels come from the
same folder layout as ``evaluate --dataset folder`` (``good/`` + one folder per defect type), masks
from ``masks/<defect>/<stem>.png`` or the MVTec layout ``../ground_truth/<defect>/<stem>_mask.png``;
every number comes from ``winclip.metrics``.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .datasets import find_mask, load_mask
from .detector import ReferenceMemory, WinClip, upsample
from .images import load_image
from .metrics import curves, f1_optimal_threshold, image_metrics, pixel_metrics
from .musc import MIN_IMAGES, BlockTokens, MuscConfig, MuscOutput, quarter_layers, score_batch
from .visualize import overlay

MAX_ZIP_FILES = 20_000  # entries in one zip (CLI); the app sets its own, smaller limit
MAX_ZIP_BYTES = 4 << 30  # total uncompressed bytes of one zip, checked before extracting
THUMB_SIDE = 192  # report thumbnails (JPEG in report.html)
PIXEL_SIZE = 256  # pixel metrics at this square resolution, as in evaluate
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


# ---- collecting inputs ------------------------------------------------------------------------------


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


def collect_inputs(paths: Sequence[str | Path], workdir: Path, max_zip_files: int = MAX_ZIP_FILES,
                   max_zip_bytes: int = MAX_ZIP_BYTES) -> Inputs:
    """Files, folders (recursive) and zips -> one Item per file. A single folder or zip with a ``good/``
    folder (at its top, or one level down, or in a ``test/`` folder there: an MVTec category) is labelled;
    otherwise a note says which rule it missed. Raises ValueError when nothing is there."""
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
    if len(roots) == 1 and not singles:
        root, prefix = roots[0]
        tops = [p for p in root.iterdir() if p.is_dir() and not _hidden(p.name)]
        bases = [root] + (tops if len(tops) == 1 else [])  # zips often hold one top folder
        candidates = [c for base in bases for c in (base, base / "test")]  # test/: MVTec's category layout
        for candidate in candidates:
            items = labelled_items(candidate)
            if items is not None:
                items = [Item(f"{prefix}/{it.name}", it.path, it.label, it.defect, it.mask) for it in items]
                if not items:
                    raise ValueError(f"{prefix}: no files found in the labelled folders")
                return Inputs(items, notes, labelled=True)
        notes.append(f"{prefix}: unlabelled (no AUROC or other metrics): no good/ folder at its top, one folder down "
                     "or in a test/ folder there (MVTec); a labelled set has good/ plus one folder per defect type")
    items = list(singles)
    for root, prefix in roots:
        items += [Item(f"{prefix}/{p.relative_to(root).as_posix()}", p) for p in _files_under(root)]
    if not items:
        raise ValueError("no input files found (empty folder or zip?); give image files, folders or .zip files")
    return Inputs(items, notes, labelled=False)


def shard(items: Sequence[Item], index: int, count: int) -> list[Item]:
    """Deterministic 1/count of the items by a hash of their name (stable when files are added)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be I/N with 0 <= I < N, got {index}/{count}")
    return [it for it in items if int(hashlib.sha1(it.name.encode()).hexdigest(), 16) % count == index]


# ---- scoring ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    item: Item
    image: Image.Image | None
    pixels: torch.Tensor | None
    error: str
    seconds: float


def _decode(detector: WinClip, item: Item) -> Decoded:
    start = time.perf_counter()
    try:
        loaded = load_image(item.path, name=item.name)
        return Decoded(item, loaded.image, detector.preprocess(loaded.image), "", time.perf_counter() - start)
    except ValueError as exc:
        return Decoded(item, None, None, str(exc), time.perf_counter() - start)


def decoded_batches(detector: WinClip, items: Sequence[Item], batch_size: int) -> Iterator[list[Decoded]]:
    """Items decoded and preprocessed in a background thread, one batch ahead of the consumer.
    Closing the generator stops the thread."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    batches: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def decoder() -> None:
        for i in range(0, len(items), batch_size):
            if stop.is_set():
                return
            batches.put([_decode(detector, it) for it in items[i : i + batch_size]])
        batches.put(None)

    thread = threading.Thread(target=decoder, name="winclip-decode", daemon=True)
    thread.start()
    try:
        while (batch := batches.get()) is not None:
            yield batch
    finally:
        stop.set()
        while thread.is_alive():  # unblock the decoder if it waits on a full queue
            try:
                batches.get(timeout=0.05)
            except queue.Empty:
                pass


def _error_row(d: Decoded) -> Row:
    return Row(d.item.name, "error", error=d.error, seconds=d.seconds, label=d.item.label, defect=d.item.defect or "")


def inspect_stream(
    detector: WinClip,
    items: Sequence[Item],
    prototypes: torch.Tensor | None = None,
    references: ReferenceMemory | None = None,
    threshold: float = 0.5,
    batch_size: int = 8,
    overlay_dir: Path | None = None,
    thumbnails: bool = True,
    method: str = "winclip",
    musc: MuscConfig | None = None,
) -> Iterator[Row]:
    """Score items in batches, one Row per item in input order.

    WinCLIP: each batch's rows come as soon as it is done. A decoder thread reads and preprocesses the
    next batch while this one is encoded; a drawing thread makes thumbnails and overlay files. Stopping
    the iteration stops both. MuSc (``method="musc"``): the set is scored as a whole (see ``winclip.musc``),
    so rows come after every image is encoded.
    """
    if method == "musc":
        musc = musc or MuscConfig(layers=quarter_layers(detector.backbone.n_blocks))  # blocks of this tower
        yield from _musc_stream(detector, items, threshold, batch_size, overlay_dir, thumbnails, musc)
        return
    if method != "winclip":
        raise ValueError(f"method must be 'winclip' or 'musc', got {method!r}")
    drawer = ThreadPoolExecutor(1, thread_name_prefix="winclip-draw")
    try:
        for batch in decoded_batches(detector, items, batch_size):
            start = time.perf_counter()
            good = [d for d in batch if d.pixels is not None]
            out = None
            if good:
                feats = detector.encode(torch.stack([d.pixels for d in good]))
                out = detector.score(feats, prototypes, references=references)
            per_image = (time.perf_counter() - start) / max(len(good), 1)
            pending: list[tuple[Row, Future | None]] = []
            j = 0
            for d in batch:
                if d.pixels is None:
                    pending.append((_error_row(d), None))
                    continue
                assert out is not None
                row, job = _row(d, threshold, per_image, overlay_dir, thumbnails, drawer, out.grid_maps[j].float().cpu(),
                                float(out.image_scores[j]), float(out.zero_shot_scores[j]),
                                None if out.few_shot_maps is None else float(out.few_shot_maps[j].amax()))
                pending.append((row, job))
                j += 1
            for row, job in pending:
                if job is not None:
                    row.thumbnail = job.result()
                yield row
    finally:
        drawer.shutdown(wait=True)


def musc_precision(detector: WinClip) -> str | None:
    """The precision MuSc's backbone pass runs in: fp32 where ``auto`` chose the precision (a candidate,
    checked or not yet; see winclip.precision_check); None = the detector's own (an explicit precision)."""
    runtime = detector.source.runtime if detector.source is not None else None
    return "fp32" if runtime is not None and runtime.candidate else None


def musc_features(detector: WinClip, pixels: torch.Tensor, layers: tuple[int, ...],
                  precision: str | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """One batch for MuSc, (B, 3, H, W) -> ({block: (B, P, D)} float patch tokens, (B, E) class embeddings),
    from one pass over the full image only (MuSc uses no windows), in ``precision`` (default
    ``musc_precision``: fp32 under auto)."""
    precision = precision or musc_precision(detector)
    with detector.backbone.precision_for_this_thread(precision):
        full, _ = detector.backbone.encode_all(pixels, {}, layers=layers)
    assert full.layer_tokens is not None
    return {k: v.float() for k, v in full.layer_tokens.items()}, full.image_embeddings


def musc_scores(store: BlockTokens, detector: WinClip, config: MuscConfig) -> MuscOutput:
    """MuSc's mutual scoring of the stored set, where it was encoded (a GPU too), returned on the CPU."""
    out = score_batch(*store.tensors(), detector.grid, detector.image_size, config)
    return MuscOutput(out.maps.cpu(), out.raw_scores.cpu(), out.scores.cpu())


def _musc_stream(detector: WinClip, items: Sequence[Item], threshold: float, batch_size: int,
                 overlay_dir: Path | None, thumbnails: bool, config: MuscConfig) -> Iterator[Row]:
    """Encode every image once (block tokens and class embedding from one pass), score the set, then
    decode again only to draw. Maps are shown scaled by the set's largest patch score."""
    store = BlockTokens(config.layers, len(items))
    decoded, seconds = [], {}
    for batch in decoded_batches(detector, items, batch_size):
        good = [d for d in batch if d.pixels is not None]
        start = time.perf_counter()
        if good:
            store.add(*musc_features(detector, torch.stack([d.pixels for d in good]), config.layers))
        for d in batch:
            seconds[d.item.name] = d.seconds + (time.perf_counter() - start) / max(len(good), 1)
            decoded.append((d.item, d.error, None if d.image is None else d.image.size))
    n_good = sum(size is not None for _, _, size in decoded)
    if n_good < MIN_IMAGES:
        raise ValueError(f"MuSc scores a set against itself and needs at least {MIN_IMAGES} readable images; "
                         f"got {n_good}. Use WinCLIP for fewer images.")
    start = time.perf_counter()
    out = musc_scores(store, detector, config)
    scoring = (time.perf_counter() - start) / n_good
    del store
    scale = float(out.maps.max()) or 1.0
    rows: list[Row] = []
    j = 0
    for item, error, size in decoded:
        if size is None:
            rows.append(_error_row(Decoded(item, None, None, error, seconds[item.name])))
            continue
        grid = out.maps[j].float()
        rows.append(_row(Decoded(item, None, None, "", seconds[item.name]), threshold, scoring, None, False, None,
                         grid, float(out.scores[j]), None, None, size=size)[0])
        j += 1
    if thumbnails or overlay_dir is not None:  # decode again to draw, in order, one batch ahead
        drawer = ThreadPoolExecutor(1, thread_name_prefix="winclip-draw")
        try:
            by_name = {r.file: r for r in rows}
            readable = [it for it, _, size in decoded if size is not None]
            for batch in decoded_batches(detector, readable, batch_size):
                jobs = [(by_name[d.item.name], drawer.submit(_draw, d.image, torch.from_numpy(
                    by_name[d.item.name].grid_map / scale), d.item.name, overlay_dir, thumbnails))
                    for d in batch if d.image is not None]
                for row, job in jobs:
                    row.thumbnail = job.result()
        finally:
            drawer.shutdown(wait=True)
    yield from rows


def _row(d: Decoded, threshold: float, seconds: float, overlay_dir: Path | None, thumbnails: bool,
         drawer: ThreadPoolExecutor | None, grid: torch.Tensor, score: float, zero_shot: float | None,
         few_shot: float | None, size: tuple[int, int] | None = None) -> tuple[Row, Future | None]:
    width, height = size if size is not None else d.image.size  # type: ignore[union-attr]
    gh, gw = grid.shape
    py, px = divmod(int(grid.argmax()), gw)  # peak patch -> its centre in image pixels
    row = Row(
        d.item.name, "ok", score=score, verdict="anomalous" if score >= threshold else "normal",
        zero_shot_score=zero_shot, few_shot_score=few_shot,
        peak_x=int((px + 0.5) * width / gw), peak_y=int((py + 0.5) * height / gh),
        width=width, height=height, seconds=seconds + d.seconds,
        label=d.item.label, defect=d.item.defect or "", grid_map=grid.numpy(),
    )
    job = None
    if drawer is not None and d.image is not None and (thumbnails or overlay_dir is not None):
        job = drawer.submit(_draw, d.image, grid, d.item.name, overlay_dir, thumbnails)
    return row, job


def overlay_filename(name: str) -> str:
    """'washer.zip/good/001.png' -> 'washer.zip__good__001.png' (one flat folder, names stay unique)."""
    return name.replace("/", "__").rsplit(".", 1)[0] + ".png"


def _draw(image: Image.Image, grid: torch.Tensor, name: str, overlay_dir: Path | None, thumbnails: bool) -> bytes:
    if overlay_dir is not None:
        full = upsample(grid[None], (image.height, image.width))[0].clamp(0, 1).numpy()
        target = overlay_dir / overlay_filename(name)
        overlay(image, full).save(target, format="PNG")
    if not thumbnails:
        return b""
    small = image.copy()
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    heat = upsample(grid[None], (small.height, small.width))[0].clamp(0, 1).numpy()
    buffer = io.BytesIO()
    overlay(small, heat).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


# ---- summary ---------------------------------------------------------------------------------------


@dataclass
class Summary:
    counts: dict
    threshold: dict
    timing: dict
    metrics: dict  # image / pixel metrics, or the reason they were skipped
    curves: dict  # roc / pr points for the report, when labelled
    settings: dict
    notes: list[str]

    def json(self) -> dict:
        return {"counts": self.counts, "threshold": self.threshold, "timing": self.timing, "metrics": self.metrics,
                "settings": self.settings, "notes": self.notes}


def summarise(rows: Sequence[Row], labelled: bool, threshold: dict, seconds: float, settings: dict,
              notes: Sequence[str] = (), pixel_size: int = PIXEL_SIZE,
              items: dict[str, Item] | None = None) -> Summary:
    """Counts, timing, and (labelled) image metrics, pixel metrics with masks, ROC/PR points."""
    scored = [r for r in rows if r.status == "ok"]
    counts = {"files": len(rows), "scored": len(scored), "errors": len(rows) - len(scored),
              "anomalous": sum(r.verdict == "anomalous" for r in scored)}
    timing = {"seconds": round(seconds, 3), "images_per_s": round(len(scored) / seconds, 3) if seconds else None}
    metrics: dict = {}
    plotted: dict = {}
    if labelled:
        labels = np.array([r.label for r in scored])
        scores = np.array([r.score for r in scored])
        if len(scored) == 0 or labels.min() == labels.max():
            only = "none" if len(scored) == 0 else ("anomalous" if labels.max() else "good")
            metrics["skipped"] = (f"labelled, but only one class among the scored images ({only}); metrics need "
                                  "good and defective images")
        else:
            metrics["image"] = image_metrics(scores, labels)
            metrics["f1_optimal_threshold"] = f1_optimal_threshold(labels, scores)
            plotted = curves(scores, labels)
            masked = items is not None and any(items[r.file].mask is not None for r in scored if r.label == 1)
            if masked:
                size = (pixel_size, pixel_size)
                maps = np.concatenate([upsample(torch.from_numpy(np.stack([r.grid_map for r in scored[i:i + 64]])),
                                                size).numpy() for i in range(0, len(scored), 64)])
                masks = np.stack([load_mask(items[r.file].mask, size) for r in scored])
                metrics["pixel"] = pixel_metrics(maps, masks)
            else:
                metrics["pixel_skipped"] = "no masks found (masks/<defect>/<stem>.png or ../ground_truth/...)"
    return Summary(counts, threshold, timing, metrics, plotted, settings, list(notes))



# ---- a whole run -----------------------------------------------------------------------------------


def resolve_threshold(detector: WinClip, threshold: float | str, references: ReferenceMemory | None,
                      prototypes: torch.Tensor | None, method: str = "winclip") -> dict:
    """A number as given, or "auto": the highest leave-one-out score of the normal shots (K >= 2), else 0.5
    (MuSc: 0.5 on its set-relative score)."""
    if threshold == "auto" and method == "musc":
        return {"value": 0.5, "how": "auto: 0.5 on MuSc's re-scored score (min-max over this set: 0 = least, "
                "1 = most anomalous image)"}
    if threshold != "auto":
        value = float(threshold)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1 or 'auto', got {threshold}")
        return {"value": value, "how": "given"}
    if references is not None and references.shots >= 2:
        value = max(detector.leave_one_out_scores(references, prototypes))
        return {"value": value, "how": f"auto: highest leave-one-out score of the {references.shots} normal shots"}
    return {"value": 0.5, "how": "auto: 0.5 (give at least 2 normal images for a threshold from normal shots)"}


def iter_inspection(
    detector: WinClip,
    inputs: Inputs,
    out_dir: Path,
    prototypes: torch.Tensor | None = None,
    references: ReferenceMemory | None = None,
    threshold: float | str = "auto",
    batch_size: int = 8,
    overlays: bool = False,
    settings: dict | None = None,
    method: str = "winclip",
    musc: MuscConfig | None = None,
    chosen: dict | None = None,
    score: Callable[[Sequence[Item], float], Iterator[Row]] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[Row | Summary]:
    """Yield each Row as it is scored (results.csv written row by row), then the Summary once
    summary.json and report.html are written. Closing the iterator early stops the run cleanly.

    ``chosen`` (``resolve_threshold``'s answer) and ``score(items, threshold) -> rows`` replace the
    threshold resolution and ``inspect_stream``: the app on ZeroGPU scores in GPU calls of bounded size
    while the files, the summary and the report are made here. ``stop()`` is asked after each row: when
    it says True, scoring ends there and the summary and report cover the rows so far, saying so."""
    import csv
    import json

    from .report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_dir = out_dir / "overlays" if overlays else None
    if overlay_dir is not None:
        overlay_dir.mkdir(exist_ok=True)
    if chosen is None:
        chosen = resolve_threshold(detector, threshold, None if method == "musc" else references, prototypes, method)
    rows: list[Row] = []
    start = time.perf_counter()
    with open(out_dir / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, Row.CSV_FIELDS)
        writer.writeheader()
        rows_in = (score(inputs.items, chosen["value"]) if score is not None else inspect_stream(
            detector, inputs.items, prototypes, references, chosen["value"], batch_size, overlay_dir, method=method,
            musc=musc))
        stopped = False
        try:
            for row in rows_in:
                writer.writerow(row.csv())
                fh.flush()  # an interrupted run keeps every finished row
                rows.append(row)
                yield row
                if stop is not None and stop() and len(rows) < len(inputs.items):
                    stopped = True
                    break
        finally:
            close = getattr(rows_in, "close", None)
            if close is not None:
                close()  # ends the decoder and drawing threads (and, on ZeroGPU, asks for no further chunk)
    seconds = time.perf_counter() - start
    items = {it.name: it for it in inputs.items}
    notes = list(inputs.notes)
    if stopped:
        notes.insert(0, f"stopped after {len(rows)} of {len(inputs.items)} files: the results cover those only")
        items = {r.file: items[r.file] for r in rows if r.file in items}
    summary = summarise(rows, inputs.labelled, chosen, seconds, settings or {}, notes, items=items)
    (out_dir / "summary.json").write_text(json.dumps(summary.json(), indent=1))
    write_report(out_dir / "report.html", rows, summary)
    yield summary


def run_inspection(detector: WinClip, inputs: Inputs, out_dir: Path, prototypes: torch.Tensor | None = None,
                   references: ReferenceMemory | None = None, threshold: float | str = "auto", batch_size: int = 8,
                   overlays: bool = False, settings: dict | None = None, progress=None, method: str = "winclip",
                   musc: MuscConfig | None = None) -> tuple[Summary, list[Row]]:
    """The whole run (see ``iter_inspection``); ``progress(row)`` is called after each file."""
    rows: list[Row] = []
    for result in iter_inspection(detector, inputs, out_dir, prototypes, references, threshold, batch_size,
                                  overlays, settings, method, musc):
        if isinstance(result, Summary):
            return result, rows
        rows.append(result)
        if progress is not None:
            progress(result)
    raise AssertionError("iter_inspection ends with its summary")
