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

import functools
from dataclasses import dataclass

import torch
from torch import nn

from .config import MAX_TOKENS_PER_CALL
from .kernels import Towers, packable, packed_pass

TEXT_BATCH = 256  # prompts per call of open_clip's own text encoder (towers without a prefix tree)
TEXT_TREE_NODES = 1024  # tokens per text-tower call on the prefix-tree path
REQUIRED_VISUAL_ATTRS = ("_embeds", "transformer", "_pool", "proj", "grid_size")


@dataclass(frozen=True)
class FullImageFeatures:
    """One full-image pass. B images, P patches, L tokens, D width, E joint embedding."""

    image_embeddings: torch.Tensor  # (B, E) projected pooled token, = encode_image
    patch_tokens: torch.Tensor  # (B, P, D) final layer after ln_post, unprojected
    input_tokens: torch.Tensor  # (B, L, D) transformer input (embedded, ln_pre), reused by windows
    layer_tokens: dict[int, torch.Tensor] | None = None  # block (0-based) -> (B, P, D) raw output, prefix dropped


class ClipBackbone(Towers):
    """Adapter over an open_clip ``CLIP`` model with a ``VisionTransformer`` image tower; its precision
    machinery (towers per precision, int8, per-thread overrides) is ``kernels.towers.Towers``."""

    def __init__(self, clip_model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        check_layout(clip_model)
        self.model = clip_model.eval()
        super().__init__(clip_model.visual, dtype)  # the tower per precision (kernels.towers)
        self.grid: tuple[int, int] = tuple(int(g) for g in self.visual.grid_size)
        self.n_patches = self.grid[0] * self.grid[1]
        self.width = int(self.visual.conv1.out_channels)
        self.packable = packable(self.visual)
        self.text_truncatable = text_truncatable(clip_model)
        self.n_blocks = len(self.visual.transformer.resblocks)

    @property
    def device(self) -> torch.device:
        """Where the weights are (read from them, so it cannot disagree; loading checks that every
        tensor went to one device, ``loading.place``)."""
        return next(self.model.parameters()).device

    def kernel_path(self) -> str:
        """Which kernels the image tower's linear layers run on, in words (printed with speed figures)."""
        if self.device.type == "cuda":
            return f"cuda {str(self.dtype).removeprefix('torch.')} (cuBLAS), packed path" if self.packable else "cuda"
        return self.kernel().describe(self.dtype, "packed" if self.packable else "reference (not packable)")

    @torch.inference_mode()
    def encode_text(self, token_ids: torch.Tensor, max_nodes: int = TEXT_TREE_NODES) -> torch.Tensor:
        """(T, ctx) token ids -> (T, E) raw (unnormalised) text embeddings, float32.

        CLIP's text tower is causal and pools the end-of-text token, so a token's output depends only on
        the tokens before it. The prompts run as a prefix tree (``PrefixTree``): a beginning shared by
        several prompts ("a cropped photo of the") runs once, each token attends to its own prompt's
        earlier tokens only, at its own position, and the padding after each end never runs. The same
        sums as one prompt alone (exact up to float rounding); the default 264 prompts of a "washer" with
        one defect word are 1071 tree tokens instead of 264 x 16 (up to the longest) or 264 x 77. At most
        ``max_nodes`` tokens per call (attention is quadratic in them).
        """
        ids = token_ids.to(self.device)
        model = self.model
        if not self.text_truncatable:
            return torch.cat([model.encode_text(part).float() for part in ids.split(TEXT_BATCH)])
        ends = ids.argmax(dim=-1).tolist()  # end-of-text has the largest id
        rows = [row[: end + 1] for row, end in zip(ids.tolist(), ends)]
        groups = tree_groups(rows, max_nodes)
        encoded = torch.cat([self._encode_tree(PrefixTree.of([rows[i] for i in group], self.device))
                             for group in groups])  # in the groups' order
        return encoded[torch.tensor([i for group in groups for i in group], device=self.device).argsort()]

    def _encode_tree(self, tree: PrefixTree) -> torch.Tensor:
        model = self.model
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tree.tokens).to(cast) + model.positional_embedding[tree.positions].to(cast)
        mask = torch.zeros(tree.allowed.shape, dtype=cast, device=x.device).masked_fill_(~tree.allowed, -torch.inf)
        x = model.transformer(x[None], attn_mask=mask)[0]  # (N, W): one sequence, tree-shaped attention
        x = model.ln_final(x[tree.ends])  # (T, W): each prompt's end-of-text token
        if model.text_projection is not None:
            x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
        return x.float()

    @torch.inference_mode()
    def encode_full(self, pixels: torch.Tensor, layers: tuple[int, ...] = (),
                    max_tokens: int = MAX_TOKENS_PER_CALL) -> FullImageFeatures:
        """(B, 3, H, W) preprocessed pixels -> class embedding, patch tokens and transformer inputs (and the
        raw outputs of the given blocks, 0-based, for MuSc); at most ``max_tokens`` tokens per transformer
        call (whole images: at least one)."""
        tokens = self.visual._embeds(pixels.to(self.device, self.dtype))  # (B, L, D)
        n_prefix = tokens.shape[1] - self.n_patches
        if n_prefix < 0:
            raise ValueError(
                f"input gives {tokens.shape[1]} tokens, fewer than the {self.n_patches} patches of the "
                f"model's {self.grid} grid; resize inputs to the model's image size (use WinClip.preprocess)"
            )
        step = max(1, max_tokens // tokens.shape[1])
        parts, captured = [], []
        for part in tokens.split(step):
            captured.append({})
            parts.append(self._finish(part, layers, captured[-1]))
        pooled, patch_tokens = (torch.cat(p) for p in zip(*parts))
        layer_tokens = {n: torch.cat([c[n] for c in captured]) for n in layers} or None
        return FullImageFeatures(pooled.float(), patch_tokens[:, -self.n_patches :].float(), tokens, layer_tokens)

    @torch.inference_mode()
    def encode_windows(self, input_tokens: torch.Tensor, indices: torch.Tensor,
                       max_tokens: int = MAX_TOKENS_PER_CALL) -> torch.Tensor:
        """Window embeddings f(x ⊙ w) for windows given as patch indices.

        input_tokens (B, L, D) from ``encode_full``; indices (N, k*k) flat patch indices -> (B, N, E).
        At most ``max_tokens`` tokens (whole window sequences: at least one) go through the transformer per call.
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
        step = max(1, max_tokens // sequences.shape[1])
        pooled = [self._finish(part)[0] for part in sequences.split(step)]  # each (step, E)
        return torch.cat(pooled).float().reshape(batch, n_windows, -1)  # (B, N, E)

    @torch.inference_mode()
    def encode_all(
        self, pixels: torch.Tensor, windows: dict[int, torch.Tensor], max_tokens: int = MAX_TOKENS_PER_CALL,
        packed: bool = True, layers: tuple[int, ...] = (),
    ) -> tuple[FullImageFeatures, dict[int, torch.Tensor]]:
        """Full image and every window of every scale -> the full-image features and k -> (B, N_k, E) window
        embeddings. The packed path (``kernels.packed``, one kernel chosen for the pass) gives the same numbers
        as ``encode_full`` + ``encode_windows``, which remain the reference and the fallback."""
        for layer in layers:
            if not 0 <= layer < self.n_blocks:
                raise ValueError(f"block {layer} does not exist; the image tower has {self.n_blocks} blocks (0-based)")
        if not (packed and self.packable):
            full = self.encode_full(pixels, layers, max_tokens)
            return full, {k: self.encode_windows(full.input_tokens, idx, max_tokens) for k, idx in windows.items()}
        kernel = self.kernel()
        tokens = self.visual._embeds(pixels.to(self.device, self.dtype))  # (B, L, D)
        per_image = tokens.shape[1] + sum(idx.shape[0] * (tokens.shape[1] - self.n_patches + idx.shape[1])
                                          for idx in windows.values())
        step = max(1, max_tokens // per_image)
        parts = [packed_pass(self.visual, self.n_patches, tokens[i : i + step], windows, layers, kernel)
                 for i in range(0, tokens.shape[0], step)]
        pooled = torch.cat([p[0] for p in parts]).float()
        patch_tokens = torch.cat([p[1] for p in parts]).float()
        window_embs = {k: torch.cat([p[2][k] for p in parts]).float() for k in windows}
        layer_tokens = {n: torch.cat([p[3][n] for p in parts]) for n in layers} or None
        return FullImageFeatures(pooled, patch_tokens[:, -self.n_patches :], tokens, layer_tokens), window_embs

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


@dataclass(frozen=True)
class PrefixTree:
    """Prompts' tokens as a tree: one node per distinct beginning, in creation order (a parent first)."""

    tokens: torch.Tensor  # (N,) the token id each node adds
    positions: torch.Tensor  # (N,) its position in its prompts
    allowed: torch.Tensor  # (N, N) bool: node i attends to node j (j is i or one of its ancestors)
    ends: torch.Tensor  # (T,) each prompt's last node (its end-of-text token)

    @classmethod
    def of(cls, rows: list[list[int]], device: torch.device | str = "cpu") -> "PrefixTree":
        nodes: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        parents: list[int] = []
        tokens: list[int] = []
        positions: list[int] = []
        ends = []
        for row in rows:
            node = -1
            for position, token in enumerate(row):
                key = (node, token)
                if key not in nodes:
                    nodes[key] = len(tokens)
                    parents.append(node)
                    tokens.append(token)
                    positions.append(position)
                node = nodes[key]
            ends.append(node)
        allowed = torch.zeros(len(tokens), len(tokens), dtype=torch.bool)
        for i, parent in enumerate(parents):  # a node sees what its parent sees, and itself
            if parent >= 0:
                allowed[i] = allowed[parent]
            allowed[i, i] = True
        as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=device)
        return cls(as_tensor(tokens), as_tensor(positions), allowed.to(device), as_tensor(ends))


