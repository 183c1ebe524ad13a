"""Scores against text prototypes (§4.1) and against reference memories (WinCLIP+, §4.3, eq. 4).

Pure tensor maths: cosine scoring with CLIP's temperature, and nearest-neighbour association.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Scoring


def text_scores(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: float = 0.07,
    scoring: Scoring = "two_class",
) -> torch.Tensor:
    """Anomaly probability of each embedding. (..., D) x (2, D) [normal, anomalous] -> (...).

    two_class: softmax(cos(e, [normal, anomalous]) / temperature)[anomalous].
    one_class (Table 3a): (1 - cos(e, normal)) / 2, i.e. "-<f(x), g(normal)>" mapped to [0, 1].
    """
    cos = F.normalize(embeddings, dim=-1) @ F.normalize(prototypes, dim=-1).T  # (..., 2)
    if scoring == "two_class":
        return (cos / temperature).softmax(dim=-1)[..., 1]
    if scoring == "one_class":
        return ((1.0 - cos[..., 0]) / 2.0).clamp(0.0, 1.0)
    raise ValueError(f"scoring must be 'two_class' or 'one_class', got {scoring!r}")


def associate(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Eq. 4: min over memory r of (1 - cos(q, r)) / 2, no spatial restriction.

    queries (B, N, D), memory (M, D) -> (B, N) in [0, 1].
    Example: q = [[1,0,0],[0,1,0]], R = [[0,1,0],[1,1,0]] -> [0.1464, 0.0].
    """
    cos = F.normalize(queries, dim=-1) @ F.normalize(memory, dim=-1).T  # (B, N, M)
    return ((1.0 - cos.amax(dim=-1)) / 2.0).clamp_min(0.0)
