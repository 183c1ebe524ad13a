"""Prompt experiments measured on labelled images: compare prompt sets, per-prompt discriminability,
defect-word contributions, a pruned suggestion with a held-out check.

The labelled set is encoded once (``encode_labelled``); every prompt set is then only text work (prompt
embeddings are cached per prompt by the detector) plus re-scoring the cached features with the
detector's own ``score`` / ``text_scores``, the functions that serve ``predict`` and the app. Every number
comes from ``winclip.metrics``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .association import text_scores
from .datasets import load_mask
from .detector import ImageFeatures, ReferenceMemory, WinClip, upsample
from .inputs import Inputs, Item, encoded_batches
from .metrics import PIXEL_SIZE, aurocs, image_metrics, pixel_metrics
from .prompting import MAX_LIST_ENTRIES, MAX_TEXT_CHARS, PLACEHOLDER, build_ensemble, default_lists

PROMPT_SET_KEYS = ("normal_states", "anomalous_states", "templates", "defect_words")
HOLDOUT_SEED = 0  # the fixed split of the held-out check


@dataclass(frozen=True)
class PromptSet:
    """A prompt set as in a JSON file; a missing key (None) means the paper's list (no defect words)."""

    name: str
    normal_states: tuple[str, ...] | None = None
    anomalous_states: tuple[str, ...] | None = None
    templates: tuple[str, ...] | None = None
    defect_words: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: object, name: str) -> "PromptSet":
        """Validate a decoded JSON object; every problem names the key and the entry."""
        if not isinstance(data, dict):
            raise ValueError(f"prompt set {name}: expected a JSON object with keys {', '.join(PROMPT_SET_KEYS)}")
        unknown = sorted(set(data) - set(PROMPT_SET_KEYS))
        if unknown:
            raise ValueError(f"prompt set {name}: unknown key(s) {unknown}; use {', '.join(PROMPT_SET_KEYS)}")
        lists: dict[str, tuple[str, ...] | None] = {}
        for key in PROMPT_SET_KEYS:
            if key not in data or data[key] is None:
                lists[key] = None
                continue
            entries = data[key]
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise ValueError(f"prompt set {name}: {key} must be a list of strings")
            cleaned = []
            for i, entry in enumerate(entries):
                text = " ".join(entry.split())
                where = f"prompt set {name}: {key}[{i}] {entry[:40]!r}"
                if not text:
                    raise ValueError(f"{where} is empty")
                if len(text) > MAX_TEXT_CHARS:
                    raise ValueError(f"{where} is {len(text)} characters; keep each under {MAX_TEXT_CHARS}")
                if key != "defect_words" and text.count(PLACEHOLDER) != 1:
                    raise ValueError(f"{where} needs exactly one '{{}}' placeholder")
                if text in cleaned:
                    raise ValueError(f"{where} is a duplicate")
                cleaned.append(text)
            if key != "defect_words" and not cleaned:
                raise ValueError(f"prompt set {name}: {key} is empty; give at least one entry or leave the key out")
            if len(cleaned) > MAX_LIST_ENTRIES:
                raise ValueError(f"prompt set {name}: {len(cleaned)} {key}; at most {MAX_LIST_ENTRIES}")
            lists[key] = tuple(cleaned)
        return cls(name, lists["normal_states"], lists["anomalous_states"], lists["templates"],
                   lists["defect_words"] or ())

    @classmethod
    def from_json(cls, text: str, name: str) -> "PromptSet":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"prompt set {name}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data, name)

    @classmethod
    def from_file(cls, path: str | Path) -> "PromptSet":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"prompt set file not found: {path}")
        return cls.from_json(path.read_text(encoding="utf-8"), path.stem)

    def to_dict(self) -> dict:
        defaults = default_lists()
        return {"normal_states": list(self.normal_states or defaults["normal_states"]),
                "anomalous_states": list(self.anomalous_states or defaults["anomalous_states"]),
                "templates": list(self.templates or defaults["templates"]), "defect_words": list(self.defect_words)}

    def ensemble(self, object_name: str, max_defect_words: int = 32):
        return build_ensemble(object_name, self.defect_words, self.normal_states, self.anomalous_states,
                              self.templates, max_defect_words)


def paper_default() -> PromptSet:
    return PromptSet("default")


def shipped_sets() -> list[PromptSet]:
    """``winclip/prompts/sets/*.json`` (listed in the app and usable by name in the CLI)."""
    from importlib import resources

    folder = resources.files("winclip").joinpath("prompts", "sets")
    if not folder.is_dir():
        return []
    return [PromptSet.from_json(f.read_text(encoding="utf-8"), f.name.removesuffix(".json"))
            for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".json")]


