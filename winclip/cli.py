"""Command line: ``python -m winclip predict ...``. Errors print one clear line and exit 2, no trace."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import sys
from typing import Sequence

from . import methods
from .config import WinClipConfig
from .hardware import PRECISIONS
from .loading import WeightsError
from .rows import DEFAULT_OVERLAY_FORMAT, OVERLAY_FORMATS
from .runtime import configure_process
from .settings import Settings, parse_pretrained


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model, --pretrained, --device, --precision (the CLI's subcommands and app.py); defaults from the
    WINCLIP_* environment variables (winclip.settings)."""
    defaults = Settings.from_env()
    parser.add_argument("--model", default=defaults.model,
                        help="open_clip model name or path to a model-config JSON (env WINCLIP_MODEL)")
    parser.add_argument("--pretrained", default=defaults.pretrained or "none",
                        help="open_clip tag, local weights file (.bin/.pt/.safetensors), or 'none' for random "
                             "init (tests only) (env WINCLIP_PRETRAINED)")
    parser.add_argument("--device", default=defaults.device,
                        help="auto (CUDA when present, else CPU), cpu or cuda[:N] (env WINCLIP_DEVICE)")
    parser.add_argument("--precision", default=defaults.precision,
                        choices=PRECISIONS,
                        help="auto (fp32 until a reduced precision passes its self-check on this machine: it "
                             "must match fp32 and, on a CPU, be faster; bf16 on GPUs with bf16 and CPUs with AMX, "
                             "fp16 on other GPUs, int8 on other x86 CPUs, then bf16 where they have AVX512-BF16), "
                             "fp32 reference, bf16, fp16 GPU only, int8 CPU only (env WINCLIP_PRECISION)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags and the window settings, shared by subcommands."""
    add_model_flags(parser)
    parser.add_argument("--scales", type=int, nargs="*", default=[2, 3], help="window sizes in patches (default 2 3)")
    parser.add_argument("--no-image-scale", action="store_true", help="leave the class-token score out of the map")


def method_help() -> str:
    return "; ".join(f"{m.name}: {m.help}" for m in methods.all_methods()).replace("%", "%%")  # argparse formats %


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m winclip", description="WinCLIP / WinCLIP+ anomaly detection")
    sub = parser.add_subparsers(dest="command", required=True)
    predict = sub.add_parser("predict", help="score one image (zero-shot, or few-shot with --normal)")
    predict.add_argument("--image", required=True, help="query image")
    predict.add_argument("--object", default="object", help="object name used in the prompts, e.g. bottle")
    predict.add_argument("--normal", nargs="*", default=[], help="normal reference images (WinCLIP+)")
    predict.add_argument("--defect", nargs="*", default=[], help="defect words, e.g. crack scratch")
    predict.add_argument("--save-map", help="write the heat-map overlay with colour bar to this PNG")
    predict.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    add_model_args(predict)

    inspect = sub.add_parser("inspect", help="score a whole set: files, folders (recursive) and .zip files")
    inspect.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files, folders, .zip files")
    inspect.add_argument("--object", default="object", help="object name used in the prompts, e.g. bottle")
    inspect.add_argument("--normal", nargs="*", default=[], metavar="FILE|DIR",
                         help="normal reference images or a folder of them (WinCLIP+)")
    inspect.add_argument("--defect", nargs="*", default=[], help="defect words, e.g. crack scratch")
    inspect.add_argument("--threshold", default="auto",
                         help="score threshold in [0, 1], or auto (from >= 2 normal images, else 0.5)")
    inspect.add_argument("--batch-size", type=int, default=8, help="images per encoder call")
    inspect.add_argument("--shard", default="0/1", metavar="I/N",
                         help="process the I-th of N deterministic parts (0 <= I < N) for splitting across machines")
    inspect.add_argument("--overlays", action="store_true", help="also write one full-size heat-map overlay per image")
    inspect.add_argument("--overlay-format", default=DEFAULT_OVERLAY_FORMAT, choices=tuple(OVERLAY_FORMATS),
                         help="overlay files: jpeg (quality 90, default: ~100x faster to write than png on large "
                              "images) or png (lossless)")
    inspect.add_argument("--method", default="winclip", choices=methods.names(), help=method_help())
    inspect.add_argument("--engine", default="local", choices=("local", "ray"),
                         help="local (this process) or ray (a pool of Ray actors: this machine, or a cluster with "
                              "--address; same files and metrics; not for whole-set methods such as musc)")
    inspect.add_argument("--address", help="with --engine ray: a running cluster (e.g. ray://head:10001 or auto); "
                         "default: a local Ray instance for this run")
    inspect.add_argument("--workers", type=int, default=1, help="with --engine ray: actors, one detector each")
    inspect.add_argument("--gpus-per-worker", type=float, default=0.0,
                         help="with --engine ray: GPUs per actor (> 0: the actors run on CUDA)")
    inspect.add_argument("--cpus-per-worker", type=float, default=None,
                         help="with --engine ray: CPUs reserved per actor, also its torch threads (default 1)")
    inspect.add_argument("--workdir", help="where zips are extracted (default: a temporary folder); on a "
                         "multi-machine Ray cluster a folder every node sees, as are the input paths")
    inspect.add_argument("--json", action="store_true", help="print summary.json to stdout, no progress bar")
    inspect.add_argument("--out", required=True, help="output folder: results.csv, summary.json, report.html")
    add_model_args(inspect)

    prompts = sub.add_parser("prompts", help="compare prompt sets on your own labelled images")
    prompts.add_argument("--labelled", required=True, metavar="DIR|ZIP",
                         help="folder or zip with good/ and one folder per defect type (optional masks/)")
    prompts.add_argument("--object", default="object", help="object name used in the prompts")
    prompts.add_argument("--sets", nargs="+", default=["default"], metavar="SET",
                         help="'default' (the paper's lists), a shipped set's name, or a prompt-set .json file")
    prompts.add_argument("--per-prompt", action="store_true", help="also each prompt's AUROC (per_prompt.csv)")
    prompts.add_argument("--suggest", action="store_true",
                         help="also a pruned set for the first set, chosen on half the images, measured on the other")
    prompts.add_argument("--normal", nargs="*", default=[], help="normal reference images (adds WinCLIP+ metrics)")
    prompts.add_argument("--batch-size", type=int, default=8)
    prompts.add_argument("--out", required=True, help="output folder: prompts.json (and per_prompt.csv)")
    add_model_args(prompts)

    evaluate = sub.add_parser("evaluate", help="the paper's benchmark protocol on MVTec-AD, VisA or your own folder")
    evaluate.add_argument("--dataset", required=True, choices=("mvtec", "visa", "folder"))
    evaluate.add_argument("--root", required=True, help="dataset folder (never downloaded)")
    evaluate.add_argument("--categories", nargs="*", help="default: every category found under --root")
    evaluate.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 4])
    evaluate.add_argument("--seeds", type=int, default=5, help="k-shot runs per k (references drawn by seed)")
    evaluate.add_argument("--ablation", default="winclip", help="preset: winclip, one_class, two_class, "
                          "state_ensemble, no_image_scale, no_mid_scale, no_small_scale, no_harmonic")
    evaluate.add_argument("--defect-words", default="none", choices=("none", "file", "dataset"),
                          help="task-specific states: none (paper default), file (prompts/defect_words.json), "
                               "dataset (defect folder names)")
    evaluate.add_argument("--pixel-size", type=int, default=256, help="resolution of pixel metrics (square)")
    evaluate.add_argument("--method", default="winclip", choices=methods.names(), help=method_help())
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--out", required=True, help="results folder (per-category JSON, report.md, results.csv)")
    add_model_args(evaluate)
    return parser


