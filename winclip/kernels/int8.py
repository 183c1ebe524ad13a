"""The CPU int8 path: the four linear layers of every block in int8 (oneDNN), the float steps between them
compiled (``int8_epilogue``) or eager, as kernels of the packed pass (``winclip.kernels.packed``).
Shapes: T rows of the packed matrix, D width."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import int8_epilogue
from .int8_epilogue import Epilogues
from . import packed
from .packed import FloatKernel, attend, attend_groups, kept_rows, packable, unplain_block


def attend_quantised(
    y: torch.Tensor, s: torch.Tensor, bias: torch.Tensor, groups: list, prune_windows: bool, heads: int,
    ep: Epilogues,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_attend_groups`` on the compiled int8 path, from the Q/K/V matmul's output y (T, 3D) before its
    row scales s (T, 1) and bias, to the attention output quantised for the next matmul: (T', D) u8 and
    its row scales. Short windows take one fused kernel each (dequantise, attend, quantise); long
    sequences (the full image) SDPA between the compiled dequantisation and quantisation."""
    parts, offset = [], 0
    for g, (n_seq, seq_len, _) in enumerate(groups):
        rows = n_seq * seq_len
        y_g, s_g, offset = y[offset : offset + rows], s[offset : offset + rows], offset + rows
        prune = prune_windows and g > 0
        if prune or seq_len < packed.SDPA_MIN_TOKENS:
            step = ep.window_cls_attention_quant if prune else ep.window_attention_quant
            parts.append(step(y_g.view(n_seq, seq_len, -1), s_g.view(n_seq, seq_len, 1), bias, heads))
        else:
            o = attend(ep.dequant(y_g, s_g, bias).view(n_seq, seq_len, 3, heads, -1))  # (n, H, L, hd)
            parts.append(ep.quant(o.transpose(1, 2).reshape(rows, -1)))
    q, scales = (torch.cat(p) for p in zip(*parts))
    return q, scales