@dataclass
class LabelledSet:
    """A labelled set encoded once: features of every readable image, labels, masks at PIXEL_SIZE."""

    names: list[str]
    labels: np.ndarray  # (N,) 1 = anomalous
    features: ImageFeatures  # N images, on the detector's device (``encode_labelled_part``: on the CPU)
    masks: np.ndarray | None  # (N, S, S) bool, None without masks
    errors: list[str] = field(default_factory=list)  # unreadable files, with reasons
    seconds: float = 0.0


def encode_labelled(detector: WinClip, inputs: Inputs, batch_size: int = 8,
                    progress: Callable[[int, int], None] | None = None) -> LabelledSet:
    """Encode every readable image of a labelled set once. Needs both classes (ValueError otherwise)."""
    import time

    require_labelled(inputs)
    start = time.perf_counter()
    items = list(inputs.items)
    part = encode_labelled_part(detector, items, with_masks(items), batch_size, progress, on_cpu=False)
    return merge_labelled([part], time.perf_counter() - start)


def require_labelled(inputs: Inputs) -> None:
    if not inputs.labelled:
        why = "; ".join(n for n in inputs.notes if "unlabelled" in n or "no metrics" in n)
        raise ValueError(f"the set is not labelled{f' ({why})' if why else ''}: give a folder or zip with good/ and "
                         "one folder per defect type")


def with_masks(items: Sequence[Item]) -> bool:
    """Whether a labelled set's masks are read (any defective item has one)."""
    return any(it.mask is not None for it in items if it.label == 1)


def encode_labelled_part(detector: WinClip, items: Sequence[Item], masks_too: bool, batch_size: int = 8,
                         progress: Callable[[int, int], None] | None = None, on_cpu: bool = True) -> LabelledSet:
    """Some items of a labelled set encoded, without the both-classes check: the app on ZeroGPU encodes a
    set in GPU calls of bounded size and merges the parts (``merge_labelled``), so their features come
    back on the CPU (``on_cpu``); a single pass keeps them on the detector's device."""
    names, labels, masks, errors, parts = [], [], [], [], []
    done = 0
    for enc in encoded_batches(detector.preprocess, detector.encode, items, batch_size):
        errors += [d.error for d in enc.batch if d.pixels is None]
        for d in enc.readable:
            names.append(d.item.name)
            labels.append(int(d.item.label or 0))
            if masks_too:
                masks.append(load_mask(d.item.mask, (PIXEL_SIZE, PIXEL_SIZE)))
        if enc.features is not None:
            parts.append(enc.features.to("cpu") if on_cpu else enc.features)
        done += len(enc.batch)
        if progress is not None:
            progress(done, len(items))
    features = ImageFeatures.concat(parts) if parts else None
    return LabelledSet(names, np.array(labels, dtype=int), features, np.stack(masks) if masks else None, errors)


def merge_labelled(parts: Sequence[LabelledSet], seconds: float = 0.0) -> LabelledSet:
    """The parts of a labelled set as one (features where the parts had them); ValueError unless both
    classes are there."""
    label_array = np.concatenate([p.labels for p in parts]) if parts else np.array([], dtype=int)
    if len(label_array) == 0 or label_array.min() == label_array.max():
        raise ValueError("the labelled set needs readable good and defective images; comparison is disabled "
                         f"({int((label_array == 0).sum())} good, {int((label_array == 1).sum())} defective)")
    masks = [p.masks for p in parts if p.masks is not None]
    return LabelledSet([n for p in parts for n in p.names], label_array,
                       ImageFeatures.concat([p.features for p in parts if p.features is not None]),
                       np.concatenate(masks) if masks else None, [e for p in parts for e in p.errors], seconds)


