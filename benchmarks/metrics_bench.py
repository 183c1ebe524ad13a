"""Pixel metrics (pAUROC, PRO, F1-max) on anomaly maps of a category's size, against scikit-learn.

    python benchmarks/metrics_bench.py [--images 83] [--size 256] [--grid 15] [--runs 3]

The maps are shaped like the detector's: a random ``--grid`` x ``--grid`` patch map per image, upsampled
bilinearly to ``--size`` (as ``evaluate``, ``inspect`` and the playground compare them with the masks),
so smooth, with about as many distinct values as real maps. The masks are one ellipse in every other
image. ``winclip.metrics.pixel_metrics`` is timed against scikit-learn's ``roc_auc_score`` and
``precision_recall_curve`` (two of its three metrics, each with its own sort) on the same maps, and its
pAUROC and F1-max are checked against them; pixel_metrics's peak memory is printed too. Printed with
the CPU and its instruction set.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from winclip.hardware import describe_cpu  # noqa: E402


def maps_and_masks(images: int, size: int, grid: int, seed: int = 0):
    import numpy as np
    import torch

    from winclip.detector import upsample

    rng = np.random.default_rng(seed)
    maps = upsample(torch.from_numpy(rng.random((images, grid, grid), dtype=np.float32)), (size, size)).numpy()
    yy, xx = np.mgrid[:size, :size] / size
    masks = np.zeros((images, size, size), dtype=bool)
    for i in range(0, images, 2):
        cy, cx, ry, rx = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.03, 0.2), rng.uniform(0.03, 0.2)
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return maps, masks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=83, help="test images (83: MVTec-AD's bottle)")
    p.add_argument("--size", type=int, default=256, help="the maps' side (evaluate's --pixel-size)")
    p.add_argument("--grid", type=int, default=15, help="the patch map's side before upsampling")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from winclip.metrics import f1_max, pixel_metrics

    maps, masks = maps_and_masks(args.images, args.size, args.grid)
    print(f"# {describe_cpu()}; numpy {np.__version__}")
    print(f"# {args.images} maps of {args.size} x {args.size} ({maps.size / 1e6:.1f} M pixels, "
          f"{len(np.unique(maps)) / 1e6:.1f} M distinct values), seconds per call (runs: {args.runs} each)")

    def sklearn_two() -> dict[str, float]:
        labels, scores = masks.ravel(), maps.ravel()
        # f1_max: the image-level F1-max, the maximum over scikit-learn's precision_recall_curve
        return {"pauroc": float(roc_auc_score(labels, scores)), "f1_max": f1_max(labels, scores)}

    results = {}
    before, gained = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 0.0
    for name, run in (("pixel_metrics (pAUROC, PRO, F1-max)", lambda: pixel_metrics(maps, masks)),
                      ("scikit-learn roc_auc_score + precision_recall_curve", sklearn_two)):
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            results[name] = run()
            times.append(time.perf_counter() - start)
        print(f"{name}: {' '.join(f'{t:.2f}' for t in times)} (median {sorted(times)[len(times) // 2]:.2f})")
        if not gained:  # pixel_metrics runs first: the process's peak so far is its own
            gained = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
            print(f"  peak RSS above the maps and masks: {gained:.0f} MB")
    ours, theirs = results.values()
    gaps = {k: abs(ours[k] - theirs[k]) for k in theirs}
    print("difference from scikit-learn: " + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
    return 0 if max(gaps.values()) < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
