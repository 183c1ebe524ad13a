"""WinCLIP demo and prompt playground (Gradio). Thin: UI wiring only; the work is in winclip.service.

    python app.py                      # downloads ViT-B-16-plus-240 / laion400m_e31 on first run
    WINCLIP_PRETRAINED=weights/open_clip_pytorch_model.bin python app.py

Settings: WINCLIP_MODEL, WINCLIP_PRETRAINED, WINCLIP_DEVICE, WINCLIP_PRECISION (or --model ... flags);
port: GRADIO_SERVER_PORT.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

try:  # Hugging Face ZeroGPU: `spaces` must be imported before anything initialises CUDA
    import spaces
except ImportError:
    spaces = None

import gradio as gr
import numpy as np
from PIL import Image

from winclip.loading import WeightsError
from winclip.prompting import default_lists
from winclip.runtime import configure_process
from winclip.service import MAX_SHOTS, DetectionService, DetectOptions, Settings
from winclip.visualize import colormap

GPU_SECONDS = {"detect": 60, "explain": 60}  # ZeroGPU time asked per call (a GPU is borrowed per call)


def on_zero_gpu() -> bool:
    """A ZeroGPU Space (the `spaces` package sets SPACES_ZERO_GPU there)."""
    return spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


def gpu(seconds: int):
    """``spaces.GPU(duration=...)`` where the package is present (a no-op off ZeroGPU), else nothing."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=seconds)


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


def _options(object_name, defect_words, min_window, max_window, image_scale, threshold, normal_states,
             anomalous_states, templates, scoring, aggregation) -> DetectOptions:
    return DetectOptions(
        object_name=(object_name or "").strip() or "object", defect_words=_words(defect_words),
        min_window=int(min_window), max_window=int(max_window), image_scale=bool(image_scale),
        threshold=float(threshold), normal_states=_lines(normal_states), anomalous_states=_lines(anomalous_states),
        templates=_lines(templates), scoring=scoring or "two_class", aggregation=aggregation or "harmonic",
    )


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


def colorbar_html() -> str:
    stops = ", ".join(f"rgb{tuple(int(c) for c in colormap(np.array([[v]]))[0, 0])} {v * 100:.0f}%"
                      for v in np.linspace(0, 1, 9))
    return (f'<div style="display:flex;align-items:center;gap:6px;font-size:12px">0.0'
            f'<div style="flex:1;height:12px;border-radius:3px;background:linear-gradient(to right, {stops})">'
            f'</div>1.0 <span style="opacity:.7">anomaly score</span></div>')