class Int8Linear:
    """y = x W^T + b with int8 weights (symmetric, one scale per output channel) and int8 activations
    quantised dynamically *per token* (symmetric, one scale per row), the matmul by oneDNN
    (``onednn::qlinear_pointwise``, the kernel torch's x86 int8 inference lowers to; plain int8 tensors,
    none of torch's deprecated quantised tensor types). oneDNN takes one activation scale per call, so
    the rows are quantised here and the output is multiplied back by each row's scale, then bias,
    GELU or the residual are applied in float. (torch's generic ``_int_mm`` has no fast x86 CPU
    kernel: 3.7 s for a matmul that takes 0.15 s in fp32 on an AVX2 CPU.)"""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_max: int = 127) -> None:
        weight = weight.detach().float()
        self.scale = (weight.abs().amax(dim=1) / weight_max).clamp_min(1e-12)  # (N,) per output channel
        q = torch.round(weight / self.scale[:, None]).clamp_(-weight_max, weight_max).to(torch.int8)  # (N, K)
        self.packed = torch.ops.onednn.qlinear_prepack(q, None)
        self.zero_points = torch.zeros(len(q), dtype=torch.long)
        self.bias = torch.zeros(len(q)) if bias is None else bias.detach().float()  # (N,)

    def matmul(self, q: torch.Tensor) -> torch.Tensor:
        """(M, K) uint8 holding q + 128 -> (M, N) float32 (q W_q^T) * w_scale; the caller multiplies each
        row by its activation scale."""
        return torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, self.packed, self.scale, self.zero_points, None, 1.0,
                                                  0, torch.float32, "none", [], "")

    def __call__(self, x: torch.Tensor, gelu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The eager steps. x (M, K) float32, a temporary: it is overwritten."""
        s = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())  # (M, 1)
        s = s.clamp_min_(1e-12).div_(127)
        # per-token symmetric int8 handed over as u8 + 128: float -> int8 is a vectorised conversion in
        # torch, float -> uint8 is not (~4x slower), and +128 on the u8 view wraps exactly to q + 128
        q = x.div_(s).round_().to(torch.int8).view(torch.uint8).add_(128)
        y = self.matmul(q)  # (M, N)
        y = torch.addcmul(self.bias, y, s, out=y)
        if gelu:
            return F.gelu(y)
        return y.add_(residual) if residual is not None else y


@dataclass(frozen=True)
class Int8Block:
    qkv: Int8Linear
    out: Int8Linear
    fc: Int8Linear
    proj: Int8Linear

    def attention_input(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Eager steps: (T, D) block input -> (T, 3D) Q/K/V in float (LayerNorm, quantise, int8 matmul,
        dequantise)."""
        return self.qkv(blk.ln_1(x))

    def attention_input_unscaled(self, blk: nn.Module, x: torch.Tensor,
                                 ep: Epilogues) -> tuple[torch.Tensor, torch.Tensor]:
        """Compiled steps: ``attention_input`` before its dequantisation, y (T, 3D) and the row scales
        s (T, 1), Q/K/V being ``ep.dequant(y, s, self.qkv.bias)`` (the windows' attention does that step
        itself)."""
        q, s = ep.ln_quant(x, *_plain(blk.ln_1.weight, blk.ln_1.bias), blk.ln_1.eps)
        return self.qkv.matmul(q), s

    def rest(self, blk: nn.Module, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Eager steps: the block after attention, x + out(attended), then x + MLP(LayerNorm(x)); (T, D)
        in and out. ``attended`` is a temporary (overwritten)."""
        x = self.out(attended, residual=x)
        return self.proj(self.fc(blk.ln_2(x), gelu=True), residual=x)

    def rest_quantized(self, blk: nn.Module, q: torch.Tensor, s: torch.Tensor, x: torch.Tensor,
                       ep: Epilogues) -> torch.Tensor:
        """Compiled steps: ``rest`` from the attention output already quantised, q (T, D) u8 and s (T, 1)
        its row scales."""
        x, q, s = ep.dequant_residual_ln_quant(self.out.matmul(q), s, self.out.bias, x,
                                               *_plain(blk.ln_2.weight, blk.ln_2.bias), blk.ln_2.eps)
        q, s = ep.dequant_gelu_quant(self.fc.matmul(q), s, self.fc.bias)  # (T, H) u8
        return ep.dequant_residual(self.proj.matmul(q), s, self.proj.bias, x)


def _plain(*params: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Parameters as plain tensors: compiled code guards on requires_grad, and the probe that compiles
    the float steps uses plain tensors."""
    return tuple(p.detach() for p in params)


class Int8Tower:
    """The four linear layers of every block of an image tower, in int8 (attention, LayerNorm, softmax,
    GELU and everything after the tower stay in float); the float steps between the matmuls compiled
    where torch.compile works (``int8_epilogue``), else eager."""

    def __init__(self, visual: nn.Module, compile_steps: bool = True) -> None:
        from ..hardware import cpu_info

        # Without VNNI, x86 int8 kernels multiply u8 x s8 pairs into 16 bits (vpmaddubsw), which saturate
        # for 8-bit weights (2 x 255 x 127 > 32767) and give wrong sums; 7-bit weights keep every pair in
        # range (measured: equal to exact integer arithmetic). VNNI accumulates in 32 bits: 8-bit weights.
        self.weight_bits = 8 if {"avx512_vnni", "avx_vnni"} & cpu_info().flags else 7
        wmax = 2 ** (self.weight_bits - 1) - 1
        with torch.inference_mode(False):  # ordinary tensors even when made inside a pass (the self-check)
            self.blocks = self._blocks(visual, wmax)
        first = visual.transformer.resblocks[0]
        self.epilogues, self.eager_because = int8_epilogue.for_widths(
            first.attn.in_proj_weight.shape[1], first.mlp.c_fc.weight.shape[0], first.ln_1.eps,
            first.attn.num_heads) \
            if compile_steps else (None, "not compiled for a few passes: compiling costs seconds")

    @staticmethod
    def _blocks(visual: nn.Module, wmax: int) -> list[Int8Block]:
        return [Int8Block(Int8Linear(b.attn.in_proj_weight, b.attn.in_proj_bias, wmax),
                          Int8Linear(b.attn.out_proj.weight, b.attn.out_proj.bias, wmax),
                          Int8Linear(b.mlp.c_fc.weight, b.mlp.c_fc.bias, wmax),
                          Int8Linear(b.mlp.c_proj.weight, b.mlp.c_proj.bias, wmax))
                for b in visual.transformer.resblocks]


def int8_unavailable(visual: nn.Module, dtype: torch.dtype, device: torch.device) -> str:
    """Why the int8 path cannot run here ('' when it can)."""
    if device.type != "cpu":
        return f"it is a CPU path (the model is on {device})"
    if dtype is not torch.float32:
        return "it replaces the fp32 linears; load the model in fp32"
    from ..hardware import int8_available

    missing = int8_available()
    if missing:
        return missing
    if not packable(visual):
        return "the image tower is not one the packed path knows"
    return next(filter(None, map(unplain_block, visual.transformer.resblocks)), "")




class Int8Kernel(FloatKernel):
    """The int8 weights with eager float steps (``Int8Linear.__call__``): where compiling is off or failed."""

    def __init__(self, tower: Int8Tower) -> None:
        self.tower = tower

    def describe(self, dtype: torch.dtype, path: str) -> str:
        steps = ("float steps compiled (torch.compile)" if self.tower.epilogues is not None
                 else f"float steps eager ({self.tower.eager_because})")
        return (f"int8: oneDNN qlinear, per-token 8-bit activations, {self.tower.weight_bits}-bit per-channel "
                f"weights, {steps}; {path} path")

    def block(self, layer: int, blk: nn.Module, x: torch.Tensor, distinct: torch.Tensor, gather: torch.Tensor,
              groups: list, prune: bool) -> torch.Tensor:
        q8 = self.tower.blocks[layer]
        qkv = q8.attention_input(blk, distinct if layer == 0 else x)  # (distinct or T, 3D)
        qkv = qkv[gather] if layer == 0 else qkv
        attended = attend_groups(qkv, groups, prune, blk.attn.num_heads)
        if prune:
            x = x[kept_rows(groups, x.device)]
        return q8.rest(blk, attended, x)


class Int8CompiledKernel(Int8Kernel):
    """The int8 weights with compiled float steps: the windows' Q/K/V dequantised inside their attention,
    which is fused with the quantisation that follows."""

    def block(self, layer: int, blk: nn.Module, x: torch.Tensor, distinct: torch.Tensor, gather: torch.Tensor,
              groups: list, prune: bool) -> torch.Tensor:
        q8, ep = self.tower.blocks[layer], self.tower.epilogues
        # the Q/K/V matmul's output before its row scale and bias, (T, 3D), (T, 1)
        qkv, qkv_s = q8.attention_input_unscaled(blk, distinct if layer == 0 else x, ep)
        qkv, qkv_s = (qkv[gather], qkv_s[gather]) if layer == 0 else (qkv, qkv_s)
        q, q_s = attend_quantised(qkv, qkv_s, q8.qkv.bias, groups, prune, blk.attn.num_heads, ep)
        if prune:
            x = x[kept_rows(groups, x.device)]
        return q8.rest_quantized(blk, q, q_s, x, ep)


def int8_kernel(tower: Int8Tower) -> Int8Kernel:
    return Int8CompiledKernel(tower) if tower.epilogues is not None else Int8Kernel(tower)
