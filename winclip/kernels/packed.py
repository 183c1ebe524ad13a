"""The packed pass of an image tower and the kernels it runs on (WinCLIP's fast path).

One token matrix holds the full image and every window of every scale; attention runs per sequence group;
layer 1's per-token work (LayerNorm, Q/K/V) is done once per distinct token and gathered; the last layer
keeps only the rows the pooling reads (the full image, and each window's class token). The numbers equal
the plain per-window pass (``ClipBackbone.encode_full`` + ``encode_windows``), the reference.

A kernel is chosen once per pass (``ClipBackbone.kernel``) and runs every block: ``FloatKernel`` (aten's
linears: fp32, fp16 or bf16), ``FusedBf16Kernel`` (oneDNN linears with the bias, GELU and residual in the
epilogue; CPUs with native bf16) and the int8 kernels of ``winclip.kernels.int8``.
Shapes: B images, L tokens per image, T rows of the packed matrix, D width.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

SDPA_MIN_TOKENS = 64  # sequences this long (the full image) use scaled_dot_product_attention, see _attend


class FloatKernel:
    """aten's linear layers in the tower's dtype (the fp32 reference, fp16 and bf16 without oneDNN)."""

    def describe(self, dtype: torch.dtype, path: str) -> str:
        from ..hardware import torch_cpu_kernels

        return f"{str(dtype).removeprefix('torch.')}: aten linear (torch kernels {torch_cpu_kernels()}); {path} path"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def block(self, layer: int, blk: nn.Module, x: torch.Tensor, distinct: torch.Tensor, gather: torch.Tensor,
              groups: list, prune: bool) -> torch.Tensor:
        """One block of the packed matrix: (T, D) -> (T or pruned T, D); layer 0 reads ``distinct`` tokens."""
        attn = blk.attn
        if layer == 0:  # per-token ops before attention are shared by every window holding the token
            qkv = self.linear(blk.ln_1(distinct), attn.in_proj_weight, attn.in_proj_bias)[gather]  # (T, 3D)
        else:
            qkv = self.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (T, 3D)
        attended = attend_groups(qkv, groups, prune, attn.num_heads)  # (T or pruned T, D)
        if prune:
            x = x[kept_rows(groups, x.device)]
        return self.rest(blk, attended, x)

    def rest(self, blk: nn.Module, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block after attention: x + out(attended), then x + MLP(LayerNorm(x))."""
        x = _residual_linear(x, attended, blk.attn.out_proj, blk.ls_1)
        hidden = blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(x)))
        return _residual_linear(x, hidden, blk.mlp.c_proj, blk.ls_2)