def build_demo(service: DetectionService) -> gr.Blocks:
    """The whole UI around a service (loaded or not). Does no model work itself."""
    defaults = default_lists()

    def wait_for_model(progress: gr.Progress) -> None:
        """A request during the (first-run) load waits for it, saying so, up to WINCLIP_LOAD_WAIT seconds."""
        if service.detector is None and service.loading:
            progress(None, desc=f"Waiting for the model to load ({service.settings.model})…")
            service.wait_for_model()

    @gpu(GPU_SECONDS["detect"])
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
    ) -> tuple[dict[str, float], str, Image.Image, Image.Image, list[tuple[Image.Image, str]]]:
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
            score label, verdict text, heat-map overlay (query size), mask at threshold, component maps.
        """
        opts = _options(object_name, defect_words, min_window, max_window, image_scale, threshold,
                        normal_states, anomalous_states, templates, scoring, aggregation)
        wait_for_model(progress)
        try:
            r = service.detect(query, list(references or []), opts)
        except (ValueError, WeightsError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        lines = [f"**{r.verdict.upper()}** — score **{r.score:.4f}** vs threshold {r.threshold:.2f} "
                 f"({f'{r.shots}-shot WinCLIP+' if r.shots else 'zero-shot WinCLIP'}, "
                 f"zero-shot score {r.prediction.zero_shot_score:.4f}, {r.seconds * 1000:.0f} ms)"]
        if r.suggested_threshold is not None:
            lines.append(f"Suggested threshold from the {r.shots} shots alone: **{r.suggested_threshold:.4f}** "
                         "(highest leave-one-out score of a normal shot).")
        elif r.shots == 1:
            lines.append("Give at least 2 references for a suggested threshold.")
        lines += [f"_{note}_" for note in r.notes]
        return ({"anomalous": r.score, "normal": 1.0 - r.score}, "\n\n".join(lines), r.overlay, r.mask, r.panels)

    @gpu(GPU_SECONDS["explain"])
    def explain(query, object_name, defect_words, min_window, max_window, image_scale, normal_states,
                anomalous_states, templates, scoring, aggregation, progress=gr.Progress()):
        opts = _options(object_name, defect_words, min_window, max_window, image_scale, 0.5, normal_states,
                        anomalous_states, templates, scoring, aggregation)
        wait_for_model(progress)
        try:
            rep = service.explain_prompts(query, opts)
        except (ValueError, WeightsError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        summary = (f"{rep.prompt_count[0]} normal + {rep.prompt_count[1]} anomalous prompts; "
                   f"zero-shot image score **{rep.score:.4f}**. Probability = anomaly probability if that prompt "
                   "alone stood for its class against the other class's prototype.")
        words = rep.word_rows or [["(no defect words)", rep.score, rep.score, 0.0]]
        return summary, rep.rows, words

    with gr.Blocks(title="WinCLIP anomaly detection") as demo:
        gr.Markdown("# WinCLIP / WinCLIP+ anomaly detection\nType the object name, upload a part (and a few "
                    "good ones), see the score and where the defect is. Zero-shot with no references; "
                    "WinCLIP+ with 1–4 normal references.")
        status = gr.Markdown(banner(service), elem_id="banner")
        with gr.Tab("Detect"):
            with gr.Row():
                with gr.Column():
                    query = gr.Image(type="filepath", label="Query image", sources=["upload", "clipboard"],
                                     elem_id="query")
                    query.preprocess = _uploaded_path
                    references = gr.File(file_count="multiple", file_types=["image"], elem_id="references",
                                         label=f"Normal reference images (0–{MAX_SHOTS}; none = zero-shot)")
                    object_name = gr.Textbox("object", label="Object name", max_length=200)
                    defect_words = gr.Textbox("", label="Defect words (comma-separated, e.g. crack, scratch)",
                                              max_length=2000)
                    with gr.Row():
                        min_window = gr.Slider(0, 5, 2, step=1, label="Smallest window (patches, 0 = none)")
                        max_window = gr.Slider(1, 5, 3, step=1, label="Largest window (patches)")
                    image_scale = gr.Checkbox(True, label="Image scale (class token) in the map")
                    threshold = gr.Slider(0, 1, 0.5, step=0.005, label="Threshold")
                    with gr.Accordion("Advanced", open=False):
                        model_info = gr.Markdown(service.status())
                        scoring = gr.Radio(["two_class", "one_class"], value="two_class", label="Scoring (Table 3)")
                        aggregation = gr.Radio(["harmonic", "arithmetic"], value="harmonic",
                                               label="Window aggregation (Table 8)")
                    run = gr.Button("Detect", variant="primary", elem_id="detect")
                with gr.Column():
                    score = gr.Label(label="Anomaly score", elem_id="score")
                    verdict = gr.Markdown(elem_id="verdict")
                    heat = gr.Image(label="Heat map", type="pil", format="png", elem_id="overlay")
                    gr.HTML(colorbar_html())
                    mask = gr.Image(label="Region at or above the threshold", type="pil", format="png")
            panels = gr.Gallery(label="Zero-shot vs few-shot and per-scale maps", columns=4, height="auto")
            examples = sorted(EXAMPLES_DIR.glob("*_query_*.png"))
            if examples:
                refs = [str(p) for p in sorted(EXAMPLES_DIR.glob("*_good_*.png"))][:2]
                gr.Examples([[str(q), refs, "washer", q.stem.split("_")[-1]] for q in examples],
                            [query, references, object_name, defect_words], label="Examples (synthetic washers)")
        with gr.Tab("Prompt playground"):
            gr.Markdown("Edit the ensemble, one entry per line: `{}` stands for the object in states and for the "
                        "state phrase in templates. Then re-score the query from the Detect tab (the Detect tab uses "
                        "these lists too). Image features are cached: only the text side is recomputed.")
            with gr.Row():
                normal_states = gr.Textbox("\n".join(defaults["normal_states"]), lines=7, label="Normal states")
                anomalous_states = gr.Textbox("\n".join(defaults["anomalous_states"]), lines=7,
                                              label="Anomalous states (defect words are added)")
                templates = gr.Textbox("\n".join(defaults["templates"]), lines=7, label="Templates")
            rescore = gr.Button("Re-score query with these prompts", variant="primary")
            prompt_summary = gr.Markdown()
            word_table = gr.Dataframe(headers=["defect word", "score with all", "score without it", "contribution"],
                                      label="Each defect word's contribution to the zero-shot score",
                                      interactive=False)
            prompt_table = gr.Dataframe(headers=["class", "prompt", "cosine", "probability"],
                                        label="Every prompt against the query (click a header to sort)",
                                        interactive=False)

        settings = [object_name, defect_words, min_window, max_window, image_scale]
        prompt_lists = [normal_states, anomalous_states, templates, scoring, aggregation]
        detect_inputs = [query, references, *settings, threshold, *prompt_lists]
        detect_outputs = [score, verdict, heat, mask, panels]
        run.click(detect, detect_inputs, detect_outputs, api_name="detect")
        threshold.release(detect, detect_inputs, detect_outputs, api_name=False)
        rescore.click(explain, [query, *settings, *prompt_lists], [prompt_summary, prompt_table, word_table],
                      api_name="explain_prompts")
        def refresh():  # banner follows a background load (first-run download) until it ends
            return banner(service), service.status(), gr.Timer(active=service.loading)

        poll = gr.Timer(2.0, active=service.loading)
        poll.tick(refresh, None, [status, model_info, poll], api_name=False, queue=False)
        demo.load(refresh, None, [status, model_info, poll], api_name=False, queue=False)
    return demo


def prepare(argv: list[str] | None = None) -> tuple[gr.Blocks, str | None]:
    """Settings, process configuration, model load (background, or main thread on ZeroGPU) and the UI."""
    env = Settings.from_env()
    parser = argparse.ArgumentParser(description="WinCLIP Gradio demo")
    parser.add_argument("--model", default=env.model, help="open_clip model name or config JSON (WINCLIP_MODEL)")
    parser.add_argument("--pretrained", default=env.pretrained or "none",
                        help="tag, local weights file, or none = random (tests only) (WINCLIP_PRETRAINED)")
    parser.add_argument("--device", default=env.device, help="cpu or cuda (WINCLIP_DEVICE)")
    parser.add_argument("--precision", default=env.precision, choices=("fp32", "bf16", "fp16"),
                        help="WINCLIP_PRECISION")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME"), help="bind address")
    args = parser.parse_args(argv)
    zero_gpu = on_zero_gpu()
    device = args.device
    if zero_gpu and "WINCLIP_DEVICE" not in os.environ and "--device" not in (argv or []):
        device = "cuda"  # ZeroGPU: the model lives on cuda from the start; each call borrows the GPU
    configure_process(device)  # CPU allocator settings for this server process (WINCLIP_MALLOC_TUNING=0: off)
    pretrained = None if args.pretrained.lower() in ("none", "") else args.pretrained
    service = DetectionService(Settings(args.model, pretrained, device, args.precision))
    if pretrained is None:
        print("WARNING: WINCLIP_PRETRAINED=none: random weights, scores are meaningless (tests only)")
    if zero_gpu:
        service.load()  # ZeroGPU: load in the main thread at start-up (a background-thread CUDA load is unsafe there)
    else:
        service.start_loading()  # elsewhere the page is up (and says so) during a first download
    demo = build_demo(service)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo, args.host


def main(argv: list[str] | None = None) -> None:
    demo, host = prepare(argv)
    demo.launch(server_name=host, max_file_size=MAX_FILE_SIZE, show_error=True)


if __name__ == "__main__":
    main()
