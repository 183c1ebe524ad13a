"""Command line: ``python -m winclip predict ...``. Errors print one clear line and exit 2, no trace."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .config import WinClipConfig
from .loading import DEFAULT_MODEL, DEFAULT_PRETRAINED, WeightsError
from .runtime import configure_process


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Model flags shared by subcommands; defaults come from the WINCLIP_* environment variables."""
    parser.add_argument("--model", default=os.environ.get("WINCLIP_MODEL", DEFAULT_MODEL),
                        help="open_clip model name or path to a model-config JSON (env WINCLIP_MODEL)")
    parser.add_argument("--pretrained", default=os.environ.get("WINCLIP_PRETRAINED", DEFAULT_PRETRAINED),
                        help="open_clip tag, local weights file (.bin/.pt/.safetensors), or 'none' for random "
                             "init (tests only) (env WINCLIP_PRETRAINED)")
    parser.add_argument("--device", default=os.environ.get("WINCLIP_DEVICE", "cpu"), help="cpu or cuda (env WINCLIP_DEVICE)")
    parser.add_argument("--precision", default=os.environ.get("WINCLIP_PRECISION", "fp32"),
                        choices=("fp32", "bf16", "fp16"), help="fp32 reference, bf16 fast on CPU/GPU, fp16 GPU (env WINCLIP_PRECISION)")
    parser.add_argument("--scales", type=int, nargs="*", default=[2, 3], help="window sizes in patches (default 2 3)")
    parser.add_argument("--no-image-scale", action="store_true", help="leave the class-token score out of the map")


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
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--out", required=True, help="results folder (per-category JSON, report.md, results.csv)")
    add_model_args(evaluate)
    return parser


def load_detector(args: argparse.Namespace):
    from .detector import WinClip

    config = WinClipConfig(window_scales=tuple(args.scales), image_scale=not args.no_image_scale)
    pretrained = None if str(args.pretrained).lower() in ("none", "") else args.pretrained
    if pretrained is None:
        print("warning: random weights (--pretrained none): scores are meaningless, for tests only", file=sys.stderr)
    return WinClip.from_pretrained(args.model, pretrained, args.device, config, args.precision)


def run_predict(args: argparse.Namespace) -> int:
    from .images import load_image
    from .visualize import save_map_png

    query = load_image(args.image)
    normals = [load_image(p) for p in args.normal]
    detector = load_detector(args)
    detector.set_prompts(args.object, args.defect)
    detector.set_references([n.image for n in normals])
    result = detector.predict(query.image)
    for note in query.notes + tuple(n for im in normals for n in im.notes):
        print(f"note: {note}", file=sys.stderr)
    if args.save_map:
        save_map_png(args.save_map, query.image, result.anomaly_map)
    if args.json:
        print(json.dumps({"image": args.image, "score": result.score, "zero_shot_score": result.zero_shot_score,
                          "shots": result.shots, "map_max": float(result.anomaly_map.max()),
                          "map": args.save_map}))
    else:
        mode = f"{result.shots}-shot WinCLIP+" if result.shots else "zero-shot WinCLIP"
        print(f"{args.image}: anomaly score {result.score:.4f} ({mode})")
        if args.save_map:
            print(f"map written to {args.save_map}")
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
                            model=args.model, pretrained=str(args.pretrained), precision=args.precision)
    out = Path(args.out) / args.dataset / args.ablation
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
    except (ValueError, WeightsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1