class FusedBf16Kernel(FloatKernel):
    """oneDNN's fused bf16 linears: bias, GELU and the residual add inside the matmul (``fusable``)."""

    def describe(self, dtype: torch.dtype, path: str) -> str:
        return f"bf16: oneDNN fused linear (+GELU/residual epilogue); {path} path"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return onednn_linear(x, weight, bias)

    def rest(self, blk: nn.Module, attended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = onednn_linear(attended, blk.attn.out_proj.weight, blk.attn.out_proj.bias, residual=x)
        hidden = onednn_linear(blk.ln_2(x), blk.mlp.c_fc.weight, blk.mlp.c_fc.bias, gelu=True)
        return onednn_linear(hidden, blk.mlp.c_proj.weight, blk.mlp.c_proj.bias, residual=x)


FLOAT, FUSED_BF16 = FloatKernel(), FusedBf16Kernel()


def packed_pass(
    visual: nn.Module, n_patches: int, tokens: torch.Tensor, windows: dict[int, torch.Tensor],
    layers: tuple[int, ...], kernel: FloatKernel,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """(B, L, D) embedded tokens -> pooled (B, E), output tokens, k -> (B, N_k, E) window embeddings and the
    raw outputs of ``layers`` (B, P, D), through every block with ``kernel``."""
    batch, length, width = tokens.shape
    n_prefix = length - n_patches
    device = tokens.device
    # Each group: (sequences, sequence length, rows of the distinct-token matrix it gathers).
    base = torch.arange(batch, device=device)[:, None] * length  # (B, 1)
    groups = [(batch, length, (base + torch.arange(length, device=device)).reshape(-1))]
    for idx in windows.values():
        prefix = torch.arange(n_prefix, device=device).expand(idx.shape[0], n_prefix)
        seq = torch.cat([prefix, n_prefix + idx.to(device)], dim=1)  # (N, L') token positions per window
        rows = (base[:, :, None] + seq[None]).reshape(-1)  # (B*N*L',)
        groups.append((batch * idx.shape[0], seq.shape[1], rows))
    distinct = tokens.reshape(batch * length, width)  # (B*L, D)
    gather = torch.cat([g[2] for g in groups])  # (T,)
    blocks = visual.transformer.resblocks
    x = distinct[gather]  # (T, D)
    cls_only = getattr(visual, "pool_type", "tok") == "tok" and visual.attn_pool is None
    captured: dict[int, torch.Tensor] = {}
    for layer, blk in enumerate(blocks):
        prune = layer == len(blocks) - 1 and cls_only  # window embeddings need only the last layer's CLS output
        x = kernel.block(layer, blk, x, distinct, gather, groups, prune)
        if layer in layers:  # the full image's rows come first and are never pruned
            captured[layer] = x[: batch * length].view(batch, length, width)[:, n_prefix:].clone()
    full_rows = batch * length
    pooled, out_tokens = visual._pool(x[:full_rows].view(batch, length, width))
    offset, window_embs = full_rows, {}
    for k, (n_seq, seq_len, _) in zip(windows, groups[1:]):
        seq_out = 1 if cls_only else seq_len
        w_pooled, _ = visual._pool(x[offset : offset + n_seq * seq_out].view(n_seq, seq_out, width))
        window_embs[k] = w_pooled.reshape(batch, -1, w_pooled.shape[-1])
        offset += n_seq * seq_out
    if visual.proj is not None:
        pooled = pooled @ visual.proj
        window_embs = {k: e @ visual.proj for k, e in window_embs.items()}
    return pooled, out_tokens, window_embs, captured


def _residual_linear(x: torch.Tensor, h: torch.Tensor, linear: nn.Module, scale: nn.Module) -> torch.Tensor:
    """x + scale(linear(h)); without a layer scale the residual is accumulated by the matmul itself
    (x + bias, then x += h @ W^T in place), saving a pass over the activations."""
    if isinstance(scale, nn.Identity) and linear.bias is not None:
        return (x + linear.bias).addmm_(h, linear.weight.t())
    return x + scale(linear(h))


def kept_rows(groups: list, device: torch.device) -> torch.Tensor:
    """Rows of the packed token matrix that the last layer keeps: the full image's (first group) and
    each window's class token; built once per pass, on the device."""
    offsets = list(itertools.accumulate((n * L for n, L, _ in groups), initial=0))
    return torch.cat([torch.arange(offsets[g], offsets[g + 1], L if g else 1, device=device)
                      for g, (_, L, _) in enumerate(groups)])


def attend_groups(qkv: torch.Tensor, groups: list, prune_windows: bool, heads: int) -> torch.Tensor:
    """Attention of every sequence group of the packed matrix: (T, 3D) Q/K/V -> (T', D), heads side by
    side; T' = T, or with ``prune_windows`` the full image's rows and one row per window."""
    n_out = sum(n if (prune_windows and g) else n * L for g, (n, L, _) in enumerate(groups))
    attended = torch.empty(n_out, qkv.shape[1] // 3, dtype=qkv.dtype, device=qkv.device)
    offset = out_offset = 0
    for g, (n_seq, seq_len, _) in enumerate(groups):
        rows = n_seq * seq_len
        o = attend(qkv[offset : offset + rows].view(n_seq, seq_len, 3, heads, -1), prune_windows and g > 0)
        n_rows = o.shape[0] * o.shape[2]  # (n, H, Lq, hd) written as (n, Lq, H, hd)
        attended[out_offset : out_offset + n_rows].view(o.shape[0], o.shape[2], o.shape[1], -1).copy_(
            o.transpose(1, 2))
        offset, out_offset = offset + rows, out_offset + n_rows
    return attended


def attend(qkv: torch.Tensor, first_query_only: bool = False) -> torch.Tensor:
    """Multi-head attention of n sequences from their packed projections (n, L, 3, H, hd) -> (n, H, Lq, hd),
    Lq = 1 (the class token's query only) or L.

    The full image (226 tokens) goes to SDPA on strided views (no head-major copy; ~1.5% of a query
    faster than the plain path in interleaved runs). For windows of 5-10 tokens plain batched matmuls
    beat SDPA's flash kernel on CPU; their scores are built transposed, (n, H, L_key, Lq), so the
    softmax reduces over a strided axis and its vectorised kernel runs along queries instead of along
    5-10 keys (about 2x faster here; same numbers).
    """
    head_dim = qkv.shape[-1]
    if qkv.shape[1] >= SDPA_MIN_TOKENS and not first_query_only:
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # strided views, no copy
        return F.scaled_dot_product_attention(q, k, v)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous()  # each (n, H, L, hd), one copy
    if first_query_only:
        q = q[:, :, :1]
    scores_t = (k @ q.transpose(-2, -1)).mul_(head_dim**-0.5)  # (n, H, L, Lq)
    return scores_t.softmax(dim=-2).transpose(-2, -1) @ v  # (n, H, Lq, hd)


def unplain_block(blk: nn.Module) -> str:
    """Why a block does not fit the paths that rewrite its linears (fused bf16, int8): '' when it fits."""
    if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
        return "blocks with layer scale are not supported"
    act = blk.mlp.gelu
    if type(act) is not nn.GELU or act.approximate != "none":
        return "the MLP activation is not exact GELU"
    return ""


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W^T + b [then exact GELU | + residual] as one oneDNN call (CPU). aten's addmm first copies
    the broadcast bias into the output and GELU is another pass over it; here both happen in the
    matmul's epilogue."""
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


def fusable(visual: nn.Module, dtype: torch.dtype) -> bool:
    """Whether the packed path may use oneDNN's fused linear ops: bfloat16 on a CPU build with
    oneDNN and a CPU it supports in bf16 (AVX512-BF16/AMX; elsewhere oneDNN would fall back to slow
    reference kernels), blocks with exact (erf) GELU and no layer scale. fp32 keeps aten's kernels
    (the reference)."""
    if dtype is not torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not packable(visual):
        return False
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    for blk in visual.transformer.resblocks:
        if unplain_block(blk) or any(m.bias is None for m in (blk.attn.out_proj, blk.mlp.c_fc, blk.mlp.c_proj)):
            return False
    return True


def packable(visual: nn.Module) -> bool:
    """Whether the packed fast path knows every block (plain open_clip ResidualAttentionBlock)."""
    from open_clip.transformer import ResidualAttentionBlock

    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or getattr(visual, "final_ln_after_pool", False):
        return False
    for blk in blocks:
        attn = getattr(blk, "attn", None)
        if (type(blk) is not ResidualAttentionBlock or not isinstance(attn, nn.MultiheadAttention)
                or attn.in_proj_weight is None or attn.bias_k is not None or hasattr(blk, "ln_1_kv")):
            return False
    return True