def set_metrics(detector: WinClip, data: LabelledSet, pset: PromptSet, object_name: str,
                references: ReferenceMemory | None = None, pixel: bool = True) -> dict:
    """Image AUROC / AP / F1-max of the zero-shot score (and of WinCLIP+ with references), pixel AUROC / PRO
    with masks, for one prompt set. Only the text side is computed; the images' features are reused."""
    prototypes = detector.prototypes_for(pset.ensemble(object_name, detector.config.max_defect_words))
    if references is None and not (pixel and data.masks is not None):  # no maps needed: the class token's scores
        scores = detector.class_scores(data.features, prototypes).cpu().numpy()
        return {"set": pset.name, "zero_shot": image_metrics(scores, data.labels)}
    zero = detector.score(data.features, prototypes, references=None)
    result = {"set": pset.name, "zero_shot": image_metrics(zero.image_scores.cpu().numpy(), data.labels)}
    maps = zero.grid_maps
    if references is not None:
        fused = detector.score(data.features, prototypes, references=references)
        result["winclip_plus"] = image_metrics(fused.image_scores.cpu().numpy(), data.labels)
        maps = fused.grid_maps
    if pixel and data.masks is not None:
        result["pixel"] = pixel_metrics(upsample(maps, (PIXEL_SIZE, PIXEL_SIZE)).cpu().numpy(), data.masks)
    return result


def compare_sets(detector: WinClip, data: LabelledSet, sets: Sequence[PromptSet], object_name: str,
                 references: ReferenceMemory | None = None) -> list[dict]:
    return [set_metrics(detector, data, s, object_name, references) for s in sets]


