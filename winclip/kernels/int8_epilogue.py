"""The float work between the int8 matmuls of a block, fused by torch.compile (the CPU int8 path).

Around each block's four oneDNN int8 matmuls (``kernels.int8.Int8Linear``) the int8 path does float work:
LayerNorm, per-token quantisation (row absmax, divide, round, shift to u8), the dequantising row scale,
bias, GELU and the residual add. Eagerly every step is a pass over a (T, 896) or (T, 3584) tensor,
and GELU's erf is compute-bound: measured on a 2-core AVX2 CPU, dequantising + GELU + quantising the
MLP's hidden layer (2896 x 3584) takes ~18 ms of a ~210 ms block. Here each step between two matmuls
is one inductor kernel, with erf as a rational function instead of torch's exp-based series: ~8 ms.
The windows' attention is one of these steps too (``window_attention``): for each group of 5- or
10-token windows one kernel dequantises their Q/K/V, attends and quantises the result for the output
projection, without the head-major copies of the eager path.

The rational erf is Eigen's single-precision approximation (x clamped to [-4, 4], odd degree-13
numerator over an even degree-6 denominator): GELU through it differs from torch's exact GELU by at
most 1.4e-6 (measured on a million N(0, 16) samples, tests/test_int8.py), while the int8 step that
follows is 1/127 of the row's largest value.

Inductor on CPU needs a C++ compiler. Where compiling fails (no compiler, an unsupported platform)
the eager steps of ``Int8Linear`` run instead and the kernel path says why;
``WINCLIP_INT8_COMPILE=0`` turns compiling off. Shapes: T rows (tokens), D width, H MLP width; T is
compiled as a dynamic size once, D and H as constants.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SQRT_HALF = 0.7071067811865476
ERF_CLAMP = 4.0  # |erf(x)| rounds to 1 in float32 beyond this
# Eigen's generic_fast_erf_float: erf(x) = x * P(x^2) / Q(x^2), coefficients highest power first
ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
         -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02)


def erf_rational(x: torch.Tensor) -> torch.Tensor:
    """erf(x) to float32 precision with multiplies, adds and one divide (no exp), so a fused kernel
    computes it at the speed of memory."""
    x = x.clamp(-ERF_CLAMP, ERF_CLAMP)
    x2 = x * x
    p = x2 * ERF_P[0] + ERF_P[1]
    for c in ERF_P[2:]:
        p = p * x2 + c
    q = x2 * ERF_Q[0] + ERF_Q[1]
    for c in ERF_Q[2:]:
        q = q * x2 + c
    return x * p / q


def gelu_rational(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, x * Phi(x), through ``erf_rational``."""
    return 0.5 * x * (1.0 + erf_rational(x * SQRT_HALF))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, K) float -> (T, K) uint8 holding q + 128, q = round(x / s) in [-127, 127], and s (T, 1):
    symmetric, one scale per row, the same arithmetic as ``Int8Linear``'s eager steps."""
    s = torch.maximum(x.amax(dim=-1, keepdim=True), -x.amin(dim=-1, keepdim=True)).clamp_min(1e-12) / 127
    return (torch.round(x / s) + 128).to(torch.uint8), s


def _ln_quant(x, weight, bias, eps: float):
    return quantize_rows(F.layer_norm(x, (x.shape[-1],), weight, bias, eps))


def _dequant(y, s, bias):
    return torch.addcmul(bias, y, s)  # y holds (q W^T) * w_scale; the row scale s finishes it


def _dequant_residual(y, s, bias, residual):
    return _dequant(y, s, bias) + residual


def _dequant_residual_ln_quant(y, s, bias, residual, weight, ln_bias, eps: float):
    x = _dequant(y, s, bias) + residual
    return (x, *_ln_quant(x, weight, ln_bias, eps))


def _dequant_gelu_quant(y, s, bias):
    return quantize_rows(gelu_rational(_dequant(y, s, bias)))


def window_attention(qkv: torch.Tensor, heads: int, n_queries: int) -> torch.Tensor:
    """(n, L, 3D) packed Q/K/V of n short sequences -> (n * n_queries, D) attention output of the first
    ``n_queries`` tokens of each, heads side by side (the row layout the next matmul reads).

    Sums over broadcast products instead of batched matmuls: for 5-10 token windows this is one
    fused kernel with no head-major copies (the eager path, ``backbone._attend``, copies Q/K/V
    head-major, multiplies, and copies the result back). Same maths, another summation order."""
    n, length, packed = qkv.shape
    head_dim = packed // (3 * heads)
    x = qkv.view(n, length, 3, heads, head_dim)
    q, k, v = x[:, :n_queries, 0], x[:, :, 1], x[:, :, 2]  # (n, Lq, H, hd), (n, L, H, hd), (n, L, H, hd)
    scores = (q[:, :, None] * k[:, None]).sum(-1) * head_dim**-0.5  # (n, Lq, L, H)
    out = (scores.softmax(dim=2)[..., None] * v[:, None]).sum(2)  # (n, Lq, H, hd)
    return out.reshape(-1, heads * head_dim)


def _window_attention_quant(y, s, bias, heads: int):
    return quantize_rows(window_attention(_dequant(y, s, bias), heads, y.shape[1]))


