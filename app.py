"""WinCLIP demo and prompt playground (Gradio). Thin: UI wiring only; the work is in winclip.service.

    python app.py                      # downloads ViT-B-16-plus-240 / laion400m_e31 on first run
    WINCLIP_PRETRAINED=weights/open_clip_pytorch_model.bin python app.py

Settings: WINCLIP_MODEL, WINCLIP_PRETRAINED, WINCLIP_DEVICE, WINCLIP_PRECISION (or --model ... flags);
port: GRADIO_SERVER_PORT.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import functools
import html
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zipfile
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Callable

try:  # Hugging Face ZeroGPU: `spaces` must be imported before anything initialises CUDA
    import spaces
except ImportError:
    spaces = None

import gradio as gr
import numpy as np
from PIL import Image

from winclip import methods
from winclip.cli import add_model_flags
from winclip.loading import WeightsError
from winclip.prompt_experiments import shipped_sets
from winclip.prompting import default_lists
from winclip.runtime import configure_process
from winclip.inspection import Row, Summary
from winclip.service import MAX_BATCH_BYTES, MAX_BATCH_FILES, MAX_SHOTS, DetectionService, DetectOptions
from winclip.settings import DEFAULTS, Settings, env, parse_pretrained
from winclip.report import histogram_svg
from winclip.visualize import colormap, mask_overlay, threshold_mask, verdict_at

# ZeroGPU: each call asks for a duration, and the platform refuses a call whose *requested* duration does
# not fit in what the visitor has left (a few minutes a day for free visitors), however short the work.
# So durations are computed from the work (allowances with room: no ZeroGPU timing was measured yet), and
# no call asks for more than GPU_MAX_SECONDS: batches and labelled sets go in calls of ZERO_GPU_CHUNK images.
GPU_MAX_SECONDS = 60
GPU_START_SECONDS = 10  # a fresh worker: weights to the GPU, first kernels
GPU_CHECK_SECONDS = 20  # the precision self-check, on a machine where no verdict is cached yet
GPU_IMAGE_SECONDS = 0.5  # per image encoded (query, reference, batch or labelled image)
ZERO_GPU_CHUNK = 32  # batch images per GPU call: 10 + 32 x 0.5 = 26 s
LOCAL_CHUNK = 8  # off ZeroGPU, labelled images encoded per step of the Playground's progress bar
# the service's bounded pieces of batch and measurement work, and what each may ask for (before the start)
WORK_SECONDS: dict[str, Callable[..., float]] = {
    "batch_setup": lambda references, *_: 5 + GPU_IMAGE_SECONDS * (len(references) + 1),  # threshold from the shots
    "batch_rows": lambda items, *_: 5 + GPU_IMAGE_SECONDS * len(items),  # <= ZERO_GPU_CHUNK (MuSc: the whole set)
    "labelled_part": lambda items, *_: 5 + GPU_IMAGE_SECONDS * len(items),  # <= ZERO_GPU_CHUNK
    "measure_sets": lambda data, references, *_: 20 + GPU_IMAGE_SECONDS * (len(references) + 1) + 0.1 * len(data.names),
}
# Gradio caps an "auto"-height gallery at 55% of the window (and at least 450 px): at 1280 x 800 the
# per-scale maps' second row was cut with its captions, and a zero-shot row left empty space under it.
# The Detect tab's gallery grows with its rows instead. (Gradio 6 takes CSS at launch: main() and the
# tests' server pass it.)
# the per-scale gallery grows with its rows; an empty download box is one line saying when files come. On a
# phone (390 px) the Batch gallery's 5 columns overflowed (3 tiles of 100 px shown, captions cut to "0.458 ·
# go…") and the histogram shrank to 142 px beside the ROC; the Detect tab's maps were cut to "zero-shot ...":
# 2 columns with wrapping captions (the Batch gallery's below its label, two lines there), one plot a row.
# The references beside the query have half a column: Gradio cut their names to "wash….png" beside each file's
# size and download link (128 px; one's own upload needs neither): the names have the row, and four rows fit.
CSS = """#panels .grid-wrap { max-height: none; min-height: 0; }
#references td.download { display: none; }
#references tr.file { padding-top: 6px; padding-bottom: 6px; }
#batch-downloads .empty, #current-set .empty { min-height: 0; height: 3.5em; }
#batch-downloads .empty .icon, #current-set .empty .icon { display: none; }
#batch-downloads .empty::after { content: "the files come here when a run ends or is stopped"; }
#current-set .empty::after { content: "the current edit's JSON comes here after a measurement"; }
#batch-downloads .empty::after, #current-set .empty::after { color: var(--body-text-color-subdued); font-size: 0.9em; }
@media (max-width: 640px) {
  #batch-gallery .grid-container { --grid-cols: 2 !important; padding-top: 3rem; }
  #panels .grid-container { --grid-cols: 2 !important; }
  #batch-gallery .caption-label, #panels .caption-label { white-space: normal; }
  #batch-histogram, #batch-roc { min-width: 100% !important; }
}
"""
CACHE_SWEEP_SECONDS = 600  # how often Gradio looks for uploads and results older than WINCLIP_OUTPUT_HOURS
HELD_MAPS_BYTES = 128 * 2**20  # the Detect results kept for threshold moves: ~22 of 900 px, 1 of 4000 px
CAPTION_NAME_CHARS = 20  # a Batch gallery caption's file name: "⚠ 0.458 · " and 20 more fit a tile at 1280 px
# the Batch table's columns, the ones people came for first (all of them fit at 1280 px up to "seconds")
TABLE_COLUMNS = ("file", "score", "verdict", "label", "defect", "status", "zero_shot_score", "few_shot_score", "peak_x",
                 "peak_y", "width", "height", "seconds", "error")
GALLERY_COLUMNS = 5  # the Batch tab's ranked gallery
NO_WORDS = "(none: type them in Detect)"  # the defect-word tables without any (short: the numbers stay on screen)
HEADERS = {  # the playground's tables
    "sets": ["prompt set", "zero-shot AUROC", "AP", "F1-max", "WinCLIP+ AUROC", "pixel AUROC", "PRO"],
    "per_prompt": ["AUROC alone", "class", "prompt"],  # the number first: on screen when the prompts are long
    "word_auroc": ["defect word", "contribution", "AUROC with", "without"],
    "word_scores": ["defect word", "score with all", "score without it", "contribution"],
    "prompt_scores": ["class", "prompt", "cosine", "probability"],
}
BATCH_PLACES = {"score": 4, "zero_shot_score": 4, "few_shot_score": 4, "seconds": 3}  # results.csv has 6
DETECT_STAGES = 6  # service.detect's stages: reading, text prompts, query, references, scoring, drawing
QUOTA_HINT = ("Signed-in Hugging Face visitors get more GPU time each day (PRO accounts the most); "
              "a local install (`python app.py`, `python -m winclip`) has no quota.")


def on_zero_gpu() -> bool:
    """A ZeroGPU Space (the `spaces` package sets SPACES_ZERO_GPU there)."""
    return spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu(seconds: Callable[..., float]):
    """``spaces.GPU`` with the duration computed from each call's arguments (capped at GPU_MAX_SECONDS)
    where the package is present (a no-op off ZeroGPU); a refused call's quota message gains how to get
    more. Without the package, the function itself."""
    if spaces is None:
        return lambda fn: fn

    def wrap(fn):
        decorated = spaces.GPU(duration=lambda *a, **k: int(min(GPU_MAX_SECONDS, max(1.0, seconds(*a, **k)))))(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return decorated(*args, **kwargs)
            except gr.Error as exc:
                raise _with_quota_hint(exc) from None

        call.gpu_seconds = seconds  # marks a GPU call (tests list them)
        return call

    return wrap


def _with_quota_hint(exc: gr.Error) -> gr.Error:
    title = str(getattr(exc, "title", "") or "")
    if "ZeroGPU" not in title or "quota" not in title.lower():
        return exc
    return gr.Error(f"{exc.message} {QUOTA_HINT}", title=title, print_exception=False)


EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
QUEUE_SIZE = 32  # waiting requests beyond this are refused with "queue full" instead of piling up
CONCURRENCY = 1  # one inference at a time: torch already uses every core, and the model is shared
MAX_FILE_SIZE = "20mb"


def _uploaded_path(payload: Any) -> str | None:
    """Replaces gr.Image's preprocess: hand over the uploaded file's path unopened.

    gr.Image would decode it with PIL first (no pixel cap, a generic error on a corrupt file);
    winclip.images does every check once and says what was wrong. (An instance attribute, not a
    subclass: Gradio writes a .pyi stub beside any module that subclasses a component.)
    """
    return None if payload is None else payload.path


def _lines(text: str | None) -> tuple[str, ...] | None:
    entries = tuple(line.strip() for line in (text or "").splitlines() if line.strip())
    return entries or None


def _words(text: str | None) -> tuple[str, ...]:
    return tuple(w.strip() for w in (text or "").replace("\n", ",").split(",") if w.strip())


OPTION_ARGS = ("object_name", "defect_words", "min_window", "max_window", "image_scale", "threshold", "normal_states",
               "anomalous_states", "templates", "scoring", "aggregation")  # the settings every handler takes


def options_of(args: dict[str, Any]) -> DetectOptions:
    """A handler's arguments (its ``locals()``) -> the DetectOptions they describe; the threshold is 0.5 for
    handlers without one (it does not change what they compute)."""
    return _options(**{name: args.get(name, 0.5) for name in OPTION_ARGS})


def _options(object_name, defect_words, min_window, max_window, image_scale, threshold, normal_states,
             anomalous_states, templates, scoring, aggregation) -> DetectOptions:
    return DetectOptions(
        object_name=(object_name or "").strip() or "object", defect_words=_words(defect_words),
        min_window=int(min_window), max_window=int(max_window), image_scale=bool(image_scale),
        threshold=float(threshold), normal_states=_lines(normal_states), anomalous_states=_lines(anomalous_states),
        templates=_lines(templates), scoring=scoring or "two_class", aggregation=aggregation or "harmonic",
    )


def cache_schedule() -> tuple[int, int]:
    """Gradio's ``delete_cache``: (how often to look, how old a file may be), in seconds."""
    text = env("WINCLIP_OUTPUT_HOURS")
    try:
        hours = float(text)
    except ValueError:
        hours = -1.0
    if not hours > 0:
        raise SystemExit(f"WINCLIP_OUTPUT_HOURS={text!r}: give the hours uploads and results stay on the server "
                         f"as a positive number (default {DEFAULTS['WINCLIP_OUTPUT_HOURS']})")
    age = max(1, round(hours * 3600))
    return min(age, CACHE_SWEEP_SECONDS), age


