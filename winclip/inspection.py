"""Batch inspection: score a whole set of files (folders, zips) with any registered method, stream results,
summarise and report.

Images are decoded in a background thread while the previous batch is encoded (``inputs.encoded_batches``);
per image only its row, its patch-grid map (gh x gw floats, for pixel metrics) and a small thumbnail are kept,
never features. An unreadable file becomes an error row with its reason and the run goes on. Labels and masks
come from the folder layout (``winclip.inputs``); every number comes from ``winclip.metrics``.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import methods
from .datasets import load_mask
from .detector import ReferenceMemory, WinClip, upsample
from .inputs import Decoded, Inputs, Item, collect_inputs, decoded_batches, encoded_batches, shard
from .methods import Method, Setup
from .metrics import PIXEL_SIZE, curves, f1_optimal_threshold, image_metrics, pixel_metrics
from .rows import DEFAULT_OVERLAY_FORMAT, OverlayFiles, Row, draw_later, error_row, scored_row

__all__ = ["Inputs", "Item", "Row", "Summary", "collect_inputs", "inspect_stream", "iter_inspection",
           "resolve_threshold", "run_inspection", "shard", "summarise"]


# ---- scoring ---------------------------------------------------------------------------------------

Stage = Callable[[str, int, int], None]  # stage(what is happening, done, total): a whole-set run's progress


def inspect_stream(
    detector: WinClip,
    items: Sequence[Item],
    prototypes: torch.Tensor | None = None,
    references: ReferenceMemory | None = None,
    threshold: float = 0.5,
    batch_size: int = 8,
    overlays: OverlayFiles | None = None,
    thumbnails: bool = True,
    method: str | Method = "winclip",
    options: Any = None,
    setup: Setup | None = None,
    stage: Stage | None = None,
) -> Iterator[Row]:
    """Score items in batches with ``method`` (a registered name, see ``winclip.methods``), one Row per item
    in input order. ``setup`` (or prototypes, references and the method's ``options``) is what it scores with.

    Batch methods (WinCLIP): each batch's rows come as soon as it is done; a drawing thread makes thumbnails
    and overlay files. Whole-set methods (MuSc): the set is scored as a whole, so rows come after every image
    is encoded (and are drawn from a second decoding); ``stage(text, done, total)`` hears how far that has
    got (encoding image k of N, scoring the set, drawing k of N). Stopping the iteration stops the threads."""
    m = methods.get(method)
    setup = setup or m.setup(detector, prototypes, references, options)
    if m.whole_set:
        yield from _set_stream(m, setup, detector, items, threshold, batch_size, overlays, thumbnails, stage)
        return
    drawer = ThreadPoolExecutor(1, thread_name_prefix="winclip-draw")
    try:
        for enc in encoded_batches(detector.preprocess, lambda px: m.encode(detector, px, setup), items, batch_size):
            start = time.perf_counter()
            out = m.score(detector, enc.features, setup) if enc.readable else None
            per_image = (enc.seconds + time.perf_counter() - start) / max(len(enc.readable), 1)
            pending, j = [], 0
            for d in enc.batch:
                if d.pixels is None:
                    pending.append((error_row(d), None))
                    continue
                assert out is not None
                row = _row(d, out, j, threshold, per_image)
                pending.append((row, draw_later(drawer, d, out.maps[j] / out.display_scale, overlays, thumbnails)))
                j += 1
            for row, job in pending:
                if job is not None:
                    row.thumbnail = job.result()
                yield row
    finally:
        drawer.shutdown(wait=True)


def _row(d: Decoded, out: methods.Scores, j: int, threshold: float, seconds: float,
         size: tuple[int, int] | None = None) -> Row:
    return scored_row(d, threshold, seconds, out.maps[j], float(out.scores[j]),
                      None if out.zero_shot is None else float(out.zero_shot[j]),
                      None if out.few_shot is None else float(out.few_shot[j]), size)


def _set_stream(m: Method, setup: Setup, detector: WinClip, items: Sequence[Item], threshold: float,
                batch_size: int, overlays: OverlayFiles | None, thumbnails: bool, stage: Stage | None = None
                ) -> Iterator[Row]:
    """A whole-set method: encode every image once into the method's store, score the set, then decode
    again only to draw; ``stage`` hears each step."""
    tell = stage or (lambda text, done, total: None)
    store = m.store(len(items), setup)
    decoded, seconds = [], {}
    tell(f"encoding the images (0 of {len(items)})", 0, len(items))
    for enc in encoded_batches(detector.preprocess, lambda px: m.encode(detector, px, setup), items, batch_size):
        if enc.features is not None:
            store.add(enc.features)
        for d in enc.batch:
            seconds[d.item.name] = d.seconds + enc.seconds / max(len(enc.readable), 1)
            decoded.append((d.item, d.error, None if d.image is None else d.image.size))
        tell(f"encoded {len(decoded)} of {len(items)} images", len(decoded), len(items))
    n_good = sum(size is not None for _, _, size in decoded)
    m.check_count(n_good)
    tell(f"scoring the {n_good} images against each other", 0, 1)
    start = time.perf_counter()
    out = m.score(detector, store, setup)
    scoring = (time.perf_counter() - start) / n_good
    del store
    rows: list[Row] = []
    j = 0
    for item, error, size in decoded:
        if size is None:
            rows.append(error_row(Decoded(item, None, None, error, seconds[item.name])))
            continue
        rows.append(_row(Decoded(item, None, None, "", seconds[item.name]), out, j, threshold, scoring, size))
        j += 1
    if thumbnails or overlays is not None:  # decode again to draw, in order, one batch ahead
        drawer = ThreadPoolExecutor(1, thread_name_prefix="winclip-draw")
        try:
            by_name = {r.file: r for r in rows}
            readable = [it for it, _, size in decoded if size is not None]
            drawn = 0
            for batch in decoded_batches(lambda image: None, readable, batch_size):  # images only: no model input
                jobs = [(by_name[d.item.name], draw_later(drawer, d, torch.from_numpy(
                    by_name[d.item.name].grid_map / out.display_scale), overlays, thumbnails)) for d in batch]
                for row, job in jobs:
                    if job is not None:
                        row.thumbnail = job.result()
                drawn += len(jobs)
                tell(f"drew {drawn} of {len(readable)} maps", drawn, len(readable))
        finally:
            drawer.shutdown(wait=True)
    yield from rows


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


def resolve_threshold(detector: WinClip, threshold: float | str, setup: Setup, method: str | Method = "winclip"
                      ) -> dict:
    """A number as given, or "auto": the method's own (WinCLIP: the highest leave-one-out score of the normal
    shots, K >= 2, else 0.5; MuSc: 0.5 on its set-relative score)."""
    if threshold == "auto":
        return methods.get(method).auto_threshold(detector, setup)
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be between 0 and 1 or 'auto', got {threshold}")
    return {"value": value, "how": "given"}


def run_settings(detector: WinClip, method: str | Method, object_name: str, defect_words: Sequence[str],
                 references: ReferenceMemory | None, **extra: Any) -> dict:
    """The ``settings`` of summary.json (the CLI and the app write the same keys): what ran, on what."""
    m = methods.get(method)
    source = detector.source
    runtime = source.runtime if source is not None else None
    return {"method": m.name, "object": object_name, "defect_words": list(defect_words),
            "shots": references.shots if references is not None and m.uses_references else 0,
            "model": source.model_name if source else "", "pretrained": str(source.pretrained) if source else "",
            "device": str(detector.backbone.device), "precision": m.precision(detector) or detector.backbone.precision,
            "checked": bool(runtime and runtime.candidate), "why": runtime.reason if runtime else "",
            "kernels": detector.backbone.kernel_path(), "scales": list(detector.config.window_scales), **extra}


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
    method: str | Method = "winclip",
    options: Any = None,
    chosen: dict | None = None,
    score: Callable[[Sequence[Item], float, OverlayFiles | None], Iterator[Row]] | None = None,
    stop: Callable[[], bool] | None = None,
    overlay_format: str = DEFAULT_OVERLAY_FORMAT,
) -> Iterator[Row | Summary]:
    """Yield each Row as it is scored (results.csv written row by row), then the Summary once
    summary.json and report.html are written. Closing the iterator early stops the run cleanly.

    ``chosen`` (``resolve_threshold``'s answer) and ``score(items, threshold, overlays) -> rows`` replace the
    threshold resolution and ``inspect_stream``: the app on ZeroGPU scores in GPU calls of bounded size
    while the files, the summary and the report are made here. ``stop()`` is asked after each row: when
    it says True, scoring ends there and the summary and report cover the rows so far, saying so."""
    import csv
    import json

    from .report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_files = OverlayFiles(out_dir / "overlays", overlay_format) if overlays else None
    setup = None
    if score is None:
        setup = methods.get(method).setup(detector, prototypes, references, options)
    if chosen is None:
        assert setup is not None, "give the threshold chosen (chosen=) with score="
        chosen = resolve_threshold(detector, threshold, setup, method)
    rows: list[Row] = []
    start = time.perf_counter()
    with open(out_dir / "results.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, Row.CSV_FIELDS)
        writer.writeheader()
        rows_in = (score(inputs.items, chosen["value"], overlay_files) if score is not None else inspect_stream(
            detector, inputs.items, threshold=chosen["value"], batch_size=batch_size, overlays=overlay_files,
            method=method, setup=setup))
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
                   overlays: bool = False, settings: dict | None = None, progress=None,
                   method: str | Method = "winclip", options: Any = None,
                   overlay_format: str = DEFAULT_OVERLAY_FORMAT) -> tuple[Summary, list[Row]]:
    """The whole run (see ``iter_inspection``); ``progress(row)`` is called after each file."""
    return finish_run(iter_inspection(detector, inputs, out_dir, prototypes, references, threshold, batch_size,
                                      overlays, settings, method, options, overlay_format=overlay_format), progress)


def finish_run(results: Iterator[Row | Summary], progress: Callable[[Row], None] | None = None
               ) -> tuple[Summary, list[Row]]:
    """Every row of a run (``progress(row)`` after each), then its Summary: (summary, rows)."""
    rows: list[Row] = []
    for result in results:
        if isinstance(result, Summary):
            return result, rows
        rows.append(result)
        if progress is not None:
            progress(result)
    raise AssertionError("a run ends with its summary")