def tree_groups(rows: list[list[int]], max_nodes: int) -> list[list[int]]:
    """Indices of ``rows`` in groups whose prefix trees have at most ``max_nodes`` nodes (a longer row alone),
    rows with shared beginnings together: in sorted order a row's new nodes are those after its common
    beginning with the row before it."""
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    groups: list[list[int]] = []
    size, previous = 0, None
    for i in order:
        row = rows[i]
        shared = 0 if previous is None else next(
            (k for k, (a, b) in enumerate(zip(row, previous)) if a != b), min(len(row), len(previous)))
        if groups and size + len(row) - shared <= max_nodes:
            groups[-1].append(i)
            size += len(row) - shared
        else:
            groups.append([i])
            size = len(row)
        previous = row
    return groups


def text_truncatable(clip_model: nn.Module) -> bool:
    """A built-in CLIP text tower with a causal mask and end-of-text pooling: it can run a prefix tree
    (see encode_text)."""
    from open_clip.model import CLIP

    mask = getattr(clip_model, "attn_mask", None)
    if type(clip_model) is not CLIP or getattr(clip_model, "text_pool_type", None) != "argmax" or mask is None:
        return False
    causal = torch.triu(torch.ones(mask.shape, dtype=torch.bool, device=mask.device), diagonal=1)
    return bool(torch.equal(torch.isinf(mask), causal))


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
