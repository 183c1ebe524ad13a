"""The image tower's work for one query on other CPU runtimes (ONNX Runtime, OpenVINO), against torch in
the same process: is a well-kept runtime faster than this project's paths on this CPU?

    python benchmarks/runtimes.py            # needs onnx, onnxscript, onnxruntime, openvino (pip)

The packed path (one token matrix, attention per sequence group) is not an exportable graph, so the
comparison uses the work every runtime can run: the transformer + pooling + projection applied to the
three sequence batches of one zero-shot query (the full image: 1 x 226 tokens; 2x2 windows: 196 x 5;
3x3 windows: 169 x 10; ViT-B-16-plus-240, random weights), exported to ONNX once per shape. Rows:

- torch fp32, the same three batches (winclip's reference path, ``encode_full`` + ``encode_windows``);
- ONNX Runtime fp32, and int8 (``quantize_dynamic``: int8 weights per channel, activations quantised
  per tensor by ``DynamicQuantizeLinear``);
- OpenVINO fp32 (the CPU plugin, latency hint);
- winclip's packed path for the whole query in fp32 and in int8 (what the app runs), for reference.

Each figure is the median of --runs after one warm-up, all in one process, with the CPU printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from winclip import WinClip  # noqa: E402
from winclip.hardware import describe_cpu  # noqa: E402
from winclip.runtime import configure_process  # noqa: E402


class Tower(nn.Module):
    """Transformer + pooling + projection of (N, L, D) embedded tokens -> (N, E), as ``_finish``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.visual.transformer(tokens)
        pooled, _ = self.visual._pool(hidden)
        return pooled @ self.visual.proj


def median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def int8_cosine(det: WinClip, pixels: torch.Tensor) -> float:
    """Worst cosine between int8 and fp32 embeddings (class token and every window), the same measure
    as ONNX Runtime's row."""
    was = det.backbone.int8 is not None
    det.backbone.use_int8(False)
    ref = det.encode(pixels)
    det.backbone.use_int8(True)
    low = det.encode(pixels)
    det.backbone.use_int8(was)
    pairs = [(ref.image_embeddings, low.image_embeddings)]
    pairs += [(ref.window_embeddings[k][0], low.window_embeddings[k][0]) for k in ref.window_embeddings]
    return min(float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()) for a, b in pairs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    configure_process()
    import onnxruntime as ort
    import openvino as ov
    from onnxruntime.quantization import QuantType, quantize_dynamic

    print(f"# {describe_cpu()}; torch {torch.__version__}, onnxruntime {ort.__version__}, openvino {ov.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.runs} after 1 warm-up, one process")
    det = WinClip.from_pretrained("ViT-B-16-plus-240", pretrained=None, precision="fp32", seed=0)
    backbone = det.backbone
    pixels = torch.randn(1, 3, *det.image_size, generator=torch.Generator().manual_seed(0))
    full = backbone.encode_full(pixels)
    tokens = full.input_tokens  # (1, 226, D)
    batches = [tokens]
    for idx in det.windows.values():  # the windows' sequences, as encode_windows builds them
        prefix = tokens[:, :1].expand(idx.shape[0], 1, tokens.shape[-1])
        batches.append(torch.cat([prefix, tokens[0, 1:][idx]], dim=1))
    shapes = " + ".join(f"{b.shape[0]} x {b.shape[1]}" for b in batches)
    tower = Tower(backbone.visual).eval()
    rows: dict[str, float] = {}

    with torch.inference_mode():
        rows["torch fp32 (reference path, same batches)"] = median_time(lambda: [tower(b) for b in batches], args.runs)
        expected = [tower(b).numpy() for b in batches]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, b in enumerate(batches):
            path = Path(tmp) / f"tower_{i}.onnx"
            with torch.no_grad():
                torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA op has no ONNX export
                torch.onnx.export(tower, (b,), str(path), input_names=["tokens"], output_names=["embedding"],
                                  dynamo=False, opset_version=17)
            paths.append(path)
        torch.backends.mha.set_fastpath_enabled(True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in paths]
        feeds = [{"tokens": b.numpy()} for b in batches]
        rows["ONNX Runtime fp32"] = median_time(lambda: [s.run(None, f) for s, f in zip(sessions, feeds)], args.runs)
        err = max(float(np.abs(s.run(None, f)[0] - e).max()) for s, f, e in zip(sessions, feeds, expected))
        print(f"  ONNX Runtime fp32 max |embedding - torch| {err:.1e}")
        q_sessions = []
        for path in paths:
            q_path = path.with_name(path.stem + "_int8.onnx")
            quantize_dynamic(str(path), str(q_path), weight_type=QuantType.QInt8, per_channel=True)
            q_sessions.append(ort.InferenceSession(str(q_path), options, providers=["CPUExecutionProvider"]))
        rows["ONNX Runtime int8 (dynamic, per-tensor activations)"] = median_time(
            lambda: [s.run(None, f) for s, f in zip(q_sessions, feeds)], args.runs)
        cos = min(float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
                  for s, f, e in zip(q_sessions, feeds, expected)
                  for a, b in zip(s.run(None, f)[0], e))
        print(f"  ONNX Runtime int8 worst cosine to torch fp32 embeddings {cos:.4f}")
        core = ov.Core()
        compiled = [core.compile_model(core.read_model(str(path)), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
                    for path in paths]
        rows["OpenVINO fp32"] = median_time(lambda: [c(f) for c, f in zip(compiled, feeds)], args.runs)
        err = max(float(np.abs(c(f)[0] - e).max()) for c, f, e in zip(compiled, feeds, expected))
        print(f"  OpenVINO fp32 max |embedding - torch| {err:.1e} (precision hint: "
              f"{compiled[0].get_property('INFERENCE_PRECISION_HINT')})")

    with torch.inference_mode():
        rows["winclip packed path fp32 (whole query)"] = median_time(lambda: det.encode(pixels), args.runs)
        backbone.use_int8(True)
        rows["winclip packed path int8 (whole query)"] = median_time(lambda: det.encode(pixels), args.runs)
        print(f"  winclip int8 worst cosine to fp32 embeddings {int8_cosine(det, pixels):.4f}")
        backbone.use_int8(False)
    print(f"# one zero-shot query's tower work: sequences {shapes} (full image, 2x2 and 3x3 windows)")
    base = rows["torch fp32 (reference path, same batches)"]
    for name, seconds in rows.items():
        print(f"{name}: {seconds:.2f} s ({base / seconds:.2f}x torch fp32 reference)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