def _window_cls_attention_quant(y, s, bias, heads: int):
    return quantize_rows(window_attention(_dequant(y, s, bias), heads, 1))


@dataclass(frozen=True)
class Epilogues:
    """The steps between a block's int8 matmuls; each is one compiled kernel (or group of kernels)."""

    ln_quant: Callable  # x, ln weight, ln bias, eps -> u8, s          before Q/K/V
    quant: Callable  # attended -> u8, s                                  before the attention output
    dequant: Callable  # y, s, bias -> Q/K/V in float
    dequant_residual_ln_quant: Callable  # y, s, bias, x, ln w, ln b, eps -> new x, u8, s   before the MLP
    dequant_gelu_quant: Callable  # y, s, bias -> u8, s                   between the MLP's matmuls
    dequant_residual: Callable  # y, s, bias, x -> new x                  end of the block
    # the Q/K/V matmul's output of n windows of L tokens, (n, L, 3D), its row scales (n, L, 1), bias, heads
    window_attention_quant: Callable  # ... -> u8, s of every token's attention output        windows
    window_cls_attention_quant: Callable  # ... -> u8, s of the class token's only             last layer


# the same functions uncompiled (slow: tests compare with them)
EAGER_REFERENCE = Epilogues(_ln_quant, quantize_rows, _dequant, _dequant_residual_ln_quant, _dequant_gelu_quant,
                            _dequant_residual, _window_attention_quant, _window_cls_attention_quant)

_lock = threading.Lock()
_compiled: Epilogues | None = None
_probed: dict[tuple[int, int, int], str] = {}  # (D, H, heads) -> '' when compiled and run, else why not


def compile_enabled() -> bool:
    """WINCLIP_INT8_COMPILE=0 keeps the float steps eager."""
    from ..settings import switched_on

    return switched_on("WINCLIP_INT8_COMPILE")


def _compile() -> Epilogues:
    global _compiled
    if _compiled is None:
        _compiled = Epilogues(*(torch.compile(getattr(EAGER_REFERENCE, f.name), dynamic=None, fullgraph=True)
                                for f in fields(Epilogues)))
    return _compiled


def for_widths(width: int, hidden: int, eps: float, heads: int) -> tuple[Epilogues | None, str]:
    """The compiled epilogues for a tower of width D, MLP width H and this many attention heads,
    compiled and run once per process on a small probe (rows, and the windows' number and length,
    marked dynamic, so real sizes reuse the same kernels), or None and why not. Compiling takes seconds
    to tens of seconds the first time; inductor caches it on disk."""
    if not compile_enabled():
        return None, "WINCLIP_INT8_COMPILE=0"
    with _lock:  # one compile at a time: the app's self-check thread and a request may both get here
        key = (width, hidden, heads)
        if key not in _probed:
            _probed[key] = _probe_compile(width, hidden, eps, heads)
        problem = _probed[key]
    return (None, problem) if problem else (_compile(), "")


def _probe_compile(width: int, hidden: int, eps: float, heads: int) -> str:
    start = time.perf_counter()
    quiet = logging.getLogger("torch.utils.cpp_extension")  # warns "No CUDA runtime is found" on import
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        ep = _compile()
        # compiled code guards on how tensors were made: weights and biases are ordinary tensors,
        # activations are made in inference mode (the packed path runs in it)
        with torch.inference_mode(False):
            w, b, lb = torch.ones(width), torch.zeros(width), torch.zeros(width)  # distinct: guards check aliasing
            b3, bh = torch.zeros(3 * width), torch.zeros(hidden)
        with torch.inference_mode():
            rows = 4
            x, y, y3, yh, s = (torch.randn(rows, width), torch.randn(rows, width), torch.randn(rows, 3 * width),
                               torch.randn(rows, hidden), torch.rand(rows, 1))
            windows, window_s = torch.randn(3, 4, 3 * width), torch.rand(3, 4, 1)  # 3 windows of 4 tokens
            for t in (x, y, y3, yh, s, windows, window_s):
                torch._dynamo.mark_dynamic(t, 0)  # one kernel for every row count
            for t in (windows, window_s):
                torch._dynamo.mark_dynamic(t, 1)  # ... and every window length
            ep.ln_quant(x, w, lb, eps)
            ep.quant(x)
            ep.dequant(y3, s, b3)
            ep.dequant_residual_ln_quant(y, s, b, x, w, lb, eps)
            ep.dequant_gelu_quant(yh, s, bh)
            ep.dequant_residual(y, s, b, x)
            ep.window_attention_quant(windows, window_s, b3, heads)
            ep.window_cls_attention_quant(windows, window_s, b3, heads)
    except (RuntimeError, OSError, ImportError) as exc:  # inductor: no compiler, compile errors
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        problem = f"torch.compile failed ({type(exc).__name__}: {first_line})"
        log.warning("int8: float steps stay eager: %s", problem)
        return problem
    finally:
        quiet.setLevel(level)
    log.info("int8: float steps compiled for D=%d, H=%d, %d heads in %.1f s", width, hidden, heads,
             time.perf_counter() - start)
    return ""
