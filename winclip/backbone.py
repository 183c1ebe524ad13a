"""The one module that touches open_clip internals (WinCLIP §4.2, eq. 2 and Fig. 3).

From one full-image pass: the projected class-token embedding and the final-layer patch tokens
(after ln_post, unprojected). Window embeddings f(x ⊙ w) by dropping masked tokens *before* the
transformer: each window is [prefix tokens (CLS + pos0), its k*k patch tokens with their own
positional embeddings], run through the transformer, pooled like the full image and projected.

open_clip >= 2.26 runs ``transformer`` batch-first (N, L, D). Code that permutes to (L, N, D) first
makes attention mix *windows* and every window embedding comes out identical, silently (anomalib on
open_clip 3.x). ``check_layout`` and the tests pin this: a window holding every patch reproduces
``encode_image`` and different windows differ.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import int8_epilogue
from .int8_epilogue import Epilogues

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
REQUIRED_VISUAL_ATTRS = ("_embeds", "transformer", "_pool", "proj", "grid_size")
SDPA_MIN_TOKENS = 64  # sequences this long (the full image) use scaled_dot_product_attention, see _attend


@dataclass(frozen=True)
class FullImageFeatures:
    """One full-image pass. B images, P patches, L tokens, D width, E joint embedding."""

    image_embeddings: torch.Tensor  # (B, E) projected pooled token, = encode_image
    patch_tokens: torch.Tensor  # (B, P, D) final layer after ln_post, unprojected
    input_tokens: torch.Tensor  # (B, L, D) transformer input (embedded, ln_pre), reused by windows
    layer_tokens: dict[int, torch.Tensor] | None = None  # block (0-based) -> (B, P, D) raw output, prefix dropped


class ClipBackbone:
    """Adapter over an open_clip ``CLIP`` model with a ``VisionTransformer`` image tower."""

    def __init__(self, clip_model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        check_layout(clip_model)
        self.model = clip_model.eval()
        clip_model.visual.to(dtype)
        # the image tower per dtype: the loaded one, and reduced-precision copies of an fp32 tower made on
        # demand (the self-check compares them; MuSc may keep fp32 while WinCLIP runs bf16)
        self._towers: dict[torch.dtype, nn.Module] = {dtype: clip_model.visual}
        self._dtype = dtype  # the shared setting; precision_for_this_thread overrides it for one thread
        self._fused: dict[torch.dtype, bool] = {}
        self._this_thread = threading.local()  # precision overrides seen by one thread only
        self.grid: tuple[int, int] = tuple(int(g) for g in self.visual.grid_size)
        self.n_patches = self.grid[0] * self.grid[1]
        self.width = int(self.visual.conv1.out_channels)
        self.packable = packable(self.visual)
        self.text_truncatable = text_truncatable(clip_model)
        self.n_blocks = len(self.visual.transformer.resblocks)
        self.int8: Int8Tower | None = None  # set by use_int8: the packed path's linears in int8 (CPU)
        self._int8_weights: Int8Tower | None = None  # made on first use, kept across switches
        # compile the int8 path's float steps when its weights are made (seconds, paid back after a few
        # dozen passes: a server or a batch run, not a single prediction)
        self.compile_int8 = True

    @property
    def dtype(self) -> torch.dtype:
        """The image tower's dtype for this thread's passes."""
        return getattr(self._this_thread, "dtype", None) or self._dtype

    @property
    def visual(self) -> nn.Module:
        """The image tower this thread's passes use (fp32, or a bf16/fp16 copy)."""
        return self._tower(self.dtype)

    @property
    def fused(self) -> bool:
        """Whether this thread's passes take oneDNN's fused bf16 linears (see ``fusable``)."""
        dtype = self.dtype
        if dtype not in self._fused:
            self._fused[dtype] = fusable(self._tower(dtype), dtype)
        return self._fused[dtype]

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused[self.dtype] = value

    @property
    def precision(self) -> str:
        """'fp32', 'bf16', 'fp16' or 'int8': what this thread's passes run in."""
        return "int8" if self.active_int8() is not None else PRECISION_NAMES[self.dtype]

    def _tower(self, dtype: torch.dtype) -> nn.Module:
        if dtype not in self._towers:
            master = self._towers.get(torch.float32)
            if master is None:
                loaded = PRECISION_NAMES[next(iter(self._towers))]
                raise ValueError(f"the image tower was loaded in {loaded}; a {PRECISION_NAMES[dtype]} copy needs "
                                 "the fp32 weights (load with precision auto or fp32)")
            self._towers[dtype] = copy.deepcopy(master).to(dtype).eval()
        return self._towers[dtype]

    def prepare(self, precision: str) -> None:
        """Make what ``precision`` runs on now (a reduced-precision copy of the tower, or the int8
        weights and their compiled steps: seconds), e.g. before taking a server's lock."""
        if precision == "int8":
            self.prepare_int8()
        else:
            self._tower(PRECISION_DTYPES[precision])

    def use_precision(self, precision: str) -> None:
        """Every thread's passes run in ``precision`` from now on (fp32, bf16, fp16 or int8)."""
        self.prepare(precision)
        self._dtype = PRECISION_DTYPES[precision]
        self.use_int8(precision == "int8")

    @contextlib.contextmanager
    def precision_for_this_thread(self, precision: str | None):
        """Within the block this thread's passes run in ``precision`` whatever ``use_precision`` says
        (None: no override); other threads keep the shared setting."""
        if precision is None:
            yield
            return
        self.prepare(precision)
        previous = (getattr(self._this_thread, "dtype", None), getattr(self._this_thread, "int8", None))
        self._this_thread.dtype = PRECISION_DTYPES[precision]
        self._this_thread.int8 = self._int8_tower() if precision == "int8" else False
        try:
            yield
        finally:
            self._this_thread.dtype, self._this_thread.int8 = previous

    def use_int8(self, enabled: bool = True) -> None:
        """Run the packed path's linear layers in int8 (see ``Int8Tower``) or back in float. The int8
        weights are made once and kept (about a quarter of the tower's float weights)."""
        self.int8 = self._int8_tower() if enabled else None

    def prepare_int8(self) -> None:
        """Make the int8 weights and compile the int8 path's float steps now (seconds; ValueError where
        int8 cannot run), so that the first int8 pass does not, e.g. while holding a server's lock."""
        self._int8_tower()

    def _int8_tower(self) -> "Int8Tower":
        """The int8 weights, made on first use; ValueError where int8 cannot run."""
        if self._int8_weights is None:
            master = self._towers.get(torch.float32)
            problem = int8_unavailable(master if master is not None else self.visual,
                                       torch.float32 if master is not None else self._dtype, self.device)
            if problem:
                raise ValueError(f"int8 is not available here: {problem}")
            self._int8_weights = Int8Tower(master, self.compile_int8)
        return self._int8_weights

    def active_int8(self) -> "Int8Tower | None":
        """The int8 weights this thread's passes use now (None: float)."""
        override = getattr(self._this_thread, "int8", None)
        if override is None:
            return self.int8
        return override or None

    @property
    def device(self) -> torch.device:
        """Where the weights are (read from them, so it cannot disagree; loading checks that every
        tensor went to one device, ``loading.place``)."""
        return next(self.model.parameters()).device

    def kernel_path(self) -> str:
        """Which kernels the image tower's linear layers run on, in words (printed with speed figures)."""
        if self.device.type == "cuda":
            return f"cuda {str(self.dtype).removeprefix('torch.')} (cuBLAS), packed path" if self.packable else "cuda"
        path = "packed" if self.packable else "reference (not packable)"
        int8 = self.active_int8()
        if int8 is not None:
            steps = ("float steps compiled (torch.compile)" if int8.epilogues is not None
                     else f"float steps eager ({int8.eager_because})")
            return (f"int8: oneDNN qlinear, per-token 8-bit activations, {int8.weight_bits}-bit per-channel "
                    f"weights, {steps}; {path} path")
        if self.fused:
            return f"bf16: oneDNN fused linear (+GELU/residual epilogue); {path} path"
        from .hardware import torch_cpu_kernels

        return f"{str(self.dtype).removeprefix('torch.')}: aten linear (torch kernels {torch_cpu_kernels()}); {path} path"

    @torch.inference_mode()
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(T, ctx) token ids -> (T, E) raw (unnormalised) text embeddings, float32.

        CLIP's text tower is causal and pools the end-of-text token, so the padding after the longest
        prompt never reaches the output: we run only that many positions (exact, ~5x fewer than 77).
        """
        ids = token_ids.to(self.device)
        model = self.model
        if not self.text_truncatable:
            return model.encode_text(ids).float()
        from open_clip.transformer import text_global_pool

        length = int(ids.argmax(dim=-1).max()) + 1  # end-of-text has the largest id
        ids = ids[:, :length]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast) + model.positional_embedding[:length].to(cast)  # (T, L, W)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = text_global_pool(model.ln_final(x), ids, "argmax")  # (T, W)
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
        return x.float()

    @torch.inference_mode()
    def encode_full(self, pixels: torch.Tensor, layers: tuple[int, ...] = ()) -> FullImageFeatures:
        """(B, 3, H, W) preprocessed pixels -> class embedding, patch tokens and transformer inputs
        (and the raw outputs of the given blocks, 0-based, for MuSc)."""
        tokens = self.visual._embeds(pixels.to(self.device, self.dtype))  # (B, L, D)
        n_prefix = tokens.shape[1] - self.n_patches
        if n_prefix < 0:
            raise ValueError(
                f"input gives {tokens.shape[1]} tokens, fewer than the {self.n_patches} patches of the "
                f"model's {self.grid} grid; resize inputs to the model's image size (use WinClip.preprocess)"
            )
        captured: dict[int, torch.Tensor] = {}
        pooled, patch_tokens = self._finish(tokens, layers, captured)
        return FullImageFeatures(pooled.float(), patch_tokens[:, -self.n_patches :].float(), tokens,
                                 captured or None)

    @torch.inference_mode()
    def encode_windows(self, input_tokens: torch.Tensor, indices: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Window embeddings f(x ⊙ w) for windows given as patch indices.

        input_tokens (B, L, D) from ``encode_full``; indices (N, k*k) flat patch indices -> (B, N, E).
        At most ``chunk`` window sequences go through the transformer per call.
        """
        batch, _, width = input_tokens.shape
        n_prefix = input_tokens.shape[1] - self.n_patches
        n_windows, per_window = indices.shape
        prefix = input_tokens[:, :n_prefix]  # (B, n_prefix, D)
        patches = input_tokens[:, n_prefix:]  # (B, P, D)
        picked = patches[:, indices.to(patches.device).reshape(-1)]  # (B, N*k*k, D)
        picked = picked.reshape(batch, n_windows, per_window, width)  # (B, N, k*k, D)
        prefix = prefix[:, None].expand(batch, n_windows, n_prefix, width)  # (B, N, n_prefix, D)
        sequences = torch.cat([prefix, picked], dim=2).reshape(batch * n_windows, -1, width)  # (B*N, L', D)
        pooled = [self._finish(part)[0] for part in sequences.split(chunk)]  # each (chunk, E)
        return torch.cat(pooled).float().reshape(batch, n_windows, -1)  # (B, N, E)

    @torch.inference_mode()
    def encode_all(
        self, pixels: torch.Tensor, windows: dict[int, torch.Tensor], max_tokens: int = 65536, packed: bool = True,
        layers: tuple[int, ...] = (),
    ) -> tuple[FullImageFeatures, dict[int, torch.Tensor]]:
        """Full image and every window of every scale; the fast path packs them into shared matmuls.

        Returns the full-image features and k -> (B, N_k, E) window embeddings. The packed path
        (one token matrix for the image and all windows, attention per sequence group, layer-1
        Q/K/V computed once per distinct token, last layer for window CLS rows only) gives the same
        numbers as ``encode_full`` + ``encode_windows``, which remain the reference and the fallback.
        """
        for layer in layers:
            if not 0 <= layer < self.n_blocks:
                raise ValueError(f"block {layer} does not exist; the image tower has {self.n_blocks} blocks (0-based)")
        if not (packed and self.packable):
            full = self.encode_full(pixels, layers)
            return full, {k: self.encode_windows(full.input_tokens, idx, max_tokens) for k, idx in windows.items()}
        tokens = self.visual._embeds(pixels.to(self.device, self.dtype))  # (B, L, D)
        per_image = tokens.shape[1] + sum(idx.shape[0] * (tokens.shape[1] - self.n_patches + idx.shape[1])
                                          for idx in windows.values())
        step = max(1, max_tokens // per_image)
        parts = [self._packed(tokens[i : i + step], windows, layers) for i in range(0, tokens.shape[0], step)]
        pooled = torch.cat([p[0] for p in parts]).float()
        patch_tokens = torch.cat([p[1] for p in parts]).float()
        window_embs = {k: torch.cat([p[2][k] for p in parts]).float() for k in windows}
        layer_tokens = {n: torch.cat([p[3][n] for p in parts]) for n in layers} or None
        return FullImageFeatures(pooled, patch_tokens[:, -self.n_patches :], tokens, layer_tokens), window_embs

    def _packed(
        self, tokens: torch.Tensor, windows: dict[int, torch.Tensor], layers: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        batch, length, width = tokens.shape
        n_prefix = length - self.n_patches
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
        blocks = self.visual.transformer.resblocks
        x = distinct[gather]  # (T, D)
        cls_only = getattr(self.visual, "pool_type", "tok") == "tok" and self.visual.attn_pool is None
        fused = self.fused and device.type == "cpu"
        int8 = self.active_int8() if device.type == "cpu" else None
        linear = _onednn_linear if fused else F.linear
        captured: dict[int, torch.Tensor] = {}
        for layer, blk in enumerate(blocks):
            attn = blk.attn
            last = layer == len(blocks) - 1
            q8 = int8.blocks[layer] if int8 is not None else None
            # compiled int8 steps: the windows' Q/K/V dequantised inside their attention, which is fused
            # with the quantisation that follows
            ep = int8.epilogues if q8 is not None else None
            if ep is not None:  # the Q/K/V matmul's output before its row scale and bias, (T, 3D), (T, 1)
                qkv, qkv_s = q8.attention_input_unscaled(blk, distinct if layer == 0 else x, ep)
                qkv, qkv_s = (qkv[gather], qkv_s[gather]) if layer == 0 else (qkv, qkv_s)
            elif q8 is not None:
                qkv = q8.attention_input(blk, distinct if layer == 0 else x)  # (distinct or T, 3D)
                qkv = qkv[gather] if layer == 0 else qkv
            elif layer == 0:  # per-token ops before attention are shared by every window holding the token
                qkv = linear(blk.ln_1(distinct), attn.in_proj_weight, attn.in_proj_bias)[gather]  # (T, 3D)
            else:
                qkv = linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (T, 3D)
            prune_windows = last and cls_only  # window embeddings need only the last layer's CLS output
            if ep is not None:
                q, q_s = _attend_quantised(qkv, qkv_s, q8.qkv.bias, groups, prune_windows, attn.num_heads, ep)
            else:
                attended = _attend_groups(qkv, groups, prune_windows, attn.num_heads)  # (T or pruned T, D)
            if prune_windows:
                x = x[_kept_rows(groups, device)]
            if ep is not None:  # int8 matmuls; the dequantising scale, bias, GELU and residual compiled
                x = q8.rest_quantized(blk, q, q_s, x, ep)
            elif q8 is not None:  # int8 matmuls, the float steps eager
                x = q8.rest(blk, attended, x)
            elif fused:  # oneDNN applies bias, GELU and the residual add inside the matmul
                x = _onednn_linear(attended, attn.out_proj.weight, attn.out_proj.bias, residual=x)
                hidden = _onednn_linear(blk.ln_2(x), blk.mlp.c_fc.weight, blk.mlp.c_fc.bias, gelu=True)
                x = _onednn_linear(hidden, blk.mlp.c_proj.weight, blk.mlp.c_proj.bias, residual=x)
            else:
                x = _residual_linear(x, attended, attn.out_proj, blk.ls_1)
                hidden = blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(x)))
                x = _residual_linear(x, hidden, blk.mlp.c_proj, blk.ls_2)
            if layer in layers:  # the full image's rows come first and are never pruned
                captured[layer] = x[: batch * length].view(batch, length, width)[:, n_prefix:].clone()
        full_rows = batch * length
        pooled, out_tokens = self.visual._pool(x[:full_rows].view(batch, length, width))
        offset, window_embs = full_rows, {}
        for k, (n_seq, seq_len, _) in zip(windows, groups[1:]):
            seq_out = 1 if cls_only else seq_len
            w_pooled, _ = self.visual._pool(x[offset : offset + n_seq * seq_out].view(n_seq, seq_out, width))
            window_embs[k] = w_pooled.reshape(batch, -1, w_pooled.shape[-1])
            offset += n_seq * seq_out
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
            window_embs = {k: e @ self.visual.proj for k, e in window_embs.items()}
        return pooled, out_tokens, window_embs, captured

    def _finish(self, tokens: torch.Tensor, layers: tuple[int, ...] = (),
                captured: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer + pooling + projection, batch-first (N, L, D) in and out; the raw outputs of
        ``layers`` (prefix tokens dropped) go into ``captured``."""
        if layers:
            hidden = tokens
            n_prefix = tokens.shape[1] - self.n_patches
            for index, blk in enumerate(self.visual.transformer.resblocks):
                hidden = blk(hidden)  # (N, L, D), batch-first as check_layout pins
                if index in layers and captured is not None:
                    captured[index] = hidden[:, n_prefix:]
        else:
            hidden = self.visual.transformer(tokens)  # (N, L, D)
        pooled, out_tokens = self.visual._pool(hidden)  # (N, D), (N, L-1, D) for CLS pooling
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj  # (N, E)
        return pooled, out_tokens


def _residual_linear(x: torch.Tensor, h: torch.Tensor, linear: nn.Module, scale: nn.Module) -> torch.Tensor:
    """x + scale(linear(h)); without a layer scale the residual is accumulated by the matmul itself
    (x + bias, then x += h @ W^T in place), saving a pass over the activations."""
    if isinstance(scale, nn.Identity) and linear.bias is not None:
        return (x + linear.bias).addmm_(h, linear.weight.t())
    return x + scale(linear(h))


def _kept_rows(groups: list, device: torch.device) -> torch.Tensor:
    """Rows of the packed token matrix that the last layer keeps: the full image's (first group) and
    each window's class token; built once per pass, on the device."""
    offsets = list(itertools.accumulate((n * L for n, L, _ in groups), initial=0))
    return torch.cat([torch.arange(offsets[g], offsets[g + 1], L if g else 1, device=device)
                      for g, (_, L, _) in enumerate(groups)])


def _attend_groups(qkv: torch.Tensor, groups: list, prune_windows: bool, heads: int) -> torch.Tensor:
    """Attention of every sequence group of the packed matrix: (T, 3D) Q/K/V -> (T', D), heads side by
    side; T' = T, or with ``prune_windows`` the full image's rows and one row per window."""
    n_out = sum(n if (prune_windows and g) else n * L for g, (n, L, _) in enumerate(groups))
    attended = torch.empty(n_out, qkv.shape[1] // 3, dtype=qkv.dtype, device=qkv.device)
    offset = out_offset = 0
    for g, (n_seq, seq_len, _) in enumerate(groups):
        rows = n_seq * seq_len
        o = _attend(qkv[offset : offset + rows].view(n_seq, seq_len, 3, heads, -1), prune_windows and g > 0)
        n_rows = o.shape[0] * o.shape[2]  # (n, H, Lq, hd) written as (n, Lq, H, hd)
        attended[out_offset : out_offset + n_rows].view(o.shape[0], o.shape[2], o.shape[1], -1).copy_(
            o.transpose(1, 2))
        offset, out_offset = offset + rows, out_offset + n_rows
    return attended


def _attend_quantised(
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
        if prune or seq_len < SDPA_MIN_TOKENS:
            step = ep.window_cls_attention_quant if prune else ep.window_attention_quant
            parts.append(step(y_g.view(n_seq, seq_len, -1), s_g.view(n_seq, seq_len, 1), bias, heads))
        else:
            o = _attend(ep.dequant(y_g, s_g, bias).view(n_seq, seq_len, 3, heads, -1))  # (n, H, L, hd)
            parts.append(ep.quant(o.transpose(1, 2).reshape(rows, -1)))
    q, scales = (torch.cat(p) for p in zip(*parts))
    return q, scales


def _attend(qkv: torch.Tensor, first_query_only: bool = False) -> torch.Tensor:
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
        from .hardware import cpu_info

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
    from .hardware import int8_available

    missing = int8_available()
    if missing:
        return missing
    if not packable(visual):
        return "the image tower is not one the packed path knows"
    return next(filter(None, map(_unplain_block, visual.transformer.resblocks)), "")


def _unplain_block(blk: nn.Module) -> str:
    """Why a block does not fit the paths that rewrite its linears (fused bf16, int8): '' when it fits."""
    if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
        return "blocks with layer scale are not supported"
    act = blk.mlp.gelu
    if type(act) is not nn.GELU or act.approximate != "none":
        return "the MLP activation is not exact GELU"
    return ""


def _onednn_linear(
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
        if _unplain_block(blk) or any(m.bias is None for m in (blk.attn.out_proj, blk.mlp.c_fc, blk.mlp.c_proj)):
            return False
    return True


def text_truncatable(clip_model: nn.Module) -> bool:
    """A built-in CLIP text tower with a causal mask and end-of-text pooling (see encode_text)."""
    from open_clip.model import CLIP

    mask = getattr(clip_model, "attn_mask", None)
    if type(clip_model) is not CLIP or getattr(clip_model, "text_pool_type", None) != "argmax" or mask is None:
        return False
    causal = torch.triu(torch.ones(mask.shape, dtype=torch.bool, device=mask.device), diagonal=1)
    return bool(torch.equal(torch.isinf(mask), causal))


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


def check_layout(clip_model: nn.Module) -> None:
    """Fail loudly when open_clip's internal layout is not the one this adapter was written for."""
    visual = getattr(clip_model, "visual", None)
    missing = [a for a in REQUIRED_VISUAL_ATTRS if not hasattr(visual, a)]
    if visual is None or missing:
        raise RuntimeError(
            f"unsupported CLIP image tower {type(visual).__name__}: missing {missing}. WinCLIP needs an "
            "open_clip VisionTransformer (open_clip_torch>=3,<4); timm or ResNet towers are not supported."
        )
    if not hasattr(clip_model, "encode_text"):
        raise RuntimeError(f"{type(clip_model).__name__} has no encode_text; pass an open_clip CLIP model")
