"""Prompt experiments: re-scoring time of a labelled set with an edited prompt set, per-prompt table time.

    python benchmarks/prompts_bench.py [--images 200] [--encode 8] [--precision fp32] [--masks]

Real architecture (ViT-B-16-plus-240, random weights). ``--encode`` real images are encoded (the one-off
cost, timed per image); their features are tiled to ``--images`` rows, which costs the re-scoring exactly
what that many distinct images would. Then, as the playground does: the paper's set and an edited set
(two new states, so only their prompts reach the text encoder) compared, and the per-prompt table of the
paper's 242 prompts + one defect word's 22 (264), the edited set's defect-word table and its suggested
pruned set (the playground's "suggest" option). ``--masks``: every defective image has a ground-truth
mask (an ellipse), so each set's measurement includes the pixel metrics, as for a zip with masks.
Printed with the CPU and its instruction set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from winclip.hardware import describe_cpu  # noqa: E402
from winclip.runtime import configure_process  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--encode", type=int, default=8)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--masks", action="store_true", help="masks for the defective images: pixel metrics too")
    args = p.parse_args()
    configure_process("cpu")
    import numpy as np
    import torch

    from winclip import ImageFeatures, WinClip
    from winclip.prompt_experiments import (LabelledSet, PromptSet, compare_sets, defect_word_contributions,
                                            paper_default, per_prompt_auroc, suggest)
    from winclip.synthetic import make_part

    print(f"# {describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; {args.precision}"
          f"{'; with masks (pixel metrics)' if args.masks else ''}")
    detector = WinClip.from_pretrained("ViT-B-16-plus-240", pretrained=None, precision=args.precision)
    pixels = torch.stack([detector.preprocess(make_part(i, 480, ("none", "crack")[i % 2]).image)
                          for i in range(args.encode)])
    detector.encode(pixels[:1])  # warm-up
    t0 = time.perf_counter()
    feats = detector.encode(pixels)
    per_image = (time.perf_counter() - t0) / args.encode
    reps = -(-args.images // args.encode)
    tile = lambda t: t.repeat(reps, *([1] * (t.ndim - 1)))[: args.images]  # noqa: E731
    big = ImageFeatures(tile(feats.image_embeddings), tile(feats.patch_tokens),
                        {k: tile(v) for k, v in feats.window_embeddings.items()})
    labels = np.array([i % 2 for i in range(args.images)])
    masks = None
    if args.masks:
        from winclip.metrics import PIXEL_SIZE

        yy, xx = np.mgrid[:PIXEL_SIZE, :PIXEL_SIZE] / PIXEL_SIZE
        masks = np.stack([label * (((yy - 0.4 - 0.02 * (i % 10)) / 0.1) ** 2 + ((xx - 0.5) / 0.15) ** 2 <= 1)
                          for i, label in enumerate(labels)]).astype(bool)
    data = LabelledSet([f"{i}" for i in range(args.images)], labels, big, masks)
    t0 = time.perf_counter()
    compare_sets(detector, data, [paper_default()], "washer")
    first = time.perf_counter() - t0
    edited = PromptSet("edit", normal_states=("flawless {}", "perfect {}", "{} without defect"),
                       defect_words=("crack", "scratch"))
    t0 = time.perf_counter()
    compare_sets(detector, data, [paper_default(), edited], "washer")
    edit = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = per_prompt_auroc(detector, data, PromptSet("word", defect_words=("crack",)), "washer")
    table = time.perf_counter() - t0
    t0 = time.perf_counter()
    words = defect_word_contributions(detector, data, edited, "washer")
    word_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    suggestion = suggest(detector, data, edited, "washer")
    suggest_s = time.perf_counter() - t0
    print(f"one-off encoding: {per_image:.2f} s per image -> {per_image * args.images:.0f} s for {args.images} "
          f"images (measured on {args.encode}, scaled)")
    print(f"first measurement of the paper's set (242 prompts through the text encoder): {first:.2f} s")
    print(f"re-scoring {args.images} images with the paper's set and an edited one (a few new prompts): {edit:.2f} s")
    print(f"per-prompt AUROC table, {len(rows)} prompts on {args.images} images: {table:.2f} s")
    print(f"defect-word table of the edited set ({len(words)} words): {word_s:.2f} s")
    print(f"suggested pruned set of the edited set (greedy on a half, checked on the other; held-out AUROC "
          f"{suggestion.start_auroc_held_out:.4f} -> {suggestion.pruned_auroc_held_out:.4f}): {suggest_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
