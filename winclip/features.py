"""What the image tower gives WinCLIP for B images, and the WinCLIP+ memories of K normal shots.

Shapes: B images, K references, N windows, P = gh*gw patches, D tower width, E joint embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class ImageFeatures:
    """Everything WinCLIP needs from the image tower for B images; prompts can change without redoing it."""

    image_embeddings: torch.Tensor  # (B, E) class token, projected
    patch_tokens: torch.Tensor  # (B, P, D) final layer, after ln_post, unprojected
    window_embeddings: dict[int, torch.Tensor]  # k -> (B, N_k, E)
    layer_tokens: dict[int, torch.Tensor] | None = None  # block -> (B, P, D) raw block outputs (MuSc), if asked

    def to(self, device: torch.device | str) -> "ImageFeatures":
        """The same features on ``device``."""
        return ImageFeatures(
            self.image_embeddings.to(device), self.patch_tokens.to(device),
            {k: e.to(device) for k, e in self.window_embeddings.items()},
            None if self.layer_tokens is None else {n: t.to(device) for n, t in self.layer_tokens.items()},
        )

    @staticmethod
    def concat(parts: "Sequence[ImageFeatures]") -> "ImageFeatures":
        """The features of several batches as one (B = the sum)."""
        first = parts[0]
        return ImageFeatures(
            torch.cat([p.image_embeddings for p in parts]), torch.cat([p.patch_tokens for p in parts]),
            {k: torch.cat([p.window_embeddings[k] for p in parts]) for k in first.window_embeddings},
            None if first.layer_tokens is None else {n: torch.cat([p.layer_tokens[n] for p in parts])
                                                     for n in first.layer_tokens},
        )

    def select(self, rows: list[int] | slice) -> "ImageFeatures":
        """The features of some of the B images."""
        return ImageFeatures(
            self.image_embeddings[rows], self.patch_tokens[rows],
            {k: e[rows] for k, e in self.window_embeddings.items()},
            None if self.layer_tokens is None else {n: t[rows] for n, t in self.layer_tokens.items()},
        )


@dataclass(frozen=True)
class ReferenceMemory:
    """WinCLIP+ memories of K normal images: R^P (patch tokens) and R^W per window scale."""

    shots: int
    patch: torch.Tensor  # (K*P, D)
    windows: dict[int, torch.Tensor]  # k -> (K*N_k, E)
    key: str  # content hash of the reference pixels
    features: ImageFeatures  # per-image features of the K shots, for leave-one-out scoring

    @classmethod
    def from_features(cls, feats: ImageFeatures, key: str) -> "ReferenceMemory":
        return cls(
            shots=feats.patch_tokens.shape[0],
            patch=feats.patch_tokens.reshape(-1, feats.patch_tokens.shape[-1]),  # (K*P, D)
            windows={k: e.reshape(-1, e.shape[-1]) for k, e in feats.window_embeddings.items()},  # (K*N, E)
            key=key,
            features=feats,
        )

    def without(self, index: int) -> "ReferenceMemory":
        """The memory of the other K-1 shots (no recomputation)."""
        keep = [i for i in range(self.shots) if i != index]
        return ReferenceMemory.from_features(self.features.select(keep), f"{self.key}-without-{index}")

    def to(self, device: torch.device | str) -> "ReferenceMemory":
        """The same memory on ``device``."""
        return ReferenceMemory.from_features(self.features.to(device), self.key)

    def shot(self, index: int) -> ImageFeatures:
        return self.features.select(slice(index, index + 1))
