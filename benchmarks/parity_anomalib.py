"""Parity of winclip with an independent implementation: anomalib 2.7.0's WinCLIP on open_clip 2.24.

anomalib supports open_clip < 2.26.1 only (on 3.x its windows mix, see docs/parity-and-evaluation.md), so it runs in its own
virtual environment. Both sides share random ViT-B-16-plus-240 weights (seeded) and the same
preprocessed inputs; anomalib's 21-template list is passed to winclip via ``templates=``.

    python -m venv --system-site-packages .venv-anomalib
    .venv-anomalib/bin/pip install open_clip_torch==2.24.0 anomalib==2.7.0
    python benchmarks/parity_anomalib.py --anomalib-python .venv-anomalib/bin/python

Prints max |difference| of image scores, grid maps and 240 px maps, and the maps' Pearson r,
zero-shot and K-shot. Exit code 1 if any difference exceeds --tol or Pearson < 0.9999.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OBJECT = "washer"


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anomalib-python", help="python of the venv with anomalib 2.7.0 + open_clip 2.24")
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args()
    if not args.anomalib_python:
        parser.error("--anomalib-python is required")

    sys.path.insert(0, str(ROOT))
    import open_clip

    from winclip import WinClip
    from winclip.prompting import prompt_data, read_prompt_file
    from winclip.synthetic import make_part
    from winclip.detector import upsample

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        detector = WinClip.from_pretrained("ViT-B-16-plus-240", pretrained=None, seed=0)
        torch.save(detector.backbone.model.state_dict(), work / "weights.pt")
        queries = [make_part(100 + i, 480, ("none", "scratch", "spot", "crack")[i % 4]).image for i in range(args.queries)]
        refs = [make_part(i, 480).image for i in range(max(args.shots))]
        q_pixels = torch.stack([detector.preprocess(im) for im in queries])
        r_pixels = torch.stack([detector.preprocess(im) for im in refs]) if refs else torch.empty(0, 3, 240, 240)
        torch.save({"queries": q_pixels, "references": r_pixels, "shots": args.shots}, work / "inputs.pt")

        start = time.perf_counter()
        subprocess.run([args.anomalib_python, str(ROOT / "benchmarks" / "anomalib_side.py"), "parity", str(work)],
                       check=True)
        print(f"anomalib side ran in {time.perf_counter() - start:.1f} s")
        theirs = torch.load(work / "anomalib.pt")

        templates = read_prompt_file(prompt_data("templates_anomalib21.txt"))
        detector.set_prompts(OBJECT, templates=templates)
        print(f"open_clip here {open_clip.__version__}; prompts {len(detector.prompts.normal)}+{len(detector.prompts.anomalous)}")
        ok = True
        for shots in args.shots:
            detector.set_references(r_pixels[:shots])
            feats = detector.encode(q_pixels)
            ours = detector.score(feats)
            th = theirs[shots]
            text_diff = (detector.prototypes - th["text"]).abs().max().item()
            window_diff = max((feats.window_embeddings[k] - w).abs().max().item() for k, w in zip((2, 3), th["windows"]))
            score_diff = (ours.image_scores - th["image_scores"]).abs().max().item()
            pred_diff = (ours.image_scores - th["pred_score"]).abs().max().item()
            grid_diff = (ours.grid_maps - th["grid_maps"]).abs().max().item()
            pix = upsample(ours.grid_maps, (240, 240))
            pix_diff = (pix - th["pixel_maps"]).abs().max().item()
            r = pearson(ours.grid_maps, th["grid_maps"])
            spread = (th["grid_maps"].amax() - th["grid_maps"].amin()).item()
            print(
                f"{shots}-shot: max|d| image score {score_diff:.2e} (forward {pred_diff:.2e}), grid map {grid_diff:.2e}, "
                f"240px map {pix_diff:.2e}, Pearson {r:.7f} (map range {spread:.3f}); "
                f"text prototypes {text_diff:.2e}, window embeddings {window_diff:.2e}"
            )
            print(f"   ours   scores {[round(v, 6) for v in ours.image_scores.tolist()]}")
            print(f"   theirs scores {[round(v, 6) for v in th['image_scores'].tolist()]}")
            ok &= max(score_diff, grid_diff, pix_diff) <= args.tol and r >= 0.9999
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