def load_detector(args: argparse.Namespace, compile_int8: bool = True):
    """``compile_int8=False`` for a few passes (``predict``): compiling the int8 float steps costs more
    than it saves there."""
    from .detector import WinClip

    config = WinClipConfig(window_scales=tuple(args.scales), image_scale=not args.no_image_scale)
    pretrained = parse_pretrained(args.pretrained)
    if pretrained is None:
        print("warning: random weights (--pretrained none): scores are meaningless, for tests only", file=sys.stderr)
    detector = WinClip.from_pretrained(args.model, pretrained, args.device, config, args.precision,
                                       strict=True,  # refuses emulated CPU bf16 with the reason
                                       compile_int8=compile_int8)
    runtime = detector.source.runtime
    if runtime.candidate:  # auto: a reduced precision only after it matched fp32 here
        from .precision_check import cached_result, resolve_candidate

        if cached_result(detector) is None:
            then = f" (then {runtime.fallback} if it fails)" if runtime.fallback else ""
            print(f"checking {runtime.candidate}{then} against fp32 on the example images (once per machine and "
                  "weights)...", file=sys.stderr)
        runtime, check = resolve_candidate(detector, runtime)
        if check is not None and not check.passed:  # the reason names every verdict (a fallback's too)
            print(f"note: {runtime.reason.split('; ', 1)[-1]}", file=sys.stderr)
        detector.source = replace(detector.source, runtime=runtime)  # int8 or fp32, and why
    return detector


