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

from dataclasses import dataclass

import torch
from torch import nn

REQUIRED_VISUAL_ATTRS = ("_embeds", "transformer", "_pool", "proj", "grid_size")


@dataclass(frozen=True)
class FullImageFeatures:
    """One full-image pass. B images, P patches, L tokens, D width, E joint embedding."""

    image_embeddings: torch.Tensor  # (B, E) projected pooled token, = encode_image
    patch_tokens: torch.Tensor  # (B, P, D) final layer after ln_post, unprojected
    input_tokens: torch.Tensor  # (B, L, D) transformer input (embedded, ln_pre), reused by windows


class ClipBackbone:
    """Adapter over an open_clip ``CLIP`` model with a ``VisionTransformer`` image tower."""

    def __init__(self, clip_model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        check_layout(clip_model)
        self.model = clip_model.eval()
        self.visual = clip_model.visual
        self.dtype = dtype
        self.visual.to(dtype)
        self.grid: tuple[int, int] = tuple(int(g) for g in self.visual.grid_size)
        self.n_patches = self.grid[0] * self.grid[1]
        self.width = int(self.visual.conv1.out_channels)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(T, ctx) token ids -> (T, E) raw (unnormalised) text embeddings, float32."""
        return self.model.encode_text(token_ids.to(self.device)).float()

    @torch.inference_mode()
    def encode_full(self, pixels: torch.Tensor) -> FullImageFeatures:
        """(B, 3, H, W) preprocessed pixels -> class embedding, patch tokens and transformer inputs."""
        tokens = self.visual._embeds(pixels.to(self.device, self.dtype))  # (B, L, D)
        n_prefix = tokens.shape[1] - self.n_patches
        if n_prefix < 0:
            raise ValueError(
                f"input gives {tokens.shape[1]} tokens, fewer than the {self.n_patches} patches of the "
                f"model's {self.grid} grid; resize inputs to the model's image size (use WinClip.preprocess)"
            )
        pooled, patch_tokens = self._finish(tokens)
        return FullImageFeatures(pooled.float(), patch_tokens[:, -self.n_patches :].float(), tokens)

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

    def _finish(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer + pooling + projection, batch-first (N, L, D) in and out."""
        hidden = self.visual.transformer(tokens)  # (N, L, D)
        pooled, out_tokens = self.visual._pool(hidden)  # (N, D), (N, L-1, D) for CLS pooling
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj  # (N, E)
        return pooled, out_tokens


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
