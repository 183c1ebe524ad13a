"""The paper's evaluation protocol (§5): per category zero-shot and k-shot (k references drawn from
train/good by seed, mean ± std over seeds), image and pixel metrics, per-category JSON (resumable),
and a Markdown + CSV report beside the published WinCLIP numbers.

Test-image features are computed once per category and reused for every shot count and seed: only the
reference memories change between runs, exactly as WinCLIP+ defines them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import methods
from .config import WinClipConfig
from .datasets import Category, load_mask, read_image
from .detector import WinClip, upsample
from .inputs import Item, encoded_batches
from .methods import Method, MuscMethod, Scores, Setup, WinClipMethod
from .metrics import image_metrics, pixel_metrics
from .prompting import prompt_data

# Paper Tables 3 and 8 as config changes. Table 3 (d) multi-crop is not implemented.
ABLATIONS: dict[str, dict] = {
    "winclip": {},
    "one_class": {"scoring": "one_class", "state_ensemble": False, "template_ensemble": False},  # Table 3 (a)
    "two_class": {"state_ensemble": False, "template_ensemble": False},  # Table 3 (a)
    "state_ensemble": {"template_ensemble": False},  # Table 3 (b); (c) adds templates = "winclip"
    "no_image_scale": {"image_scale": False},  # Table 8
    "no_mid_scale": {"window_scales": (2,)},
    "no_small_scale": {"window_scales": (3,)},
    "no_harmonic": {"aggregation": "arithmetic"},
}

PUBLISHED, PUBLISHED_MUSC = WinClipMethod.published, MuscMethod.published  # the methods' own tables
METRICS = ("auroc", "aupr", "f1_max", "pauroc", "pro", "pixel_f1_max")


@dataclass(frozen=True)
class EvalSettings:
    shots: tuple[int, ...] = (0, 1, 2, 4)
    seeds: int = 5  # k-shot runs per k; zero-shot is deterministic and runs once
    pixel_size: int = 256  # maps and masks are compared at this square resolution
    batch_size: int = 8
    defect_words: str = "none"  # "none" | "file" (prompts/defect_words.json) | "dataset" (defect folder names)
    ablation: str = "winclip"
    model: str = ""
    pretrained: str = ""
    precision: str = "fp32"
    method: str = "winclip"  # a registered method (winclip.methods), e.g. "musc": each test set scored against itself

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def object_name(category: str) -> str:
    """'metal_nut' -> 'metal nut', 'pcb4' -> 'pcb' (the object, not the dataset's folder id)."""
    return re.sub(r"\d+$", "", category.replace("_", " ")).strip() or category


def defect_words_for(category: Category, mode: str) -> tuple[str, ...]:
    if mode == "none":
        return ()
    if mode == "dataset":
        return tuple(d.replace("_", " ") for d in category.defect_types if d not in ("anomaly", "combined"))
    if mode == "file":
        table = json.loads(prompt_data("defect_words.json").read_text(encoding="utf-8"))
        return tuple(table.get(category.dataset, {}).get(category.name, ()))
    raise ValueError(f"defect words mode must be none, file or dataset, got {mode!r}")


def _progress(text: str) -> None:
    print(f"\r{text[:110]:<110}", end="", file=sys.stderr, flush=True)


def evaluate_category(
    detector: WinClip,
    category: Category,
    settings: EvalSettings,
    progress: Callable[[str], None] = _progress,
) -> dict:
    """All shot counts and seeds for one category -> JSON-ready results, with ``settings.method``.

    The test set is encoded once; each (shots, seed) run only scores it with other references (WinCLIP+).
    A whole-set method (MuSc) scores the test set against itself: one run, zero shots."""
    method = methods.get(settings.method)
    start = time.perf_counter()
    words = defect_words_for(category, settings.defect_words) if method.uses_text else ()
    detector.set_prompts(object_name(category.name), words)
    samples = list(category.test)
    if not samples:
        raise ValueError(f"{category.name}: no test images")
    setup = method.setup(detector, detector.prototypes, None, dataset=category.dataset)
    encoded = _encode_test_set(method, detector, samples, setup, settings.batch_size,
                               lambda done: progress(f"{category.name}: features {done}/{len(samples)}"))
    size = (settings.pixel_size, settings.pixel_size)
    labels = np.array([s.label for s in samples])
    masks = np.stack([load_mask(s.mask, size) for s in samples]) if category.has_masks else None
    results = {"category": category.name, "dataset": category.dataset, "object": object_name(category.name),
               "defect_words": list(words), "n_test": len(samples), "n_anomalous": int(labels.sum()),
               "settings": asdict(settings), "key": settings.key(), **method.describe(setup), "shots": {}}
    for shots in settings.shots if method.uses_references else (0,):
        runs = []
        for seed in range(settings.seeds if shots else 1):
            progress(f"{category.name}: {method.title} {shots}-shot seed {seed + 1}/{settings.seeds if shots else 1}")
            refs = category.references(shots, seed) if shots else []
            memory = detector.memory_for([read_image(p) for p in refs]) if refs else None
            out = _score_encoded(method, detector, encoded, replace(setup, references=memory))
            keep = np.array([s.path not in set(refs) for s in samples])  # folder layout: refs come from good/
            run = {"seed": seed, "references": [str(p) for p in refs]}
            run.update(image_metrics(out.scores.numpy()[keep], labels[keep]))
            if masks is not None:
                pixel = pixel_metrics(upsample(out.maps, size).numpy()[keep], masks[keep])
                run.update({"pauroc": pixel["pauroc"], "pro": pixel["pro"], "pixel_f1_max": pixel["f1_max"]})
            runs.append(run)
        summary = {m: {"mean": float(np.mean([r[m] for r in runs])), "std": float(np.std([r[m] for r in runs]))}
                   for m in METRICS if m in runs[0]}
        results["shots"][str(shots)] = {"summary": summary, "runs": runs}
    results["seconds"] = time.perf_counter() - start
    return results


def _encode_test_set(method: Method, detector: WinClip, samples: Sequence, setup: Setup, batch_size: int,
                     progress: Callable[[int], None]) -> Any:
    """The test images through the method's encoder once: a list of per-batch features, or (whole-set
    methods) the method's store. An unreadable test image is an error here: a benchmark must be complete."""
    items = [Item(str(s.path), s.path, s.label) for s in samples]
    store = method.store(len(items), setup) if method.whole_set else None
    parts, done = [], 0
    for enc in encoded_batches(detector.preprocess, lambda px: method.encode(detector, px, setup), items, batch_size):
        bad = [d.error for d in enc.batch if d.pixels is None]
        if bad:
            raise ValueError(f"unreadable test image: {bad[0]}")
        store.add(enc.features) if store is not None else parts.append(enc.features)
        done += len(enc.batch)
        progress(done)
    if store is not None:
        method.check_count(len(items))
    return store if store is not None else parts


def _score_encoded(method: Method, detector: WinClip, encoded: Any, setup: Setup) -> Scores:
    if method.whole_set:
        return method.score(detector, encoded, setup)
    return Scores.concat([method.score(detector, part, setup) for part in encoded])


def run_evaluation(
    detector: WinClip,
    categories: Sequence[Category],
    settings: EvalSettings,
    out_dir: str | Path,
    progress: Callable[[str], None] = _progress,
) -> Path:
    """Evaluate categories (skipping those already done with the same settings), then write the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = detector.config
    detector = detector.with_config(evaluation_config(base, settings.ablation))
    for i, category in enumerate(categories):
        path = out / f"{category.name}.json"
        if path.is_file() and json.loads(path.read_text()).get("key") == settings.key():
            progress(f"[{i + 1}/{len(categories)}] {category.name}: done before, kept")
            continue
        result = evaluate_category(detector, category, settings,
                                   lambda text: progress(f"[{i + 1}/{len(categories)}] {text}"))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)  # a half-written file never counts as done
    print(file=sys.stderr)
    return write_report(out, [c.name for c in categories], settings)


def write_report(out_dir: str | Path, categories: Sequence[str], settings: EvalSettings) -> Path:
    """report.md and results.csv, recomputed from the per-category JSON files."""
    out = Path(out_dir)
    results = [json.loads((out / f"{c}.json").read_text()) for c in categories]
    dataset = results[0]["dataset"]
    rows = []
    for r in results:
        for shots, block in r["shots"].items():
            for metric, v in block["summary"].items():
                rows.append({"category": r["category"], "shots": int(shots), "metric": metric,
                             "mean": v["mean"] * 100, "std": v["std"] * 100, "runs": len(block["runs"])})
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["category", "shots", "metric", "mean", "std", "runs"])
        writer.writeheader()
        writer.writerows({**row, "mean": f"{row['mean']:.2f}", "std": f"{row['std']:.2f}"} for row in rows)
    shots_list = sorted({row["shots"] for row in rows})
    metrics = [m for m in METRICS if any(row["metric"] == m for row in rows)]
    method = methods.get(settings.method)
    title = (f"{method.title} evaluation" + (" (zero-shot, each category's test set as the batch)"
                                              if method.whole_set else ""))
    lines = [f"# {title}: {dataset}, ablation `{settings.ablation}`", "",
             f"Model {settings.model} / {settings.pretrained} ({settings.precision}); pixel metrics at "
             f"{settings.pixel_size}x{settings.pixel_size}; k-shot: mean ± std over {settings.seeds} seeds; "
             f"defect words: {settings.defect_words}. Values in %. Recomputed from the per-category JSON files.", ""]
    means: dict[tuple[int, str], float] = {}
    for shots in shots_list:
        lines += [f"## {shots}-shot" + f" ({method.shots_heading(shots)})", "",
                  "| category | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for r in results:
            cells = []
            for m in metrics:
                v = r["shots"].get(str(shots), {}).get("summary", {}).get(m)
                cells.append("–" if v is None else
                             f"{v['mean'] * 100:.1f}" + (f" ± {v['std'] * 100:.1f}" if shots else ""))
            lines.append(f"| {r['category']} | " + " | ".join(cells) + " |")
        cells = []
        for m in metrics:
            vals = [row["mean"] for row in rows if row["shots"] == shots and row["metric"] == m]
            means[(shots, m)] = float(np.mean(vals)) if vals else float("nan")
            cells.append(f"**{means[(shots, m)]:.1f}**" if vals else "–")
        lines += ["| **mean** | " + " | ".join(cells) + " |", ""]
    lines += ["## Against the published numbers (mean over categories)" + (
                  f" — {method.published_source}" if method.published_source else ""), "",
              "| setting | metric | ours | published | difference |", "|---|---|---|---|---|"]
    published = method.published
    for shots in shots_list:
        for m in metrics:
            paper = published.get((dataset, shots), {}).get(m)
            if paper is not None and (shots, m) in means:
                lines.append(f"| {shots}-shot | {m} | {means[(shots, m)]:.1f} | {paper:.1f} | "
                             f"{means[(shots, m)] - paper:+.1f} |")
    if dataset not in ("mvtec", "visa") or len(categories) < (15 if dataset == "mvtec" else 12):
        lines += ["", "_Not the full benchmark: the published means are over all categories._"]
    if method.whole_set:
        lines += ["", f"_{method.title} scores each test set against itself (no labels, no training images): its "
                  "numbers use the test images as the unlabelled batch._"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def evaluation_config(base: WinClipConfig, ablation: str) -> WinClipConfig:
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
    return replace(base, **ABLATIONS[ablation])