def run_predict(args: argparse.Namespace) -> int:
    from .images import load_image
    from .visualize import save_map_png

    query = load_image(args.image)
    normals = [load_image(p) for p in args.normal]
    detector = load_detector(args, compile_int8=False)  # one query (+ references): not worth compiling
    detector.set_prompts(args.object, args.defect)
    detector.set_references([n.image for n in normals])
    result = detector.predict(query.image)
    for note in query.notes + tuple(n for im in normals for n in im.notes):
        print(f"note: {note}", file=sys.stderr)
    if args.save_map:
        save_map_png(args.save_map, query.image, result.anomaly_map)
    if args.json:
        runtime = detector.source.runtime
        print(json.dumps({"image": args.image, "score": result.score, "zero_shot_score": result.zero_shot_score,
                          "shots": result.shots, "map_max": float(result.anomaly_map.max()),
                          "map": args.save_map, "device": runtime.device, "precision": runtime.precision,
                          "checked": bool(runtime.candidate), "why": runtime.reason,
                          "kernels": detector.backbone.kernel_path()}))
    else:
        mode = f"{result.shots}-shot WinCLIP+" if result.shots else "zero-shot WinCLIP"
        print(f"{args.image}: anomaly score {result.score:.4f} ({mode})")
        if args.save_map:
            print(f"map written to {args.save_map}")
    return 0


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return index, count