def banner(service: DetectionService) -> str:
    if service.detector is None and service.loading:
        return f"⏳ {service.status()}"
    if service.detector is None:
        return (f"### ⚠️ The model could not be loaded\n\n{service.error}\n\n"
                "Set `WINCLIP_PRETRAINED` to a local weights file (or pass `--pretrained PATH`) and restart.")
    if service.random_weights:
        return ("### ⚠️ RANDOM WEIGHTS — scores are meaningless\n\nStarted with `WINCLIP_PRETRAINED=none`, "
                "which is for tests and timing only.")
    return ""


class OutputFiles:
    """Files handed to Gradio as outputs, the newest ``keep`` of them kept (Gradio has copied each into its
    cache before its response is sent). Images are JPEG files under unique names: Gradio copies a file
    output under a temporary name and renames it (race-free), while a PIL output is written in place to a
    path named by its content, so two identical results at once (people clicking the same example)
    truncated the file a client was still downloading. JPEG as before (a 900 px overlay encodes in ~4 ms).
    A named file (a download) goes in a folder of its own, so that it keeps its name."""

    def __init__(self, keep: int = 512) -> None:
        self.dir: Path | None = None  # made on first use: importing app.py writes nothing
        self.keep = keep
        self._paths: collections.deque[Path] = collections.deque()
        self._lock = threading.Lock()

    def image(self, image: Image.Image) -> str:
        fd, path = tempfile.mkstemp(suffix=".jpeg", dir=self._root())
        with os.fdopen(fd, "wb") as fh:
            image.convert("RGB").save(fh, "JPEG")
        self._keep(Path(path))
        return path

    def text(self, name: str, content: str) -> str:
        folder = Path(tempfile.mkdtemp(dir=self._root()))
        (folder / name).write_text(content)
        self._keep(folder)
        return str(folder / name)

    def _root(self) -> Path:
        with self._lock:
            if self.dir is None:
                self.dir = Path(tempfile.mkdtemp(prefix="winclip-outputs-"))
                atexit.register(shutil.rmtree, self.dir, True)  # a stopped server left up to `keep` files behind
            return self.dir

    def _keep(self, path: Path) -> None:
        with self._lock:
            self._paths.append(path)
            old = [self._paths.popleft() for _ in range(max(0, len(self._paths) - self.keep))]
        for stale in old:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    stale.unlink()


outputs = OutputFiles()