def table_rows(results: Sequence[dict], prompts: Sequence[dict], words: Sequence[dict]) -> tuple[list, list, list]:
    """The playground's three tables, 4 decimals (None where a measurement does not apply): one row per set
    (``compare_sets``), per prompt (``per_prompt_auroc``) and per defect word (``defect_word_contributions``)."""
    def r4(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    sets = [[r["set"], r4(r["zero_shot"]["auroc"]), r4(r["zero_shot"]["aupr"]), r4(r["zero_shot"]["f1_max"]),
             r4(r.get("winclip_plus", {}).get("auroc")), r4(r.get("pixel", {}).get("pauroc")),
             r4(r.get("pixel", {}).get("pro"))] for r in results]
    return (sets, [[p["class"], p["prompt"], r4(p["auroc"])] for p in prompts],
            [[w["defect_word"], r4(w["auroc_with"]), r4(w["auroc_without"]), r4(w["contribution"])] for w in words])


def prompt_scores(detector: WinClip, embeddings: torch.Tensor, ensemble) -> list[tuple[str, str, np.ndarray]]:
    """(class, prompt, anomaly probability per embedding) with that prompt standing alone for its class
    against the other class's prototype — the detector's ``text_scores`` with the configured scoring."""
    cfg = detector.config
    protos = detector.prototypes_for(ensemble)  # (2, E) [normal, anomalous]
    normal = detector.encode_prompts(ensemble.normal)
    anomalous = detector.encode_prompts(ensemble.anomalous)
    out = []
    for cls, embs, prompts in (("normal", normal, ensemble.normal), ("anomalous", anomalous, ensemble.anomalous)):
        for prompt, emb in zip(prompts, embs):
            pair = torch.stack([emb, protos[1]]) if cls == "normal" else torch.stack([protos[0], emb])
            out.append((cls, prompt, text_scores(embeddings, pair, cfg.temperature, cfg.scoring).cpu().numpy()))
    return out


def per_prompt_auroc(detector: WinClip, data: LabelledSet, pset: PromptSet, object_name: str) -> list[dict]:
    """Each prompt's image AUROC when it alone stands for its class (class-token score, zero-shot)."""
    ensemble = pset.ensemble(object_name, detector.config.max_defect_words)
    scored = prompt_scores(detector, data.features.image_embeddings, ensemble)
    values = aurocs(np.stack([scores for _, _, scores in scored]), data.labels)  # one call for every prompt
    return [{"class": cls, "prompt": prompt, "auroc": float(v)} for (cls, prompt, _), v in zip(scored, values)]


def defect_word_contributions(detector: WinClip, data: LabelledSet, pset: PromptSet, object_name: str) -> list[dict]:
    """Zero-shot image AUROC with all defect words minus without each one."""
    full = set_metrics(detector, data, pset, object_name, pixel=False)["zero_shot"]["auroc"]
    rows = []
    for word in pset.defect_words:
        rest = PromptSet(pset.name, pset.normal_states, pset.anomalous_states, pset.templates,
                         tuple(w for w in pset.defect_words if w != word))
        without = set_metrics(detector, data, rest, object_name, pixel=False)["zero_shot"]["auroc"]
        rows.append({"defect_word": word, "auroc_with": full, "auroc_without": without, "contribution": full - without})
    return rows


def _class_tokens(data: LabelledSet) -> LabelledSet:
    """The set with only what zero-shot image scores need, the class tokens (no masks): its halves are then
    cheap to take (the window embeddings of 200 images are ~190 MB: 0.6 s to copy into two halves)."""
    features = data.features
    return replace(data, features=ImageFeatures(features.image_embeddings, features.patch_tokens[:, :0], {}),
                   masks=None)


def _subset(data: LabelledSet, rows: np.ndarray) -> LabelledSet:
    index = rows.tolist()
    return LabelledSet([data.names[i] for i in index], data.labels[rows], data.features.select(index),
                       None if data.masks is None else data.masks[rows])


def holdout_split(labels: np.ndarray, seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified half/half split (choose on one half, report on the other)."""
    rng = np.random.default_rng(seed)
    choose, held = [], []
    for value in (0, 1):
        rows = rng.permutation(np.flatnonzero(labels == value))
        half = (len(rows) + 1) // 2
        choose += rows[:half].tolist()
        held += rows[half:].tolist()
    return np.array(sorted(choose)), np.array(sorted(held))


def prune_states(detector: WinClip, data: LabelledSet, pset: PromptSet, object_name: str) -> PromptSet:
    """Greedy: drop the state (normal or anomalous) whose removal raises zero-shot AUROC most, while any does."""
    defaults = default_lists()
    current = PromptSet("pruned", tuple(pset.normal_states or defaults["normal_states"]),
                        tuple(pset.anomalous_states or defaults["anomalous_states"]), pset.templates,
                        pset.defect_words)
    best = set_metrics(detector, data, current, object_name, pixel=False)["zero_shot"]["auroc"]
    while True:
        candidates = []
        for key in ("normal_states", "anomalous_states"):
            states = getattr(current, key)
            if len(states) <= 1:
                continue
            for state in states:
                trial = PromptSet("pruned", **{**_lists(current), key: tuple(s for s in states if s != state)})
                candidates.append((set_metrics(detector, data, trial, object_name, pixel=False)["zero_shot"]["auroc"],
                                   trial))
        if not candidates:
            return current
        auroc, trial = max(candidates, key=lambda c: c[0])
        if auroc <= best:
            return current
        best, current = auroc, trial


def _lists(p: PromptSet) -> dict:
    return {"normal_states": p.normal_states, "anomalous_states": p.anomalous_states, "templates": p.templates,
            "defect_words": p.defect_words}


@dataclass(frozen=True)
class Split:
    choose: int  # images the pruned set is chosen on
    held_out: int  # images it is measured on
    seed: int


@dataclass(frozen=True)
class Suggestion:
    """``suggest``'s answer: the pruned set chosen on one half and its AUROCs on both halves (``skipped`` says
    why there is none)."""

    split: Split
    skipped: str = ""
    pruned_on_half: dict | None = None  # {"normal_states": [...], "anomalous_states": [...]}
    start_auroc_choose_half: float | None = None
    pruned_auroc_choose_half: float | None = None  # flatters the pruned set: it was chosen on these images
    start_auroc_held_out: float | None = None
    pruned_auroc_held_out: float | None = None  # the honest figure
    pruned_on_all: dict | None = None
    pruned_on_all_auroc_same_images: float | None = None

    def to_dict(self) -> dict:
        """The JSON of prompts.json (keys without a value left out)."""
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


def suggest(detector: WinClip, data: LabelledSet, pset: PromptSet, object_name: str) -> Suggestion:
    """A pruned set chosen on one half of the images and measured on the other (held out), beside the
    starting set on the same halves; and the pruned set chosen on all images (its AUROC flatters it)."""
    data = _class_tokens(data)  # every measurement here is a zero-shot image AUROC
    choose_rows, held_rows = holdout_split(data.labels)
    choose, held = _subset(data, choose_rows), _subset(data, held_rows)
    split = Split(len(choose_rows), len(held_rows), HOLDOUT_SEED)
    if min(np.bincount(choose.labels, minlength=2).min(), np.bincount(held.labels, minlength=2).min()) == 0:
        return Suggestion(split, skipped="too few images of each class for a held-out check (need 2 good and 2 "
                          "defective)")
    picked = prune_states(detector, choose, pset, object_name)
    auroc = lambda d, s: set_metrics(detector, d, s, object_name, pixel=False)["zero_shot"]["auroc"]  # noqa: E731
    on_all = prune_states(detector, data, pset, object_name)
    return Suggestion(split, "", _lists_json(picked), auroc(choose, pset), auroc(choose, picked), auroc(held, pset),
                      auroc(held, picked), _lists_json(on_all), auroc(data, on_all))


def _lists_json(p: PromptSet) -> dict:
    return {k: list(v) for k, v in _lists(p).items() if v is not None and k != "templates"}