def run_inspect(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from tqdm import tqdm

    from .images import load_image
    from .inputs import collect_inputs, shard
    from .inspection import run_inspection, run_settings

    index, count = _shard(args.shard)
    if args.threshold != "auto":
        try:
            value = float(args.threshold)
        except ValueError:
            raise ValueError(f"--threshold must be a number in [0, 1] or auto, got {args.threshold!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"--threshold must be in [0, 1], got {value}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    normal_files = []
    for entry in args.normal:
        path = Path(entry)
        normal_files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) \
            if path.is_dir() else [path]
    normals = [load_image(p) for p in normal_files]
    if args.engine == "ray" and (args.workers < 1 or args.gpus_per_worker < 0):
        raise ValueError("--workers must be >= 1 and --gpus-per-worker >= 0")
    with tempfile.TemporaryDirectory(prefix="winclip-inspect-", dir=args.workdir) as work:
        inputs = collect_inputs(args.images, Path(work))
        inputs.items = shard(inputs.items, index, count)
        if not inputs.items:
            raise ValueError(f"shard {args.shard} holds none of the files; use fewer shards")
        detector = load_detector(args)
        detector.set_prompts(args.object, args.defect)
        method = methods.get(args.method)
        if not method.uses_references and normals:
            print(f"note: --normal is not used by --method {method.name}", file=sys.stderr)
            normals = []
        memory = detector.memory_for([n.image for n in normals]) if normals else None
        settings = run_settings(detector, method, args.object, args.defect, memory, shard=args.shard,
                                labelled=inputs.labelled)
        bar = tqdm(total=len(inputs.items), unit="img", file=sys.stderr, disable=args.json, desc="inspect")
        try:
            if args.engine == "ray":
                from .distributed import RayOptions, run_on_ray

                summary, rows = run_on_ray(
                    detector, inputs, Path(args.out), progress=lambda row: bar.update(1),
                    prototypes=detector.prototypes, references=memory, threshold=args.threshold,
                    overlays=args.overlays, overlay_format=args.overlay_format, settings=settings, method=method,
                    ray_options=RayOptions(args.address, args.workers, args.gpus_per_worker, args.cpus_per_worker,
                                           args.batch_size))
            else:
                summary, rows = run_inspection(detector, inputs, Path(args.out), detector.prototypes, memory,
                                               args.threshold, args.batch_size, args.overlays, settings,
                                               progress=lambda row: bar.update(1), method=args.method,
                                               overlay_format=args.overlay_format)
        finally:
            bar.close()
    if args.json:
        print(json.dumps(summary.json()))
    else:
        c = summary.counts
        print(f"{c['scored']} scored, {c['errors']} unreadable, {c['anomalous']} at or above threshold "
              f"{summary.threshold['value']:.4f} — {summary.threshold['how']}; "
              f"{summary.timing['images_per_s']} images/s")
        if "image" in summary.metrics:
            m = summary.metrics["image"]
            print(f"image AUROC {m['auroc']:.4f}, AP {m['aupr']:.4f}, F1-max {m['f1_max']:.4f}")
        if "pixel" in summary.metrics:
            m = summary.metrics["pixel"]
            print(f"pixel AUROC {m['pauroc']:.4f}, PRO {m['pro']:.4f}, F1-max {m['f1_max']:.4f}")
        notes = [summary.metrics[key] for key in ("skipped", "pixel_skipped") if key in summary.metrics]
        notes += summary.notes  # what was skipped in the inputs, and why a set counts as unlabelled
        for note in notes[:20]:
            print(f"note: {note}")
        if len(notes) > 20:
            print(f"note: {len(notes) - 20} more notes in summary.json")
        print(f"written: {Path(args.out) / 'results.csv'}, summary.json, report.html" + (
            f", overlays/ ({c['scored']} {args.overlay_format.upper()} files)" if args.overlays else ""))
    return 0


def run_prompts(args: argparse.Namespace) -> int:
    import csv
    import tempfile
    from pathlib import Path

    from .images import load_image
    from .inputs import collect_inputs
    from .prompt_experiments import (PromptSet, compare_sets, defect_word_contributions, encode_labelled,
                                     paper_default, per_prompt_auroc, shipped_sets, suggest)

    shipped = {s.name: s for s in shipped_sets()}
    sets = [paper_default() if name == "default" else shipped[name] if name in shipped else PromptSet.from_file(name)
            for name in args.sets]
    normals = [load_image(p) for p in args.normal]
    with tempfile.TemporaryDirectory(prefix="winclip-prompts-") as work:
        inputs = collect_inputs([args.labelled], Path(work))
        detector = load_detector(args)
        data = encode_labelled(detector, inputs, args.batch_size)
    memory = detector.memory_for([n.image for n in normals]) if normals else None
    report = {"object": args.object, "images": len(data.names), "good": int((data.labels == 0).sum()),
              "defective": int((data.labels == 1).sum()), "unreadable": data.errors,
              "encode_seconds": round(data.seconds, 3), "sets": compare_sets(detector, data, sets, args.object, memory)}
    report["defect_words"] = {s.name: defect_word_contributions(detector, data, s, args.object) for s in sets
                              if s.defect_words}
    if args.suggest:
        report["suggestion"] = suggest(detector, data, sets[0], args.object).to_dict()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(json.dumps(report, indent=1))
    if args.per_prompt:
        with open(out / "per_prompt.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, ["set", "class", "prompt", "auroc"])
            writer.writeheader()
            for s in sets:
                for row in per_prompt_auroc(detector, data, s, args.object):
                    writer.writerow({"set": s.name, **row, "auroc": f"{row['auroc']:.6f}"})
    for r in report["sets"]:
        line = f"{r['set']}: zero-shot image AUROC {r['zero_shot']['auroc']:.4f}, AP {r['zero_shot']['aupr']:.4f}"
        if "winclip_plus" in r:
            line += f"; WinCLIP+ AUROC {r['winclip_plus']['auroc']:.4f}"
        if "pixel" in r:
            line += f"; pixel AUROC {r['pixel']['pauroc']:.4f}, PRO {r['pixel']['pro']:.4f}"
        print(line)
    print(f"written: {out / 'prompts.json'}" + (f", {out / 'per_prompt.csv'}" if args.per_prompt else ""))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .datasets import list_categories, load_category
    from .evaluation import EvalSettings, evaluation_config, run_evaluation

    evaluation_config(WinClipConfig(), args.ablation)  # reject an unknown preset before loading anything
    if any(k < 0 for k in args.shots) or args.seeds < 1 or args.pixel_size < 8:
        raise ValueError("--shots must be >= 0, --seeds >= 1 and --pixel-size >= 8")
    names = args.categories or list_categories(args.dataset, args.root)
    categories = [load_category(args.dataset, args.root, name) for name in names]
    detector = load_detector(args)
    settings = EvalSettings(shots=tuple(args.shots), seeds=args.seeds, pixel_size=args.pixel_size,
                            batch_size=args.batch_size, defect_words=args.defect_words, ablation=args.ablation,
                            model=args.model, pretrained=str(args.pretrained),
                            precision=detector.source.runtime.precision, method=args.method)
    method = methods.get(args.method)
    if not method.uses_references:
        settings = replace(settings, shots=(0,), seeds=1)
    if not method.uses_text:
        settings = replace(settings, defect_words="none")
    out = Path(args.out) / args.dataset / (args.ablation if method.ablations else method.name)
    report = run_evaluation(detector, categories, settings, out)
    print(f"report: {report}")
    print(report.read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_process(getattr(args, "device", "cpu"))  # CPU allocator settings, before any tensor exists
    try:
        if args.command == "predict":
            return run_predict(args)
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "inspect":
            return run_inspect(args)
        if args.command == "prompts":
            return run_prompts(args)
    except (ValueError, WeightsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1
