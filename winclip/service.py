"""What the demo does per request, without any UI framework: load once, cache, detect, explain prompts.

Caches: detectors per settings (sharing one model and its text-prototype cache), image features per (image,
settings), reference memories per (reference set, settings) built from them. So moving the threshold or
re-running a query costs only scoring and drawing; a prompt edit costs only the text encoder.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch.nn.functional as F

from . import methods
from .config import WinClipConfig
from .detector import ImageFeatures, ReferenceMemory, WinClip, map_at
from .hosting import ModelHost
from .images import LoadedImage
from .inputs import ahead_in_a_thread, collect_inputs
from .prompt_experiments import prompt_scores, table_rows
from .prompting import PromptEnsemble, build_ensemble
from .requests import (LRU, DecodedUploads, DetectOptions, DetectResult, PromptComparison, PromptReport,
                       uploaded_paths)
from .settings import Settings
from .visualize import component_panels, mask_overlay, overlay, panel_size, verdict_at

if TYPE_CHECKING:
    from .inspection import Stage
    from .rows import OverlayFiles, Row

MAX_SHOTS = 4  # the demo's limit; the library takes any K
MAX_IMAGE_CACHE = 32  # features of queries and references (1.7 MB each for ViT-B-16-plus-240)
MAX_REFERENCE_CACHE = 8
MAX_BATCH_FILES = 200  # the app's Batch tab; the CLI takes any number
MAX_BATCH_BYTES = 200 * 1024 * 1024  # uploaded bytes, and uncompressed bytes of the zips, per batch
MAX_DECODED = 6  # query + 4 references + 1; only images up to DECODED_MAX_PIXELS are kept
DECODED_MAX_PIXELS = 4_000_000
log = logging.getLogger(__name__)


class DetectionService(ModelHost):
    """Request handlers over the model (``ModelHost``); every public method raises ValueError with a
    user-facing message. Caches make a repeat click cheap."""

    def __init__(self, settings: Settings | None = None, base_config: WinClipConfig = WinClipConfig(),
                 check_in_background: bool = True) -> None:
        super().__init__(settings, base_config, check_in_background)
        self._detectors = LRU(8)
        self._features = LRU(MAX_IMAGE_CACHE)
        self._memories = LRU(MAX_REFERENCE_CACHE)
        self._suggestions = LRU(MAX_REFERENCE_CACHE)  # suggested thresholds per (reference set, settings, prompts)
        self._labelled = LRU(2)  # encoded labelled sets for the playground, per (files, settings)
        self._decoded = DecodedUploads(MAX_DECODED, DECODED_MAX_PIXELS)  # a repeat click skips decoding

    def detector_for(self, options: DetectOptions) -> WinClip:
        base = self.require()
        if options.max_window > min(base.grid) or (options.min_window > options.max_window and options.min_window):
            raise ValueError(f"window sizes {options.min_window}..{options.max_window} do not fit the model's "
                             f"{base.grid[0]}x{base.grid[1]} patch grid; pick sizes between 1 and {min(base.grid)}, "
                             "smallest first")
        config = options.config(self.base_config)
        return self._detectors.get(config, lambda: base.with_config(config))

    def ensemble(self, options: DetectOptions, detector: WinClip) -> PromptEnsemble:
        return build_ensemble(options.object_name, options.defect_words, options.normal_states,
                              options.anomalous_states, options.templates, detector.config.max_defect_words)

    def _features_of(self, detector: WinClip, loaded: LoadedImage, keep: bool = False) -> ImageFeatures:
        key = (loaded.key, detector.config.window_scales, detector.config.window_stride)
        return self._features.get(key, lambda: detector.encode(detector.preprocess(loaded.image)[None]), keep)

    def _memory_of(self, detector: WinClip, images: Sequence[LoadedImage], keep: bool = False
                   ) -> ReferenceMemory | None:
        """From each image's cached features (the numbers of one batch): a set with one image more encodes one."""
        if not images:
            return None
        keys = tuple(im.key for im in images)
        return self._memories.get((keys, detector.config.window_scales, detector.config.window_stride),
                                  lambda: ReferenceMemory.from_features(ImageFeatures.concat(
                                      [self._features_of(detector, im, keep) for im in images]),
                                      hashlib.sha1("".join(keys).encode()).hexdigest()), keep)

    def _suggested(self, detector: WinClip, memory: ReferenceMemory | None, ensemble: PromptEnsemble,
                   keep: bool = False) -> float | None:
        """The suggested threshold of a reference set (its highest leave-one-out score; None below 2 shots) under
        these settings and prompts: K scorings a repeat click need not do again."""
        if memory is None or memory.shots < 2:
            return None
        return self._suggestions.get((memory.key, detector.config, ensemble), lambda: max(
            detector.leave_one_out_scores(memory, detector.prototypes_for(ensemble))), keep)

    def detect(self, query: Any, references: Sequence[Any], options: DetectOptions,
               progress: Callable[[str], None] | None = None) -> DetectResult:
        """Score a query (with 0-4 references). ``progress(stage)`` is told each stage as it starts; the
        result's ``steps`` says where the time went (a first click encodes the references and the prompts,
        later ones find them cached)."""
        start = time.perf_counter()
        steps: dict[str, float] = {}

        def step(name: str, work: Callable[[], Any]) -> Any:
            if progress is not None:
                progress(name)
            t0 = time.perf_counter()
            try:
                return work()
            finally:
                steps[name] = steps.get(name, 0.0) + time.perf_counter() - t0

        self.require()
        if query is None:
            raise ValueError("Upload a query image first.")
        if len(references) > MAX_SHOTS:
            raise ValueError(f"{len(references)} reference images given; the demo takes at most {MAX_SHOTS}. "
                             "Remove some (the library's API takes any number).")
        if not 0.0 <= options.threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {options.threshold}")
        loaded, refs = step("reading the images", lambda: (self._decoded.read(query, "query image"), [
            self._decoded.read(r, f"reference image {i + 1}") for i, r in enumerate(references)]))
        t0 = time.perf_counter()
        warming = self._warming  # the upload's warm-up holds the model: the click finishes what it began
        with self.model_for_a_click():
            steps["encoding begun at upload" if warming else "waiting for other requests"] = time.perf_counter() - t0
            detector = self.detector_for(options)
            ensemble = self.ensemble(options, detector)
            prototypes = step("text prompts", lambda: detector.prototypes_for(ensemble))
            feats = step("encoding the query", lambda: self._features_of(detector, loaded))
            memory = step(f"encoding {len(refs)} references" if refs else "references",
                          lambda: self._memory_of(detector, refs))
            out = step("scoring", lambda: detector.score(feats, prototypes, references=memory))
            suggested = step("scoring", lambda: self._suggested(detector, memory, ensemble))
        size = (loaded.image.height, loaded.image.width)
        anomaly_map = step("drawing", lambda: map_at(out.grid_maps, size))
        pred = step("drawing", lambda: detector.to_prediction(out, panel_size(*size)))  # the panels' maps
        verdict = verdict_at(pred.score, options.threshold)
        panels = step("drawing", lambda: component_panels(loaded.image, pred))
        overlay_image = step("drawing", lambda: overlay(loaded.image, anomaly_map))
        mask_image = step("drawing", lambda: mask_overlay(loaded.image, anomaly_map, options.threshold))
        return DetectResult(
            score=pred.score, threshold=options.threshold, verdict=verdict, overlay=overlay_image, mask=mask_image,
            panels=panels, suggested_threshold=suggested, shots=pred.shots, prediction=pred, anomaly_map=anomaly_map,
            notes=loaded.notes + tuple(n for r in refs for n in r.notes),
            seconds=time.perf_counter() - start, image=loaded.image, steps=steps,
        )

    def prewarm(self, query: Any, references: Sequence[Any], options: DetectOptions) -> str:
        """Work a Detect click would do, done as soon as its inputs change (uploads, object name): the
        query's and the references' features, the prompt prototypes and the suggested threshold go into the
        caches. Never raises:
        a bad file is reported by the click itself."""
        if self.detector is None:
            return "model not loaded yet"
        done = []
        try:
            with self.model_for_a_click(warm_up=True):
                detector = self.detector_for(options)
                ensemble = self.ensemble(options, detector)
                detector.prototypes_for(ensemble)
                done.append("prompts")
                if references and len(references) <= MAX_SHOTS:
                    refs = [self._decoded.read(r, f"reference image {i + 1}") for i, r in enumerate(references)]
                    self._suggested(detector, self._memory_of(detector, refs), ensemble)  # and their memory
                    done.append(f"{len(refs)} references")
                if query is not None:
                    self._features_of(detector, self._decoded.read(query, "query image"))
                    done.append("query")
        except ValueError as exc:
            return f"not prepared: {exc}"
        return "prepared: " + ", ".join(done)

    def prepare(self, requests: Sequence[tuple[Any, Sequence[Any], DetectOptions]], what: str):
        """(query or None, references, options) each: their prompts, reference memory and query features encoded
        ahead of any click (``prepare_in_background``), kept for good: a first Detect on an example only scores."""
        def steps() -> Iterator[Any]:
            for query, references, options in requests:
                detector = self.detector_for(options)
                ensemble = self.ensemble(options, detector)
                yield detector.prototypes_for(ensemble, keep=True)
                refs = [self._decoded.read(r, f"reference image {i + 1}") for i, r in enumerate(references)]
                yield from (self._features_of(detector, image, True) for image in refs)  # one step per image
                yield self._suggested(detector, self._memory_of(detector, refs, True), ensemble, True)
                if query is not None:
                    yield self._features_of(detector, self._decoded.read(query, "query image"), True)

        return self.prepare_in_background(steps, what)

    def explain_prompts(self, query: Any, options: DetectOptions) -> PromptReport:
        """Per-prompt cosine and probability for the query's class token, and each defect word's effect."""
        self.require()
        if query is None:
            raise ValueError("Upload a query image first.")
        loaded = self._decoded.read(query, "query image")
        with self.model_for_a_click():
            detector = self.detector_for(options)
            ensemble = self.ensemble(options, detector)
            feats = self._features_of(detector, loaded)  # cached: prompt edits never redo the image
            prototypes = detector.prototypes_for(ensemble)
            image = feats.image_embeddings[:1]  # (1, E)
            normal = F.normalize(detector.encode_prompts(ensemble.normal), dim=-1) @ F.normalize(image[0], dim=-1)
            anomalous = F.normalize(detector.encode_prompts(ensemble.anomalous), dim=-1) @ F.normalize(image[0], dim=-1)
            cosines = normal.tolist() + anomalous.tolist()
            # the detector's own scoring function (two_class or one_class), one prompt standing for its class
            scored = prompt_scores(detector, image, ensemble)
        rows = [[cls, prompt, round(float(c), 5), round(float(q[0]), 5)]
                for (cls, prompt, q), c in zip(scored, cosines)]
        full_score = float(detector.score(feats, prototypes, references=None).zero_shot_scores[0])
        word_rows = []
        words = [w for w in dict.fromkeys(" ".join(w.split()) for w in options.defect_words) if w]
        with self.model_for_a_click():
            for word in words:
                rest = replace(options, defect_words=tuple(w for w in words if w != word))
                without = detector.prototypes_for(self.ensemble(rest, detector))  # prompt embeddings cached
                score_without = float(detector.score(feats, without, references=None).zero_shot_scores[0])
                word_rows.append([word, round(full_score, 5), round(score_without, 5),
                                  round(full_score - score_without, 5)])
        return PromptReport(rows, word_rows, full_score, (len(ensemble.normal), len(ensemble.anomalous)))

    def batch(self, files: Sequence[Any], references: Sequence[Any], options: DetectOptions, out_dir: Path,
              auto_threshold: bool = False, batch_size: int = 4, method: str = "winclip",
              chunk: Callable[..., Any] | None = None, max_chunk: int | None = None,
              stop: Callable[[], bool] | None = None, stage: Stage | None = None):
        """Batch inspection for the app: limits checked, then ``iter_inspection`` (rows, then the summary).

        ``chunk``: where the model work runs, called as ``chunk(action, ...)`` with ``batch_setup``'s or
        ``batch_rows``' arguments (the app passes one that makes each call a ZeroGPU call); WinCLIP's
        items go to it ``max_chunk`` at a time. Without it the rows come as one stream from a thread of its
        own, each as soon as it is scored (in chunks, none came before its whole chunk). Files, summary and
        report are made here either way.
        ``stop()``: asked after each row; True ends the run there with a summary of the rows so far.
        ``stage(text, done, total)``: a whole-set method's steps before its rows (encoding k of N, scoring,
        drawing); it is called from inside the model work, so only where that runs in this process."""
        from .inspection import iter_inspection

        self.require()
        inputs = self.batch_inputs(files, references, out_dir, method)
        run_model = chunk or self._here
        chosen, settings = run_model("batch_setup", list(references), options, auto_threshold, method)
        whole_set = methods.get(method).whole_set  # e.g. MuSc: the set is scored as one
        step = len(inputs.items) if whole_set or not max_chunk else max_chunk

        # in the precision the run started in, whatever auto switches meanwhile
        def score(items, threshold: float, overlays: OverlayFiles | None):
            if chunk is None:  # the thread holds the run's precision whichever thread asks for the next row
                yield from ahead_in_a_thread(lambda: self.batch_row_stream(
                    items, references, options, threshold, method, overlays, batch_size, settings["precision"],
                    stage), batch_size, "winclip-batch")
                return
            for start in range(0, len(items), max(step, 1)):
                yield from run_model("batch_rows", list(items[start : start + step]), list(references), options,
                                     threshold, method, overlays, batch_size, settings["precision"],
                                     **({"stage": stage} if stage is not None else {}))

        return inputs, iter_inspection(
            None, inputs, out_dir / "results", threshold=chosen["value"], batch_size=batch_size, overlays=True,
            settings=settings, method=method, chosen=chosen, score=score, stop=stop)

    def batch_inputs(self, files: Sequence[Any], references: Sequence[Any], out_dir: Path, method: str = "winclip"):
        """The batch's files (folders and zips unpacked), within the demo's limits: no model work."""
        m = methods.get(method)
        paths = uploaded_paths(files, "Upload images or a .zip first.", MAX_BATCH_BYTES)
        if len(references) > MAX_SHOTS:
            raise ValueError(f"{len(references)} reference images given; the demo takes at most {MAX_SHOTS}.")
        inputs = collect_inputs(paths, out_dir / "unpacked", max_zip_files=MAX_BATCH_FILES,
                                max_zip_bytes=MAX_BATCH_BYTES)
        if len(inputs.items) > MAX_BATCH_FILES:
            raise ValueError(f"{len(inputs.items)} files; the demo inspects at most {MAX_BATCH_FILES} per batch "
                             "(use `python -m winclip inspect` for larger sets)")
        m.check_count(len(inputs.items))
        return inputs

    def batch_setup(self, references: Sequence[Any], options: DetectOptions, auto_threshold: bool,
                    method: str) -> tuple[dict, dict]:
        """(the threshold chosen, with how; the settings written to summary.json): model work, small."""
        from .inspection import resolve_threshold, run_settings

        m = methods.get(method)
        detector, setup = self._prepared(references, options, m)
        with self._lock:
            chosen = resolve_threshold(detector, "auto" if auto_threshold else options.threshold, setup, m)
        settings = run_settings(detector, m, options.object_name, options.defect_words, setup.references)
        return chosen, settings

    def _here(self, action: str, *args: Any) -> Any:
        """Model work run in this process (``batch``'s and ``compare_prompts``' default ``chunk``)."""
        return getattr(self, action)(*args)

    def _prepared(self, references: Sequence[Any], options: DetectOptions, method: "methods.Method"):
        """(detector, the method's setup: the prototypes and reference memory it uses) for a batch's settings."""
        refs = [self._decoded.read(r, f"reference image {i + 1}") for i, r in enumerate(references)
                ] if method.uses_references else []
        with self._lock:
            detector = self.detector_for(options)
            prototypes = detector.prototypes_for(self.ensemble(options, detector)) if method.uses_text else None
            return detector, method.setup(detector, prototypes, self._memory_of(detector, refs))

    def batch_rows(self, items: Sequence[Any], references: Sequence[Any], options: DetectOptions, threshold: float,
                   method: str, overlays: OverlayFiles | None, batch_size: int = 4, precision: str | None = None,
                   stage: Stage | None = None) -> list:
        """Rows of one chunk of a batch (all of the set for a whole-set method), in ``precision`` (the run's,
        from ``batch_setup``; None: the current one): model work. ``stage``: see ``inspect_stream``."""
        return list(self.batch_row_stream(items, references, options, threshold, method, overlays, batch_size,
                                          precision, stage))

    def batch_row_stream(self, items: Sequence[Any], references: Sequence[Any], options: DetectOptions,
                         threshold: float, method: str, overlays: OverlayFiles | None, batch_size: int = 4,
                         precision: str | None = None, stage: Stage | None = None) -> Iterator[Row]:
        """``batch_rows``' rows, each as soon as it is scored; ``precision`` holds in the thread that runs it."""
        from .inspection import inspect_stream
        m = methods.get(method)
        detector, setup = self._prepared(list(references), options, m)
        with detector.backbone.precision_for_this_thread(precision):
            yield from self.between_clicks(inspect_stream(detector, list(items), threshold=threshold,
                                                          batch_size=batch_size, overlays=overlays, method=m,
                                                          setup=setup, stage=stage))

    def compare_prompts(self, files: Sequence[Any], references: Sequence[Any], options: DetectOptions,
                        extra_sets: Sequence[Any] = (), per_prompt: bool = True, suggest_pruned: bool = False,
                        progress: Callable[[int, int], None] | None = None, chunk: Callable[..., Any] | None = None,
                        max_chunk: int | None = None) -> PromptComparison:
        """Encode a labelled zip/folder once (cached), then measure the paper's set, the current edit and any
        uploaded or shipped sets on it: only text work and re-scoring after the first call.

        ``chunk``: where the model work runs, called as ``chunk(action, ...)`` with ``labelled_part``'s
        (at most ``max_chunk`` images each) or ``measure_sets``' arguments (the app passes one that makes
        each call a ZeroGPU call). Files, limits and the cache of encoded sets stay here."""
        import tempfile

        from .prompt_experiments import PromptSet, merge_labelled, paper_default, require_labelled, with_masks

        self.require()
        paths = uploaded_paths(files, "Upload a labelled zip first (good/ plus one folder per defect type).",
                               MAX_BATCH_BYTES)
        current = PromptSet("current edit", options.normal_states, options.anomalous_states, options.templates,
                            tuple(dict.fromkeys(options.defect_words)))
        sets = [paper_default(), current] + [s if isinstance(s, PromptSet) else PromptSet.from_file(s)
                                             for s in extra_sets]
        run_model = chunk or self._here
        config = options.config(self.base_config)
        digest = hashlib.sha1()
        for p in paths:
            digest.update(p.read_bytes() if p.is_file() else str(p).encode())
        key = (digest.hexdigest(), config.window_scales, config.window_stride)
        cached = key in self._labelled.items
        if cached:
            data = self._labelled.get(key, lambda: None)  # image features once per labelled set
        else:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="winclip-labelled-") as work:
                inputs = collect_inputs(paths, Path(work), max_zip_files=MAX_BATCH_FILES, max_zip_bytes=MAX_BATCH_BYTES)
                if len(inputs.items) > MAX_BATCH_FILES:
                    raise ValueError(f"{len(inputs.items)} files; at most {MAX_BATCH_FILES} per labelled set")
                require_labelled(inputs)
                items, parts = list(inputs.items), []
                step = max(1, max_chunk or len(items))
                for i in range(0, len(items), step):
                    parts.append(run_model("labelled_part", items[i : i + step], with_masks(items), options))
                    if progress is not None:
                        progress(min(i + step, len(items)), len(items))
            data = merge_labelled(parts, time.perf_counter() - start)
            self._labelled.get(key, lambda: data)
        return run_model("measure_sets", data, list(references), options, sets, per_prompt, suggest_pruned,
                         0.0 if cached else data.seconds)

    def labelled_part(self, items: Sequence[Any], masks_too: bool, options: DetectOptions):
        """Some images of a labelled set encoded (features on the CPU): model work, bounded."""
        from .prompt_experiments import encode_labelled_part

        with self._lock:
            return encode_labelled_part(self.detector_for(options), items, masks_too, 4)

    def measure_sets(self, data, references: Sequence[Any], options: DetectOptions, sets: Sequence[Any],
                     per_prompt: bool, suggest_pruned: bool, encode_seconds: float) -> PromptComparison:
        """The measurements of ``compare_prompts`` on an encoded labelled set: text work and re-scoring."""
        from .prompt_experiments import compare_sets, defect_word_contributions, per_prompt_auroc, suggest

        current = sets[1]
        refs = [self._decoded.read(r, f"reference image {i + 1}") for i, r in enumerate(references)]
        with self._lock:
            detector = self.detector_for(options)
            data = replace(data, features=data.features.to(detector.backbone.device))
            memory = self._memory_of(detector, refs)
            score_start = time.perf_counter()
            results = compare_sets(detector, data, sets, options.object_name, memory)
            prompts = per_prompt_auroc(detector, data, current, options.object_name) if per_prompt else []
            words = defect_word_contributions(detector, data, current, options.object_name)
            suggestion = suggest(detector, data, current, options.object_name) if suggest_pruned else None
            score_seconds = time.perf_counter() - score_start
        return PromptComparison(
            *table_rows(results, prompts, words), suggestion, len(data.names), int((data.labels == 0).sum()),
            int((data.labels == 1).sum()), list(data.errors), encode_seconds, score_seconds, current.to_dict())

