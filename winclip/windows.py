"""Sliding windows over the patch grid and their aggregation to patches, WinCLIP §4.2, eq. 3.

Pure tensor maths: window indices, per-patch harmonic (or arithmetic) aggregation of window scores,
and the multi-scale harmonic mean. Shapes: B batch, N windows, P = gh*gw patches.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import Aggregation


def window_starts(size: int, k: int, stride: int) -> list[int]:
    """Start offsets along one axis: multiples of stride, plus the border-flush one if stride skips it.

    With stride 1 (the paper) this is 0..size-k. The extra last start keeps every patch covered when
    (size - k) is not a multiple of the stride, so no patch is left without a score.
    """
    if k > size:
        raise ValueError(f"window size {k} does not fit a patch grid of {size}; use window sizes <= {size}")
    starts = list(range(0, size - k + 1, stride))
    if starts[-1] != size - k:
        starts.append(size - k)
    return starts


def window_indices(grid: tuple[int, int], k: int, stride: int = 1) -> torch.Tensor:
    """Flat patch indices (row-major) of every k x k window, windows in row-major order.

    Returns (N, k*k) int64. Example: grid (3, 3), k=2 -> [[0,1,3,4], [1,2,4,5], [3,4,6,7], [4,5,7,8]].
    """
    gh, gw = grid
    rows, cols = window_starts(gh, k, stride), window_starts(gw, k, stride)
    offsets = (torch.arange(k)[:, None] * gw + torch.arange(k)[None, :]).reshape(-1)  # (k*k,)
    origins = (torch.tensor(rows)[:, None] * gw + torch.tensor(cols)[None, :]).reshape(-1)  # (N,)
    return origins[:, None] + offsets[None, :]  # (N, k*k)


def coverage(grid: tuple[int, int], indices: torch.Tensor) -> torch.Tensor:
    """(P, N) bool: patch p lies in window n."""
    n_windows = indices.shape[0]
    cover = torch.zeros(grid[0] * grid[1], n_windows, dtype=torch.bool)
    cover[indices.T.reshape(-1), torch.arange(n_windows).repeat(indices.shape[1])] = True
    return cover


def aggregate_windows(
    window_scores: torch.Tensor,
    grid: tuple[int, int],
    indices: torch.Tensor,
    mode: Aggregation = "harmonic",
) -> torch.Tensor:
    """Spread each window's score to its patches and average per patch (eq. 3).

    window_scores (B, N) >= 0 -> (B, gh, gw). Harmonic: a zero window score makes its patches 0,
    the normality-leaning behaviour eq. 3 is chosen for.
    """
    cover = coverage(grid, indices).to(window_scores.device)  # (P, N)
    counts = cover.sum(dim=1).to(window_scores.dtype)  # (P,)
    if mode == "harmonic":
        inverse = torch.where(cover[None], 1.0 / window_scores[:, None, :], 0.0).sum(dim=-1)  # (B, P)
        patch_scores = counts / inverse  # 1/inf -> 0 where a covering window scored exactly 0
    elif mode == "arithmetic":
        patch_scores = (window_scores @ cover.T.to(window_scores.dtype)) / counts  # (B, P)
    else:
        raise ValueError(f"aggregation must be 'harmonic' or 'arithmetic', got {mode!r}")
    return patch_scores.reshape(-1, *grid)  # (B, gh, gw)


def combine_scales(maps: Sequence[torch.Tensor], mode: Aggregation = "harmonic") -> torch.Tensor:
    """Per-patch mean over scales (the image score counts as one scale, broadcast). (S x (B, gh, gw))."""
    stacked = torch.stack(list(maps))  # (S, B, gh, gw)
    if mode == "harmonic":
        return stacked.shape[0] / (1.0 / stacked).sum(dim=0)
    if mode == "arithmetic":
        return stacked.mean(dim=0)
    raise ValueError(f"aggregation must be 'harmonic' or 'arithmetic', got {mode!r}")
