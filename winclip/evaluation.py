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
from typing import Callable, Sequence

import numpy as np
import torch

from .config import WinClipConfig
from .datasets import Category, load_mask, read_image
from .detector import ImageFeatures, WinClip, upsample
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

# Published means over categories (%), WinCLIP paper Tables 1 and 4: (dataset, shots) -> metric -> value.
PUBLISHED: dict[tuple[str, int], dict[str, float]] = {
    ("mvtec", 0): {"auroc": 91.8, "aupr": 96.5, "f1_max": 92.9, "pauroc": 85.1, "pro": 64.6, "pixel_f1_max": 31.7},
    ("mvtec", 1): {"auroc": 93.1, "aupr": 96.5, "f1_max": 93.7, "pauroc": 95.2, "pro": 87.1},
    ("mvtec", 2): {"auroc": 94.4, "aupr": 97.0, "f1_max": 94.4},
    ("mvtec", 4): {"auroc": 95.2, "aupr": 97.3, "f1_max": 94.7, "pauroc": 96.2, "pro": 89.0},
    ("visa", 0): {"auroc": 78.1, "pauroc": 79.6, "pro": 56.8, "pixel_f1_max": 14.8},
    ("visa", 1): {"auroc": 83.8, "aupr": 85.1, "f1_max": 83.1, "pauroc": 96.4, "pro": 85.1},
    ("visa", 2): {"auroc": 84.6, "aupr": 85.8, "f1_max": 83.0},
    ("visa", 4): {"auroc": 87.3, "aupr": 88.8, "f1_max": 84.2, "pauroc": 97.2, "pro": 87.6},
}
# MuSc's README (official code), ViT-B-16-plus-240 / laion400m_e31 at 240 px, whole test set as the batch.
PUBLISHED_MUSC: dict[tuple[str, int], dict[str, float]] = {
    ("mvtec", 0): {"auroc": 94.77, "pauroc": 96.26},
    ("visa", 0): {"auroc": 82.62, "pauroc": 96.11},
}
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
    method: str = "winclip"  # "musc": zero-shot mutual scoring of each category's test set (winclip.musc)

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
    """All shot counts and seeds for one category -> JSON-ready results."""
    if settings.method == "musc":
        return _evaluate_musc(detector, category, settings, progress)
    start = time.perf_counter()
    words = defect_words_for(category, settings.defect_words)
    detector.set_prompts(object_name(category.name), words)
    samples = list(category.test)
    if not samples:
        raise ValueError(f"{category.name}: no test images")
    size = (settings.pixel_size, settings.pixel_size)
    batches: list[ImageFeatures] = []
    for i in range(0, len(samples), settings.batch_size):
        progress(f"{category.name}: features {min(i + settings.batch_size, len(samples))}/{len(samples)}")
        chunk = samples[i : i + settings.batch_size]
        batches.append(detector.encode(torch.stack([detector.preprocess(read_image(s.path)) for s in chunk])))
    labels = np.array([s.label for s in samples])
    masks = np.stack([load_mask(s.mask, size) for s in samples]) if category.has_masks else None
    results = {"category": category.name, "dataset": category.dataset, "object": object_name(category.name),
               "defect_words": list(words), "n_test": len(samples), "n_anomalous": int(labels.sum()),
               "settings": asdict(settings), "key": settings.key(), "shots": {}}
    for shots in settings.shots:
        runs = []
        for seed in range(settings.seeds if shots else 1):
            progress(f"{category.name}: {shots}-shot seed {seed + 1}/{settings.seeds if shots else 1}")
            refs = category.references(shots, seed) if shots else []
            memory = detector.memory_for([read_image(p) for p in refs]) if refs else None
            scores, maps = [], []
            for feats in batches:
                out = detector.score(feats, references=memory)
                scores.append(out.image_scores.cpu().numpy())
                maps.append(upsample(out.grid_maps, size).cpu().numpy())
            keep = np.array([s.path not in set(refs) for s in samples])  # folder layout: refs come from good/
            run = {"seed": seed, "references": [str(p) for p in refs]}
            run.update(image_metrics(np.concatenate(scores)[keep], labels[keep]))
            if masks is not None:
                pixel = pixel_metrics(np.concatenate(maps)[keep], masks[keep])
                run.update({"pauroc": pixel["pauroc"], "pro": pixel["pro"], "pixel_f1_max": pixel["f1_max"]})
            runs.append(run)
        summary = {m: {"mean": float(np.mean([r[m] for r in runs])), "std": float(np.std([r[m] for r in runs]))}
                   for m in METRICS if m in runs[0]}
        results["shots"][str(shots)] = {"summary": summary, "runs": runs}
    results["seconds"] = time.perf_counter() - start
    return results