class HeldMaps:
    """The last Detect results' images and maps, for threshold moves without the model: held here, at most
    ``max_bytes`` (the least recently used dropped first), while a session's gr.State keeps only a key and
    the small fields. Gradio keeps every session's State values (up to 10,000 sessions; a browser's for an
    hour after it closes, an API client's until evicted), so an image and map there grew the server by
    ~6 MB per session at 900 px: +70-120 MB per burst of 8 new clients, without end."""

    def __init__(self, max_bytes: int = HELD_MAPS_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, tuple[Image.Image, np.ndarray, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def keep(self, last: dict) -> dict:
        """``last`` with its image and map moved here: the State's value (a key and the small fields)."""
        last = dict(last)
        image, anomaly_map = last.pop("image"), last.pop("map")
        size = image.width * image.height * len(image.getbands()) + anomaly_map.nbytes
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = (image, anomaly_map, size)
            while len(self._items) > 1 and self.held_bytes() > self.max_bytes:
                self._items.popitem(last=False)
        return {**last, "key": key}

    def get(self, last: dict | None) -> tuple[Image.Image, np.ndarray] | None:
        """(image, map) of a State's result; None when it was dropped (or there is none)."""
        with self._lock:
            held = self._items.get((last or {}).get("key", ""))
            if held is None:
                return None
            self._items.move_to_end(last["key"])
            return held[0], held[1]

    def held_bytes(self) -> int:
        return sum(size for *_, size in self._items.values())


def fit_width(svg: str) -> str:
    """The report's fixed-size SVG, scaled to the width of its panel."""
    scaled = svg.replace("<svg ", '<svg style="width:100%;height:auto" ', 1)
    return f'<div style="width:100%;max-width:720px">{scaled}</div>'


def seconds_text(seconds: float) -> str:
    """'0.24 s', '3.1 s': two decimals below a second, one above."""
    return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s"


def number_table(rows: list[list], headers: list[str], places: int | dict[str, int] = 4) -> dict:
    """A table's value for a gr.Dataframe: each number shown with the same decimals (``places``, or per
    column), "–" where a value does not apply (None). The cells stay numbers: a click on a header sorts them
    as numbers, and the API returns them as computed, not as the text shown (Gradio's display_value)."""
    digits = [places if isinstance(places, int) else places.get(h) for h in headers]

    def shown(value: Any, d: int | None) -> str:
        if value is None:
            return "–"
        return f"{value:.{d}f}" if isinstance(value, float) and d is not None else str(value)

    display = [[shown(v, d) for v, d in zip(row, digits)] for row in rows]
    return {"headers": headers, "data": rows,
            "metadata": {"display_value": display, "styling": [[""] * len(headers) for _ in rows]}}


def md_text(text: str) -> str:
    """Plain text (a note, an error naming a file) for a Markdown component: `<defect>` and the like shown
    as written instead of being taken for HTML tags (and dropped)."""
    return html.escape(str(text), quote=False)


def headline_verdict(postprocess: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The Detect tab's score box (a gr.Label): its headline the verdict at the threshold, its bars the score
    ("anomalous") and the threshold, side by side, from a ``score_box`` value. Before, the bars were the score
    and 1 - score ("normal") and gr.Label headlined the longer one: "normal" over a verdict of ANOMALOUS
    whenever the threshold was under 0.5 (a suggested threshold often is), and no threshold move changed it.
    Wraps the instance's postprocess (a gr.Label subclass would make Gradio write an app.pyi beside app.py)."""
    def headlined(value):
        if isinstance(value, dict) and "verdict" in value:
            data = postprocess(value["scores"])
            data.label = value["verdict"]  # and the score's bar above the threshold's, whichever is longer
            data.confidences = sorted(data.confidences or [], key=lambda c: c.label != "anomalous")
            return data
        return postprocess(value)

    return headlined


def score_box(score: float, threshold: float) -> dict:
    """What the score box shows (``headline_verdict``) for a score at a threshold; through the API the label
    is the verdict, the confidences "anomalous" (the score) and "threshold"."""
    return {"verdict": verdict_at(score, threshold), "scores": {"anomalous": score, "threshold": threshold}}


def verdict_text(last: dict, threshold: float, anomaly_map: np.ndarray | None = None) -> str:
    """The verdict for a Detect result (``last``) at ``threshold``: redrawn on every threshold move. With the
    map, how much of the image the region drawn below covers (an empty region looked like a failed drawing)."""
    verdict = verdict_at(last["score"], threshold)
    head = f"**{verdict.upper()}** — score **{last['score']:.4f}** vs threshold {threshold:.4f} ({last['how']})"
    if anomaly_map is not None:
        share = float(threshold_mask(anomaly_map, threshold).mean())
        covered = "under 0.1%" if 0 < share < 0.001 else f"{share:.1%}"
        head += (f"; region at or above it: **{covered}** of the image" if share else
                 f"; region at or above it: **none** (the map's highest value is {float(np.max(anomaly_map)):.4f})")
    return "\n\n".join([head, *last["lines"]])


def colorbar_html() -> str:
    stops = ", ".join(f"rgb{tuple(int(c) for c in colormap(np.array([[v]]))[0, 0])} {v * 100:.0f}%"
                      for v in np.linspace(0, 1, 9))
    return (f'<div style="display:flex;align-items:center;gap:6px;font-size:12px">0.0'
            f'<div style="flex:1;height:12px;border-radius:3px;background:linear-gradient(to right, {stops})">'
            f'</div>1.0 <span style="opacity:.7">anomaly score</span></div>')


SHOW_THE_ANSWER = """() => { const score = document.querySelector('#score');
    const top = score ? score.getBoundingClientRect().top : 0;
    if (top < -8 || top > window.innerHeight / 2) score.scrollIntoView({behavior: 'smooth', block: 'start'}); }"""


# What a person typed (object name, defect words, the three prompt lists) is kept in the browser's localStorage
# on every change (typed, pasted, or an example's name and words) and put back when the page opens: a reload, a
# closed tab or a restarted server keeps an hour of prompt editing. In the browser only: no server call per
# keystroke, and nothing to decrypt after a restart (gr.BrowserState's key changes with each server start).
TYPED_KEY = "winclip-typed-v1"
KEEP_TYPED = f"""(...typed) => {{ try {{ localStorage.setItem('{TYPED_KEY}', JSON.stringify(typed)); }} catch (e) {{}}
    return typed; }}"""
RESTORE_TYPED = f"""(...now) => {{ try {{ const kept = JSON.parse(localStorage.getItem('{TYPED_KEY}'));
    if (Array.isArray(kept) && kept.length === now.length && kept.every(v => typeof v === 'string')) return kept;
    }} catch (e) {{}} return now; }}"""


def reset_lists_js() -> str:
    """The playground's reset: the paper's three lists back in their boxes (and kept), the object name and the
    defect words as they are."""
    lists = json.dumps(["\n".join(v) for v in default_lists().values()])
    return f"(name, words, ...lists) => ({KEEP_TYPED})(name, words, ...{lists})"


def example_rows() -> list[list[Any]]:
    """The Detect tab's examples: [query, references, object name, defect words] each."""
    refs = [str(p) for p in sorted(EXAMPLES_DIR.glob("*_good_*.png"))][:2]
    return [[str(q), refs, "washer", q.stem.split("_")[-1]] for q in sorted(EXAMPLES_DIR.glob("*_query_*.png"))]


IMAGE_BOX_HEIGHT = 260  # px: the query and references side by side, the Detect button under them in view


def detect_tab(service: DetectionService) -> SimpleNamespace:
    """The Detect tab's layout (inside a gr.Blocks); its components by name."""
    with gr.Tab("Detect"):
        with gr.Row():
            with gr.Column():
                # in the order people work: name the part, upload it (and good ones), Detect; the settings
                # after the button, so that at 1280 x 800 it is on screen without scrolling
                with gr.Row():  # side by side from ~500 px, one under the other on a phone
                    object_name = gr.Textbox("object", label="Object name", max_length=200, min_width=230)
                    defect_words = gr.Textbox("", label="Defect words (comma-separated)", max_length=2000,
                                              placeholder="e.g. crack, scratch", min_width=230)
                with gr.Row(equal_height=True):
                    query = gr.Image(type="filepath", label="Query image", sources=["upload", "clipboard"],
                                     elem_id="query", height=IMAGE_BOX_HEIGHT)
                    query.preprocess = _uploaded_path
                    references = gr.File(file_count="multiple", file_types=["image"], elem_id="references",
                                         label=f"Normal references (0–{MAX_SHOTS}, optional)",
                                         height=IMAGE_BOX_HEIGHT)
                run = gr.Button("Detect", variant="primary", elem_id="detect")
                with gr.Row():
                    min_window = gr.Slider(0, 5, 2, step=1, label="Smallest window (patches, 0 = none)")
                    max_window = gr.Slider(1, 5, 3, step=1, label="Largest window (patches)")
                image_scale = gr.Checkbox(True, label="Image scale (class token) in the map")
                threshold = gr.Slider(0, 1, 0.5, step=0.0001, label="Threshold")
                use_suggested = gr.Button("Use the suggested threshold", visible=False, size="sm",
                                          elem_id="use-suggested")
                with gr.Accordion("Advanced", open=False):
                    model_info = gr.Markdown(service.status(), elem_id="model-info")
                    scoring = gr.Radio(["two_class", "one_class"], value="two_class", label="Scoring (Table 3)")
                    aggregation = gr.Radio(["harmonic", "arithmetic"], value="harmonic",
                                           label="Window aggregation (Table 8)")
            with gr.Column():
                score = gr.Label(label="Anomaly score", elem_id="score")
                score.postprocess = headline_verdict(score.postprocess)
                verdict = gr.Markdown(elem_id="verdict")
                # JPEG: a 900 px overlay encodes in ~4 ms (PNG ~360 ms and ~750 kB, WebP ~90 ms); ten per click
                heat = gr.Image(label="Heat map", type="pil", format="jpeg", elem_id="overlay")
                gr.HTML(colorbar_html())
                mask = gr.Image(label="Region at or above the threshold", type="pil", format="jpeg")
        panels = gr.Gallery(label="Zero-shot vs few-shot and per-scale maps", columns=4, height="auto",
                            format="jpeg", elem_id="panels")
        rows = example_rows()
        if rows:
            gr.Examples(rows, [query, references, object_name, defect_words], label="Examples (synthetic washers)",
                        elem_id="examples")
    return SimpleNamespace(query=query, references=references, object_name=object_name, defect_words=defect_words,
                           min_window=min_window, max_window=max_window, image_scale=image_scale,
                           threshold=threshold, use_suggested=use_suggested, model_info=model_info, scoring=scoring,
                           aggregation=aggregation, run=run, score=score, verdict=verdict, heat=heat, mask=mask,
                           panels=panels)


def batch_tab() -> SimpleNamespace:
    """The Batch tab's layout; its components by name."""
    with gr.Tab("Batch"):
        gr.Markdown(f"Score a whole set: many images or a `.zip` (at most {MAX_BATCH_FILES} images, "
                    f"{MAX_BATCH_BYTES // 2**20} MB). Uses the Detect tab's object name, defect words, references "
                    "and settings. A zip (or folder) with `good/` plus one folder per defect type is labelled: "
                    "you also get AUROC / AP / F1-max, and pixel metrics with `masks/<defect>/<stem>.png`.")
        with gr.Row():
            batch_files = gr.File(file_count="multiple", file_types=["image", ".zip"], elem_id="batch-files",
                                  label="Images or .zip files")
            with gr.Column():
                batch_method = gr.Radio([m.title for m in methods.all_methods()], value="WinCLIP",
                                        label="Method", info=" · ".join(f"{m.title}: {m.help}"
                                                                        for m in methods.all_methods()[1:]))
                auto_threshold = gr.Checkbox(True, label="Threshold from the normal references (>= 2; "
                                             "else 0.5), instead of the Detect tab's slider")
                with gr.Row():
                    batch_run = gr.Button("Inspect", variant="primary", elem_id="inspect")
                    batch_stop = gr.Button("Stop", variant="stop")
                batch_summary = gr.Markdown(elem_id="batch-summary")
                # until a run has files: one line saying so (CSS), not a large empty box; the ROC is hidden until a
                # run has a curve, and the table shows its real headers from the start (Gradio's default: "1 2 3")
                batch_downloads = gr.File(label="Downloads: results.csv, report.html, summary.json, overlays.zip",
                                          file_count="multiple", interactive=False, elem_id="batch-downloads")
        # one row high (the 5 most anomalous; the rest scroll): Gradio's default height left ~250 px
        # empty under a row, and the table below lists every file
        batch_gallery = gr.Gallery(label="Ranked, most anomalous first (⚠ at or above the threshold; scroll "
                                   "for more)", columns=GALLERY_COLUMNS, height=270, elem_id="batch-gallery")
        with gr.Row():
            batch_hist = gr.HTML(label="Score histogram", elem_id="batch-histogram")
            batch_roc = gr.LinePlot(x="false positive rate", y="true positive rate", label="ROC (labelled sets)",
                                    visible=False, elem_id="batch-roc")
        batch_table = gr.Dataframe(headers=list(TABLE_COLUMNS), label="Results (one row per file)", interactive=False,
                                   elem_id="batch-table")
    return SimpleNamespace(batch_files=batch_files, batch_method=batch_method, auto_threshold=auto_threshold,
                           batch_run=batch_run, batch_stop=batch_stop, batch_summary=batch_summary,
                           batch_downloads=batch_downloads, batch_gallery=batch_gallery, batch_hist=batch_hist,
                           batch_roc=batch_roc, batch_table=batch_table)


def playground_tab() -> SimpleNamespace:
    """The Prompt playground tab's layout; its components by name."""
    defaults = default_lists()
    with gr.Tab("Prompt playground"):
        gr.Markdown("Edit the ensemble, one entry per line: `{}` stands for the object in states and for the "
                    "state phrase in templates. Then re-score the query from the Detect tab (the Detect tab uses "
                    "these lists too). Image features are cached: only the text side is recomputed. What you type "
                    "here and in the object name and defect words stays in this browser: a reload keeps it.")
        with gr.Row():
            normal_states = gr.Textbox("\n".join(defaults["normal_states"]), lines=7, label="Normal states")
            anomalous_states = gr.Textbox("\n".join(defaults["anomalous_states"]), lines=7,
                                          label="Anomalous states (defect words are added)")
            templates = gr.Textbox("\n".join(defaults["templates"]), lines=7, label="Templates")
        with gr.Row():  # a small button under the lists, not a full-width bar
            reset_lists = gr.Button("Reset the three lists to the paper's", size="sm", scale=0, min_width=300,
                                    elem_id="reset-lists")
        with gr.Accordion("Measure on your labelled images", open=True):
            gr.Markdown("Upload a zip with `good/` plus one folder per defect type (optional "
                        "`masks/<defect>/<stem>.png`). Images are encoded once; every later measurement only "
                        "runs the text encoder on new prompts and re-scores. Rows: the paper's set, the current "
                        "edit (the lists above plus the Detect tab's defect words) and any saved sets.")
            with gr.Row():  # the upload and its buttons on the left, what to compare it with on the right
                with gr.Column():
                    labelled = gr.File(file_count="multiple", file_types=[".zip", "image"], elem_id="labelled",
                                       label="Labelled zip", height=160)
                    with gr.Row():
                        measure_run = gr.Button("Measure prompt sets", variant="primary", elem_id="measure")
                        use_batch = gr.Button("Use the Batch tab's upload")
                with gr.Column():
                    set_uploads = gr.File(file_count="multiple", file_types=[".json"], elem_id="set-uploads",
                                          label="Saved prompt sets (.json)", height=120)
                    shipped_names = gr.CheckboxGroup([s.name for s in shipped_sets()], label="Shipped sets")
                    suggest_pruned = gr.Checkbox(False, label="Suggest a pruned set (checked on held-out images)")
            measure_summary = gr.Markdown(elem_id="measure-summary")
            sets_table = gr.Dataframe(headers=HEADERS["sets"], label="Prompt sets on the labelled images",
                                      interactive=False, elem_id="sets-table")
            with gr.Row():  # the numbers first: they stay on screen when the prompts are long
                per_prompt = gr.Dataframe(headers=HEADERS["per_prompt"], interactive=False, wrap=True,
                                          label="Each prompt of the current edit alone against the other class's "
                                                "prototype (click a header to sort)", elem_id="per-prompt")
                word_auroc = gr.Dataframe(headers=HEADERS["word_auroc"], interactive=False,
                                          label="Defect words: AUROC with minus without",
                                          elem_id="word-auroc")
            current_set = gr.File(label="The current edit as a prompt set (download, upload later)",
                                  interactive=False, elem_id="current-set")
        rescore = gr.Button("Re-score query with these prompts", variant="primary")
        prompt_summary = gr.Markdown()
        word_table = gr.Dataframe(headers=HEADERS["word_scores"],
                                  label="Each defect word's contribution to the zero-shot score",
                                  interactive=False)
        prompt_table = gr.Dataframe(headers=HEADERS["prompt_scores"],
                                    label="Every prompt against the query (click a header to sort)",
                                    interactive=False)
    return SimpleNamespace(normal_states=normal_states, anomalous_states=anomalous_states, templates=templates,
                           labelled=labelled, set_uploads=set_uploads, shipped_names=shipped_names,
                           suggest_pruned=suggest_pruned, measure_run=measure_run, use_batch=use_batch,
                           reset_lists=reset_lists,
                           measure_summary=measure_summary, sets_table=sets_table, per_prompt=per_prompt,
                           word_auroc=word_auroc, current_set=current_set, rescore=rescore,
                           prompt_summary=prompt_summary, word_table=word_table, prompt_table=prompt_table)


def build_demo(service: DetectionService) -> gr.Blocks:
    """The whole UI around a service (loaded or not). Does no model work itself."""

    def start_seconds() -> float:
        """What every GPU call may spend before its own work: a fresh worker, and the precision self-check
        where this machine has no verdict yet (it runs in the first GPU call; the verdict is cached)."""
        return GPU_START_SECONDS + (GPU_CHECK_SECONDS if service.check_pending() else 0)

    def settle() -> None:
        """Inside a GPU call: run auto's precision check first if it has not run in this process."""
        service.settle_precision()

    def wait_for_model(progress: gr.Progress) -> float:
        """A request during the (first-run) load waits for it, saying so, up to WINCLIP_LOAD_WAIT seconds;
        the seconds it waited."""
        start = time.perf_counter()
        if service.detector is None and service.loading:
            progress(0.0, desc=f"Waiting for the model to load ({service.settings.model})…")
            service.wait_for_model()
        return time.perf_counter() - start

    @gpu(lambda query=None, references=None, *rest, **kw: start_seconds() + 5 + GPU_IMAGE_SECONDS * (
        1 + len(references or [])))
    def detect(
        query: str | None,
        references: list[str] | None,
        object_name: str = "object",
        defect_words: str = "",
        min_window: float = 2,
        max_window: float = 3,
        image_scale: bool = True,
        threshold: float = 0.5,
        normal_states: str = "",
        anomalous_states: str = "",
        templates: str = "",
        scoring: str = "two_class",
        aggregation: str = "harmonic",
        progress: gr.Progress = gr.Progress(),
    ) -> tuple[dict[str, float], str, Image.Image, Image.Image, list[tuple[Image.Image, str]], dict]:
        """Score a query image with WinCLIP (zero-shot) or WinCLIP+ (with 1-4 normal references).

        Args:
            query: the image to inspect.
            references: 0-4 images of normal parts (WinCLIP+ when given).
            object_name: what the part is, e.g. "bottle"; used in the prompts.
            defect_words: comma-separated defect words, e.g. "crack, scratch".
            min_window: smallest window size in patches (0 = no windows).
            max_window: largest window size in patches.
            image_scale: include the class-token score in the map.
            threshold: score at or above which the image (and a pixel) counts as anomalous.
            normal_states: one per line, "{}" = object; empty = the paper's 7.
            anomalous_states: one per line; empty = the paper's 4.
            templates: one per line, "{}" = state phrase; empty = the paper's 22.
            scoring: "two_class" (paper) or "one_class" (ablation).
            aggregation: "harmonic" (paper) or "arithmetic" (ablation).
        Returns:
            score label, verdict text, heat-map overlay (query size), mask at threshold, component maps, and
            what a threshold move redraws from without the model (image, map, score, verdict lines).
        """
        opts = options_of(locals())
        start = time.perf_counter()  # the click's own time: what the person waits once it reaches the model
        waited = {"waiting for the model to load": wait_for_model(progress)}
        t0 = time.perf_counter()
        settle()
        waited["checking the precision"] = time.perf_counter() - t0
        seen: list[str] = []

        def stage(name: str) -> None:  # one bar: the stage the click is in, n of 6
            if name not in seen:
                seen.append(name)
            progress((len(seen), DETECT_STAGES), desc=name[0].upper() + name[1:] + "…")

        try:
            r = service.detect(query, list(references or []), opts, progress=stage)
        except (ValueError, WeightsError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        how = (f"{f'{r.shots}-shot WinCLIP+' if r.shots else 'zero-shot WinCLIP'}, "
               f"zero-shot score {r.prediction.zero_shot_score:.4f}")
        t0 = time.perf_counter()
        files = (outputs.image(r.overlay), outputs.image(r.mask),
                 [(outputs.image(im), caption) for im, caption in r.panels])
        steps = {**waited, **r.steps, "writing the images": time.perf_counter() - t0}
        spent = [f"{name} {seconds_text(seconds)}" for name, seconds in sorted(steps.items(), key=lambda kv: -kv[1])
                 if seconds >= 0.05]
        lines = [f"This click took **{seconds_text(time.perf_counter() - start)}** on the server"
                 + (f": {', '.join(spent)}." if spent else ".")
                 + (" New references and prompts are encoded once; the next click reuses them." if any(
                     name.startswith(("encoding", "text")) and seconds >= 0.5 for name, seconds in r.steps.items())
                    else "")]
        if r.suggested_threshold is not None:
            lines.append(f"Suggested threshold from the {r.shots} shots alone: **{r.suggested_threshold:.4f}** "
                         "(highest leave-one-out score of a normal shot).")
        elif r.shots == 1:
            lines.append("Give at least 2 references for a suggested threshold.")
        lines += [f"_{md_text(note)}_" for note in r.notes]
        last = {"image": r.image, "map": r.anomaly_map, "score": r.score, "how": how, "lines": lines,
                "suggested": r.suggested_threshold}
        return (score_box(r.score, r.threshold), verdict_text(last, r.threshold, last["map"]), *files,
                last)

    held = HeldMaps()

    @functools.wraps(detect)
    def detect_click(*args, **kwargs):
        """/detect in the main process: the image and map stay in ``held`` (bounded), the State gets a key
        (on ZeroGPU ``detect`` runs in the GPU worker, which cannot hold anything for later clicks)."""
        *shown, last = detect(*args, **kwargs)
        return (*shown, held.keep(last))

    def suggestion_button(last: dict | None):
        """The one-click button for the suggested threshold, shown when the last Detect had one."""
        value = (last or {}).get("suggested")
        return gr.update(visible=value is not None,
                         value=f"Use the suggested threshold {value:.4f}" if value is not None else None)

    def apply_suggested(last: dict | None):
        """The suggested threshold into the slider, and the verdict and mask redrawn at it (no model work)."""
        if not last or last.get("suggested") is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        value = round(float(last["suggested"]), 4)  # as the button shows it (the slider's step)
        return (value, *rethreshold(last, value))

    def rethreshold(last: dict | None, threshold: float):
        """A threshold move: the score box's verdict, the verdict line and the mask redrawn from the last
        Detect's map, on the CPU (no model work, so no GPU call)."""
        if not last:
            return gr.skip(), gr.skip(), gr.skip()
        threshold = float(threshold)
        box = score_box(last["score"], threshold)
        kept = held.get(last)
        if kept is None:
            return (box, verdict_text(last, threshold) + "\n\n_The map of this result is no longer held on the "
                    "server (it keeps the most recent ones): click Detect to redraw the region._", gr.skip())
        return box, verdict_text(last, threshold, kept[1]), outputs.image(mask_overlay(*kept, threshold))

    @gpu(lambda *args, **kwargs: start_seconds() + 10 + GPU_IMAGE_SECONDS)
    def explain(query, object_name, defect_words, min_window, max_window, image_scale, normal_states,
                anomalous_states, templates, scoring, aggregation, progress=gr.Progress()):
        opts = options_of(locals())
        wait_for_model(progress)
        settle()
        try:
            rep = service.explain_prompts(query, opts)
        except (ValueError, WeightsError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        summary = (f"{rep.prompt_count[0]} normal + {rep.prompt_count[1]} anomalous prompts; "
                   f"zero-shot image score **{rep.score:.4f}**. Probability = anomaly probability if that prompt "
                   "alone stood for its class against the other class's prototype.")
        words = rep.word_rows or [[NO_WORDS, round(rep.score, 5), round(rep.score, 5), 0.0]]
        return summary, number_table(rep.rows, HEADERS["prompt_scores"]), number_table(words, HEADERS["word_scores"])

    @gpu(lambda action, *args, **kwargs: start_seconds() + WORK_SECONDS[action](*args))
    def model_work(action: str, *args, **kwargs):
        """One bounded piece of a batch's or a measurement's model work (``WORK_SECONDS`` lists them): each
        is its own GPU call on ZeroGPU, where only a gr.Error's message crosses back from the worker."""
        settle()
        try:
            return getattr(service, action)(*args, **kwargs)
        except (ValueError, WeightsError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    stops: dict[str, threading.Event] = {}  # a browser session's Stop, asked after every row of its Batch run

    def stop_batch(request: gr.Request = None):
        """Stop: the running Batch run ends after its current row, keeping what it scored (table, files)."""
        event = stops.get(getattr(request, "session_hash", None) or "local")
        if event is not None:
            event.set()

    def inspect(files, references=None, object_name="object", defect_words="", min_window=2, max_window=3,
                image_scale=True, threshold=0.5, auto_threshold=True, normal_states="", anomalous_states="",
                templates="", scoring="two_class", aggregation="harmonic", method="WinCLIP", progress=gr.Progress(),
                request: gr.Request = None):
        """Score many images or a zip; yields partial results while it runs; Stop ends it after the current
        row with the results so far. On ZeroGPU the model work goes in GPU calls of at most ZERO_GPU_CHUNK
        images; elsewhere the rows stream from a thread as they are scored. Files and report are made here."""
        opts = options_of(locals())
        wait_for_model(progress)
        out_dir = Path(tempfile.mkdtemp(prefix="winclip-batch-"))
        stopped = stops[getattr(request, "session_hash", None) or "local"] = threading.Event()
        # the ROC is hidden until a run ends with one: an empty box (unlabelled sets) or the last run's curve
        # over a new run misled
        yield ("Preparing: reading the upload, the prompts and the references…", [], "", gr.update(visible=False),
               None, None)
        progress(0.0, desc="Preparing…")
        try:
            chosen = methods.get(method)

            def stage(text: str, done: int, total: int) -> None:  # a whole-set method's steps, before its rows
                progress((done, total), desc=f"{chosen.title}: {text}…")

            # ZeroGPU: GPU calls of ZERO_GPU_CHUNK images (a worker cannot call back, nor stream); here: one
            # stream, each row as it is scored, and Stop heard after the current one
            zero_gpu = on_zero_gpu()
            inputs, run = service.batch(list(files or []), list(references or []), opts, out_dir,
                                        bool(auto_threshold), method=chosen.name,
                                        chunk=model_work if zero_gpu else None, max_chunk=ZERO_GPU_CHUNK,
                                        stop=stopped.is_set, stage=None if zero_gpu else stage)
            rows: list[Row] = []
            total = len(inputs.items)
            progress((0, total), desc=(f"{chosen.title}: encoding and scoring the {total} images as one set (results "
                                       "come together at the end)…" if zero_gpu else f"{chosen.title}: starting…")
                     if chosen.whole_set else "Scoring…")
            for result in run:
                if isinstance(result, Summary):
                    yield batch_outputs(rows, result, out_dir)
                    return
                rows.append(result)
                progress((len(rows), total), desc=f"Scored {result.file}")
                if len(rows) % 8 == 0:
                    yield batch_outputs(rows, None, out_dir, total)
        except (ValueError, WeightsError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        finally:
            key = getattr(request, "session_hash", None) or "local"
            if stops.get(key) is stopped:
                del stops[key]
            # the unpacked zip, overlays and reports: Gradio has copied the downloads into its cache by now
            shutil.rmtree(out_dir, ignore_errors=True)

    def measure(labelled, references=None, object_name="object", defect_words="", min_window=2, max_window=3,
                image_scale=True, normal_states="", anomalous_states="", templates="", scoring="two_class",
                aggregation="harmonic", set_uploads=None, shipped_names=None, suggest_pruned=False,
                progress=gr.Progress()):
        """Measure the paper's prompt set, the current edit and saved sets on a labelled zip (encoded once)."""
        opts = options_of(locals())
        wait_for_model(progress)
        shipped = {s.name: s for s in shipped_sets()}
        extra = [shipped[n] for n in shipped_names or [] if n in shipped] + [
            getattr(f, "name", f) for f in set_uploads or []]
        try:
            r = service.compare_prompts(list(labelled or []), list(references or []), opts, extra,
                                        suggest_pruned=bool(suggest_pruned),
                                        progress=lambda done, total: progress((done, total), desc="Encoding images"),
                                        chunk=model_work, max_chunk=ZERO_GPU_CHUNK if on_zero_gpu() else LOCAL_CHUNK)
        except (ValueError, WeightsError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        encode = (f"encoded once in {seconds_text(r.encode_seconds)}" if r.encode_seconds
                  else "image features from the cache")
        lines = [f"{r.images} images ({r.good} good, {r.defective} defective; {encode}); all sets re-scored in "
                 f"**{r.score_seconds:.2f} s**. These AUROCs are measured on the same images you edit against: "
                 "good for comparing edits, optimistic as a promise for new parts."]
        if r.suggestion and r.suggestion.skipped:
            lines.append(f"_Suggestion skipped: {r.suggestion.skipped}._")
        elif r.suggestion:
            g = r.suggestion
            pruned = g.pruned_on_half
            lines.append(
                f"**Suggested pruned set** (greedy state removal), chosen on {g.split.choose} images and "
                f"**measured on the other {g.split.held_out} (held out)**: AUROC {g.start_auroc_held_out:.4f} "
                f"-> **{g.pruned_auroc_held_out:.4f}** (on the images it was chosen on: "
                f"{g.start_auroc_choose_half:.4f} -> {g.pruned_auroc_choose_half:.4f}, which flatters it). "
                f"Normal states: {'; '.join(pruned['normal_states'])}. Anomalous states: "
                f"{'; '.join(pruned['anomalous_states'])}.")
        if any(None in row for row in r.sets):
            lines.append(md_text("– in the table: WinCLIP+ AUROC needs normal references (Detect tab); pixel AUROC "
                                 "and PRO need masks (masks/<defect>/<stem>.png)."))
        lines += [f"_{md_text(e)}_" for e in r.errors[:10]]
        path = outputs.text("current_edit.json", json.dumps(r.current, indent=1))
        words = [[w[0], w[3], w[1], w[2]] for w in r.words] or [[NO_WORDS, None, None, None]]  # contribution 2nd
        return ("\n\n".join(lines), number_table(r.sets, HEADERS["sets"]),  # None: "–", explained above
                number_table([[auroc, cls, prompt] for cls, prompt, auroc in r.prompts], HEADERS["per_prompt"]),
                number_table(words, HEADERS["word_auroc"]), path)

    def prewarm(query, references, object_name, defect_words, min_window, max_window, image_scale, threshold,
                normal_states, anomalous_states, templates, scoring, aggregation):
        opts = options_of(locals())
        service.prewarm(query, list(references or []), opts)


    # uploads and results (Gradio's cache: 0.3 MB of results a 900 px Detect click, and its uploads) are deleted after
    # WINCLIP_OUTPUT_HOURS, and all of them when the server stops: a Space's disk does not fill up
    with gr.Blocks(title="WinCLIP anomaly detection", delete_cache=cache_schedule()) as demo:
        gr.Markdown("# WinCLIP / WinCLIP+ anomaly detection\nType the object name, upload a part (and a few "
                    "good ones), see the score and where the defect is. Zero-shot with no references; "
                    "WinCLIP+ with 1–4 normal references. No part at hand? Pick an example at the bottom of the "
                    "Detect tab.")
        status = gr.Markdown(banner(service), elem_id="banner")
        d = detect_tab(service)
        b = batch_tab()
        p = playground_tab()
        settings = [d.object_name, d.defect_words, d.min_window, d.max_window, d.image_scale]
        prompt_lists = [p.normal_states, p.anomalous_states, p.templates, d.scoring, d.aggregation]
        detect_inputs = [d.query, d.references, *settings, d.threshold, *prompt_lists]
        detect_outputs = [d.score, d.verdict, d.heat, d.mask, d.panels]
        last_detect = gr.State(None)  # the last Detect's key in ``held`` and its verdict: threshold moves redraw
        if not on_zero_gpu():  # on ZeroGPU caches live in the GPU worker: a warm-up call would spend quota for nothing
            # a Detect click then costs scoring and drawing only. The warm-up has its own queue: a click
            # during it starts at once and waits inside, where its verdict can count the wait (in the shared
            # queue the click waited unseen: 23 s before a handler that reported 0.21 s)
            for component in (d.query, d.references):
                component.upload(prewarm, detect_inputs, None, api_name=False, concurrency_id="warm-up",
                                 show_progress="hidden")
            d.object_name.blur(prewarm, detect_inputs, None, api_name=False, concurrency_id="warm-up",
                               show_progress="hidden")
        # one bar, over the score: a failed click leaves the last result's verdict and maps on screen (with the
        # bar over every output, Gradio blanked them all on an error). Enter in the object name or the defect
        # words detects as the button does (people type a name and press Enter)
        detect_triggers = [d.run.click, d.object_name.submit, d.defect_words.submit]
        gr.on(detect_triggers, detect_click, detect_inputs, [*detect_outputs, last_detect], api_name="detect",
              concurrency_id="model", show_progress_on=[d.score]
              ).then(suggestion_button, last_detect, d.use_suggested, api_name=False, queue=False)
        # Detect clicked below the answer (after picking an example at the page's foot, or on a phone, where the
        # answer is under the inputs): the page scrolls to the score, where the bar and the answer come.
        # In the browser only (Gradio's scroll_to_output neither scrolled here nor runs on Spaces)
        gr.on(detect_triggers, None, None, None, js=SHOW_THE_ANSWER, api_name=False, queue=False)
        d.use_suggested.click(apply_suggested, last_detect, [d.threshold, d.score, d.verdict, d.mask],
                              api_name=False, queue=False)
        # every move of the slider or its number box (typing there released nothing until the box lost focus:
        # a typed threshold and Enter left the old verdict); a move during a redraw waits, and only the last runs
        d.threshold.input(rethreshold, [last_detect, d.threshold], [d.score, d.verdict, d.mask], api_name=False,
                          queue=False, trigger_mode="always_last")
        p.rescore.click(explain, [d.query, *settings, *prompt_lists], [p.prompt_summary, p.prompt_table, p.word_table],
                        api_name="explain_prompts", concurrency_id="model",
                        show_progress_on=[p.prompt_summary])  # a failed re-score keeps the last tables
        b.batch_run.click(
            inspect, [b.batch_files, d.references, *settings, d.threshold, b.auto_threshold, *prompt_lists,
                      b.batch_method],
            [b.batch_summary, b.batch_gallery, b.batch_hist, b.batch_roc, b.batch_table, b.batch_downloads],
            # one bar, over the summary. A batch has a queue of its own off ZeroGPU, so a Detect click during a
            # long run waits for one batch of it (the service lets clicks in between batches), not for the run
            api_name="inspect", concurrency_id="model" if on_zero_gpu() else "batch",
            show_progress_on=[b.batch_summary])
        b.batch_stop.click(stop_batch, None, None, api_name=False, queue=False)
        p.measure_run.click(measure, [p.labelled, d.references, *settings, *prompt_lists, p.set_uploads,
                                      p.shipped_names, p.suggest_pruned],
                            [p.measure_summary, p.sets_table, p.per_prompt, p.word_auroc, p.current_set],
                            api_name="measure_prompts", concurrency_id="model", show_progress_on=[p.measure_summary])
        p.use_batch.click(lambda files: files, b.batch_files, p.labelled, api_name=False)

        def busy() -> bool:  # the status line will change: loading, checking the precision, preparing examples
            return bool(service.loading or service.checking or service.preparing)

        def refresh():  # banner and status follow a background load (first-run download) and what comes after
            return banner(service), service.status(), gr.Timer(active=busy())

        typed = [d.object_name, d.defect_words, p.normal_states, p.anomalous_states, p.templates]
        gr.on([box.change for box in typed], None, typed, None, js=KEEP_TYPED, api_name=False, queue=False)
        p.reset_lists.click(None, typed, typed, js=reset_lists_js(), api_name=False, queue=False)
        demo.load(None, typed, typed, js=RESTORE_TYPED, api_name=False, queue=False)

        poll = gr.Timer(2.0, active=busy())
        poll.tick(refresh, None, [status, d.model_info, poll], api_name=False, queue=False)
        # no progress cover (Gradio's default): it dimmed the banner as the page opened, with nothing to wait for
        demo.load(refresh, None, [status, d.model_info, poll], api_name=False, queue=False, show_progress="hidden")
    # Only the Examples' files are in Gradio's cache yet. It keeps an example's file past delete_cache for
    # some inputs but not for gr.File's list (the references): keep them all, or after WINCLIP_OUTPUT_HOURS
    # clicking an example would fail on its deleted references
    for files in demo.temp_file_sets:
        d.references.keep_in_cache.update(files)
    # what the server prepares ahead of any click (``prepare``): the prompts of the settings' start values (an
    # upload's warm-up then begins with the images), and what clicking each example and then Detect asks for
    start = [component.value for component in detect_inputs[2:]]
    examples = [(query, refs, _options(name, words, *start[2:])) for query, refs, name, words in example_rows()]
    demo.winclip_prepare = ([(None, [], _options(*start)), *examples],
                            "the start prompts" + (f" and {len(examples)} examples" if examples else ""))
    demo.winclip_service = service  # the service behind this UI (tests and tools reach it here)
    demo.winclip_held = held
    return demo


def prepare(argv: list[str] | None = None) -> tuple[gr.Blocks, str | None]:
    """Settings, process configuration, model load (background, or main thread on ZeroGPU) and the UI."""
    parser = argparse.ArgumentParser(description="WinCLIP Gradio demo")
    add_model_flags(parser)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"), help="bind address")
    args = parser.parse_args(argv)
    zero_gpu = on_zero_gpu()
    device = args.device
    if zero_gpu and device == "auto":
        device = "cuda"  # ZeroGPU: the model lives on cuda from the start; each call borrows the GPU
    configure_process(device)  # CPU allocator settings for this server process (WINCLIP_MALLOC_TUNING=0: off)
    pretrained = parse_pretrained(args.pretrained)
    # on ZeroGPU the main process has no GPU: auto's precision check runs in the first GPU call instead
    service = DetectionService(Settings(args.model, pretrained, device, args.precision),
                               check_in_background=not zero_gpu)
    if pretrained is None:
        print("WARNING: WINCLIP_PRETRAINED=none: random weights, scores are meaningless (tests only)")
    if zero_gpu:
        service.load()  # ZeroGPU: load in the main thread at start-up (a background-thread CUDA load is unsafe there)
    else:
        service.start_loading()  # elsewhere the page is up (and says so) during a first download
    demo = build_demo(service)
    if not zero_gpu:  # a first click on an example then costs scoring and drawing (ZeroGPU: caches live in the
        service.prepare(*demo.winclip_prepare)  # GPU worker, and preparing them would spend quota)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo, args.host


def middle_cut(name: str, limit: int = CAPTION_NAME_CHARS) -> str:
    """A file name cut in the middle to ``limit`` characters: its start and its end (the numbering and the
    extension) stay readable under a gallery tile; the table has the whole name."""
    if len(name) <= limit:
        return name
    tail = (limit - 1) // 2
    return f"{name[: limit - 1 - tail]}…{name[-tail:]}"


def caption_names(files: list[str], limit: int = CAPTION_NAME_CHARS) -> list[str]:
    """Each file's name under its gallery tile: the file name, or, where file names repeat (an MVTec test set
    has a 000.png per defect type), its folder and name ("broken_large/000.png"), the folder cut first."""
    names = [f.rsplit("/", 1)[-1] for f in files]
    if len(set(names)) == len(names):
        return [middle_cut(n, limit) for n in names]
    out = []
    for file, name in zip(files, names):
        folder, room = (file.rsplit("/", 2)[-2] if "/" in file else ""), limit - len(name) - 1
        if not folder or room < 4:  # no folder, or no room for one: the name as before
            out.append(middle_cut(name, limit))
        else:
            out.append(f"{folder if len(folder) <= room else folder[: room - 1] + '…'}/{name}")
    return out


def batch_outputs(rows: list[Row], summary: Summary | None, out_dir: Path, total: int | None = None):
    """Summary text, ranked gallery, histogram, ROC, table and downloads for the Batch tab."""
    import pandas as pd

    ok = sorted((r for r in rows if r.status == "ok"), key=lambda r: -r.score)
    shown = [r for r in ok if r.thumbnail]
    gallery = [(outputs.image(Image.open(io.BytesIO(r.thumbnail))),  # short captions: they fit under a tile
                f"{'⚠ ' if r.verdict == 'anomalous' else ''}{r.score:.3f} · {name}")
               for r, name in zip(shown, caption_names([r.file for r in shown]))]
    cells = [[(c, getattr(r, c)) for c in TABLE_COLUMNS] for r in rows]  # "–" where it does not apply to a file
    table = number_table([[None if v == "" and c != "error" else v for c, v in row] for row in cells],
                         list(TABLE_COLUMNS), BATCH_PLACES)
    scores, labels = [r.score for r in ok], [r.label for r in ok]
    if summary is None:  # the histogram so far, without the threshold lines (drawn with the summary)
        text = f"Inspecting… {len(rows)}/{total} files done."
        return text, gallery, fit_width(histogram_svg(scores, labels, {})), gr.skip(), table, gr.skip()
    c, t, rate = summary.counts, summary.threshold, summary.timing["images_per_s"] or 0
    lines = [f"**{c['scored']} scored**, {c['errors']} unreadable, **{c['anomalous']} at or above the threshold** "
             f"{t['value']:.4f} — {t['how']}; {rate:.{1 if rate >= 1 else 2}f} images/s."]  # how may hold ( )
    m = summary.metrics
    if "image" in m:
        lines.append(f"Image AUROC **{m['image']['auroc']:.4f}**, AP {m['image']['aupr']:.4f}, F1-max "
                     f"{m['image']['f1_max']:.4f}; F1-optimal threshold {m['f1_optimal_threshold']:.4f} (uses the "
                     "labels, unlike the threshold above).")
    if "pixel" in m:
        lines.append(f"Pixel AUROC {m['pixel']['pauroc']:.4f}, PRO {m['pixel']['pro']:.4f}, F1-max "
                     f"{m['pixel']['f1_max']:.4f}.")
    lines += [f"_{md_text(m[k])}_" for k in ("skipped", "pixel_skipped") if k in m]
    lines += [f"_{md_text(r.error)}_" for r in rows if r.status == "error"][:20]  # each error names its file
    lines += [f"_{md_text(note)}_" for note in summary.notes if not note.startswith("stopped after")][:20]
    lines[:0] = [f"**{md_text(note[0].upper() + note[1:])}.**" for note in summary.notes
                 if note.startswith("stopped after")]
    curve = summary.curves["roc"] if summary.curves else ([], [])
    roc = gr.update(value=pd.DataFrame({"false positive rate": curve[0], "true positive rate": curve[1]}),
                    visible=bool(summary.curves))  # shown for a labelled set with both classes only
    results = out_dir / "results"
    downloads = [str(results / n) for n in ("results.csv", "report.html", "summary.json")]
    if (results / "overlays").is_dir():
        downloads.append(stored_zip(results / "overlays", out_dir / "overlays.zip"))
    # the report's histogram: every bin (gaps show), one legend per run, the threshold line (and F1-optimal's)
    lines_at = {"threshold": t["value"], **({"F1-optimal": m["f1_optimal_threshold"]} if "f1_optimal_threshold" in m
                                           else {})}
    hist = (fit_width(histogram_svg(scores, labels, lines_at)) + f'<p style="font-size:12px">threshold '
            f'{t["value"]:.3f}: {sum(r.score >= t["value"] for r in ok)} of {len(ok)} at or above</p>')
    return "\n\n".join(lines), gallery, hist, roc, table, downloads


def stored_zip(folder: Path, target: Path) -> str:
    """``folder``'s files in a zip, stored: the overlays are JPEGs, which deflate would spend ~2.5 s per 100 MB
    on for a gain of 0.02%."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    return str(target)


def stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (docker stop, systemd, kill) stops the server as Ctrl+C does: launch() returns, so ``main``
    deletes this server's uploads and results, and the exit handlers run (removing the app's output folder);
    without this both stayed in the temporary directory after every such stop. Only in the server's own
    process: a process forked from it would run the server's exit handlers, removing the live server's
    folder, so it dies by the default action instead."""
    if os.getpid() != SERVER_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt  # what Gradio's launch() waits for to close the server


SERVER_PID = os.getpid()


def main(argv: list[str] | None = None) -> None:
    demo, host = prepare(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        demo.launch(server_name=host, max_file_size=MAX_FILE_SIZE, show_error=True, css=CSS)
    except KeyboardInterrupt:  # a stop while launch() was still starting the server, before it waits for one
        demo.close()
    finally:  # the server is closed (Ctrl+C, SIGTERM): no model work while the interpreter shuts down, and its
        # uploads and results go too (Gradio 6.31 meant to delete them as it shut down, but left every one of
        # them in GRADIO_TEMP_DIR, measured, for good)
        from gradio.route_utils import delete_files_created_by_app

        settled = demo.winclip_service.stop_background()
        delete_files_created_by_app(demo, age=None)  # all but the examples' files (Gradio keeps those)
        if not settled:
            failed = sys.exc_info()[1] is not None  # the server did not start (e.g. an address it does not have)
            if failed:  # what the error going up would print, had the process not to leave first
                traceback.print_exc()
            leave_now(1 if failed else 0)


def leave_now(status: int = 0) -> None:
    """The exit handlers (the output folder, Gradio's), then the process ends with ``status`` without the
    interpreter's shutdown: background model code still running then (the model loading, auto's precision
    check compiling) ended the process with "terminate called without an active exception" (SIGABRT),
    measured in 2 of 2 stops during each."""
    print(f"{'Stopped' if status == 0 else 'Not started'} with background model work still running (loading the "
          "model, auto's precision check compiling, which the next start redoes, or a step that did not finish "
          "within a minute): left without waiting for it.", file=sys.stderr if status else sys.stdout, flush=True)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
