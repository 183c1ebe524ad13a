"""Runs inside a venv with anomalib 2.7.0 + open_clip 2.24 (anomalib's supported range); called by
parity_anomalib.py and latency.py. Everything it reports is computed by anomalib's own WinCLIP code.

    python anomalib_side.py parity  WORKDIR                 # WORKDIR: weights.pt, inputs.pt -> anomalib.pt
    python anomalib_side.py latency WORKDIR RUNS WARMUP SIZE  # prints one JSON line of timings
    python anomalib_side.py serve WORKDIR WARMUP SIZE    # one timed zero-shot query per "go" line on stdin
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

OBJECT = "washer"


def model(workdir: Path, references=None):
    from anomalib.models.image.winclip import torch_model

    torch_model.PRETRAINED = str(workdir / "weights.pt")  # a local file instead of a download
    return torch_model.WinClipModel(class_name=OBJECT, reference_images=references).eval()


def parity(workdir: Path) -> None:
    from anomalib.models.image.winclip import torch_model

    inputs = torch.load(workdir / "inputs.pt")
    results = {}
    for shots in inputs["shots"]:
        m = model(workdir, inputs["references"][:shots] if shots else None)
        with torch.no_grad():
            pixels = inputs["queries"]
            image_emb, window_emb, patch_emb = m.encode_image(pixels)
            image_scores = torch_model.class_scores(image_emb, m.text_embeddings, m.temperature, 1)
            grid = m._compute_zero_shot_scores(image_scores, window_emb)
            if m.k_shot:
                few = m._compute_few_shot_scores(patch_emb, window_emb)
                grid = (grid + few) / 2
                image_scores = (image_scores + few.amax(dim=(-2, -1))) / 2
            out = m(pixels)  # anomalib's forward, for its own upsampled map and score
        results[shots] = {"image_scores": image_scores, "grid_maps": grid, "pixel_maps": out.anomaly_map,
                          "pred_score": out.pred_score, "windows": window_emb, "text": m.text_embeddings}
    torch.save(results, workdir / "anomalib.pt")


def latency(workdir: Path, runs: int, warmup: int, size: int) -> None:
    query = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    figures = {}
    for shots in (0, 1):
        refs = torch.randn(shots, 3, size, size, generator=torch.Generator().manual_seed(1)) if shots else None
        m = model(workdir, refs)
        times = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            m(query)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        figures["zero_shot_s" if shots == 0 else "shot_1_s"] = statistics.median(times)
    print(json.dumps(figures))


def serve(workdir: Path, warmup: int, size: int) -> None:
    """The paired benchmark's side: load, warm up, say ready, then answer each "go" with the seconds of
    one zero-shot query (JSON lines), so the parent can alternate queries with winclip's processes."""
    query = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    m = model(workdir)
    for _ in range(warmup):
        m(query)
    print(json.dumps({"ready": "anomalib"}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        start = time.perf_counter()
        m(query)
        print(json.dumps({"s": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    command, workdir = sys.argv[1], Path(sys.argv[2])
    if command == "parity":
        parity(workdir)
    elif command == "serve":
        serve(workdir, int(sys.argv[3]), int(sys.argv[4]))
    else:
        latency(workdir, int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