def _evaluate_musc(detector: WinClip, category: Category, settings: EvalSettings,
                   progress: Callable[[str], None]) -> dict:
    """MuSc on one category: its whole test set is the batch (uses the test images themselves, no labels)."""
    from .inspection import musc_features, musc_scores
    from .musc import BlockTokens, MuscConfig, quarter_layers

    start = time.perf_counter()
    samples = list(category.test)
    config = MuscConfig(layers=quarter_layers(detector.backbone.n_blocks),
                        rescore_k=(1, 8, 9) if category.dataset == "visa" else (1, 2, 3))  # their per-dataset k
    store = BlockTokens(config.layers, len(samples))
    for i in range(0, len(samples), settings.batch_size):
        progress(f"{category.name}: MuSc features {min(i + settings.batch_size, len(samples))}/{len(samples)}")
        chunk = samples[i : i + settings.batch_size]
        store.add(*musc_features(detector, torch.stack([detector.preprocess(read_image(s.path)) for s in chunk]),
                                 config.layers))
    progress(f"{category.name}: MuSc mutual scoring of {len(samples)} images")
    out = musc_scores(store, detector, config)
    del store
    size = (settings.pixel_size, settings.pixel_size)
    labels = np.array([s.label for s in samples])
    run = {"seed": 0, "references": []}
    run.update(image_metrics(out.scores.numpy(), labels))
    if category.has_masks:
        masks = np.stack([load_mask(s.mask, size) for s in samples])
        pixel = pixel_metrics(upsample(out.maps, size).numpy(), masks)
        run.update({"pauroc": pixel["pauroc"], "pro": pixel["pro"], "pixel_f1_max": pixel["f1_max"]})
    summary = {m: {"mean": float(run[m]), "std": 0.0} for m in METRICS if m in run}
    return {"category": category.name, "dataset": category.dataset, "object": object_name(category.name),
            "defect_words": [], "n_test": len(samples), "n_anomalous": int(labels.sum()),
            "settings": asdict(settings), "key": settings.key(), "method": "musc",
            "musc": {"layers": list(config.layers), "radii": list(config.radii), "rescore_k": list(config.rescore_k)},
            "shots": {"0": {"summary": summary, "runs": [run]}}, "seconds": time.perf_counter() - start}


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
    musc = settings.method == "musc"
    title = "MuSc evaluation (zero-shot, each category's test set as the batch)" if musc else "WinCLIP evaluation"
    lines = [f"# {title}: {dataset}, ablation `{settings.ablation}`", "",
             f"Model {settings.model} / {settings.pretrained} ({settings.precision}); pixel metrics at "
             f"{settings.pixel_size}x{settings.pixel_size}; k-shot: mean ± std over {settings.seeds} seeds; "
             f"defect words: {settings.defect_words}. Values in %. Recomputed from the per-category JSON files.", ""]
    means: dict[tuple[int, str], float] = {}
    for shots in shots_list:
        lines += [f"## {shots}-shot" + (" (MuSc)" if musc else " (WinCLIP)" if shots == 0 else " (WinCLIP+)"), "",
                  "| category | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for r in results:
            cells = []
            for m in metrics:
                v = r["shots"].get(str(shots), {}).get("summary", {}).get(m)
                cells.append("–" if v is None else f"{v['mean'] * 100:.1f}" + (f" ± {v['std'] * 100:.1f}" if shots else ""))
            lines.append(f"| {r['category']} | " + " | ".join(cells) + " |")
        cells = []
        for m in metrics:
            vals = [row["mean"] for row in rows if row["shots"] == shots and row["metric"] == m]
            means[(shots, m)] = float(np.mean(vals)) if vals else float("nan")
            cells.append(f"**{means[(shots, m)]:.1f}**" if vals else "–")
        lines += ["| **mean** | " + " | ".join(cells) + " |", ""]
    lines += ["## Against the published numbers (mean over categories)" + (
                  " — MuSc's README, ViT-B-16-plus-240 / laion400m_e31" if musc else " — WinCLIP paper"), "",
              "| setting | metric | ours | published | difference |", "|---|---|---|---|---|"]
    published = PUBLISHED_MUSC if musc else PUBLISHED
    for shots in shots_list:
        for m in metrics:
            paper = published.get((dataset, shots), {}).get(m)
            if paper is not None and (shots, m) in means:
                lines.append(f"| {shots}-shot | {m} | {means[(shots, m)]:.1f} | {paper:.1f} | "
                             f"{means[(shots, m)] - paper:+.1f} |")
    if dataset not in ("mvtec", "visa") or len(categories) < (15 if dataset == "mvtec" else 12):
        lines += ["", "_Not the full benchmark: the published means are over all categories._"]
    if musc:
        lines += ["", "_MuSc scores each test set against itself (no labels, no training images): its numbers use "
                  "the test images as the unlabelled batch, as the MuSc paper does._"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def evaluation_config(base: WinClipConfig, ablation: str) -> WinClipConfig:
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
    return replace(base, **ABLATIONS[ablation])
