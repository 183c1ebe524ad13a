"""MuSc: zero-shot anomaly scoring of a *set* of unlabelled images by mutual scoring (Li et al., ICLR 2024).

No text and no references: most parts of a batch are normal, so each patch is scored by how far it is
from its nearest patches in the *other* images. As the official implementation does it:

- features: the raw outputs of some blocks of the image tower (ViT-B/16+: blocks 3, 6, 9, 12), prefix
  tokens dropped;
- LNAMD (local neighbourhood aggregation): per image and block, LayerNorm over the whole (D, gh, gw) token
  map (no affine), then r x r mean over each patch's neighbourhood with zero padding counted (their
  ``Unfold`` + ``adaptive_avg_pool1d`` to D channels is exactly this), then L2 normalisation; r in 1, 3, 5;
- MSM (mutual scoring): for patch p of image i and each other image j, the Euclidean distance to p's
  nearest patch in j; the patch score is the mean of the smallest 30% of those N-1 minima (k = int(0.3 (N-1)),
  so N >= 5 is needed); mean over blocks, then over r;
- image score: the maximum of the map upsampled bilinearly (align_corners=True) to the input size, then
  RsCIN re-scoring: min-max normalise the scores over the batch and average each with its k most similar
  images' (cosine of the projected class-token embeddings, the image itself included), mean over k in
  ``rescore_k``.

The distances are symmetric: one matrix product of image i against all later images gives both i's
nearest patches in them and theirs in i, so each pair is computed once (the official code computes every
ordered pair with ``torch.cdist``). Distances come from the expansion |a|^2 + |b|^2 - 2ab, as cdist's do,
except that nearest distances below 0.1 are recomputed as |a - b|: there the expansion's rounding,
magnified by the square root, reaches 1e-5. Pure tensor maths; shapes: N images, P = gh*gw patches, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_IMAGES = 5  # k = int(0.3 * (N - 1)) must be >= 1; the official code returns NaN below this
LNAMD_IMAGES_PER_CALL = 16  # bounds LNAMD's temporaries (a few copies of 16 x P x D floats)
EXACT_BELOW = 0.01  # squared distances below this are recomputed as |a - b| (rounding would show there)


def quarter_layers(n_blocks: int) -> tuple[int, ...]:
    """The blocks at each quarter of the tower, 0-based: 12 blocks -> (2, 5, 8, 11), 24 -> (5, 11, 17, 23)
    (the official settings for ViT-B and ViT-L)."""
    return tuple(sorted({max(0, n_blocks * q // 4 - 1) for q in (1, 2, 3, 4)}))


@dataclass(frozen=True)
class MuscConfig:
    layers: tuple[int, ...] = (2, 5, 8, 11)  # 0-based blocks (3, 6, 9, 12 of ViT-B/16+), as the official config
    radii: tuple[int, ...] = (1, 3, 5)  # LNAMD aggregation degrees r
    topmin: float = 0.3  # fraction of the other images whose minima are averaged (the smallest ones)
    # RsCIN neighbour counts (their MVTec-AD setting; VisA uses 1, 8, 9); () = off
    rescore_k: tuple[int, ...] = (1, 2, 3)
    pairs_per_call: int = 64  # images compared with one image per cdist call: bounds memory (P x 64P floats)

    def __post_init__(self) -> None:
        if not self.layers or not self.radii:
            raise ValueError("MuSc needs at least one block and one aggregation degree")
        if any(r < 1 or r % 2 == 0 for r in self.radii):
            raise ValueError(f"aggregation degrees must be odd and >= 1, got {self.radii}")
        if not 0 < self.topmin <= 1:
            raise ValueError(f"topmin must be in (0, 1], got {self.topmin}")


def lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """(N, P, D) raw block tokens -> (N, P, D) aggregated, L2-normalised patch features."""
    n, p, d = tokens.shape
    gh, gw = grid
    maps = tokens.float().reshape(n, gh, gw, d).permute(0, 3, 1, 2)  # (N, D, gh, gw)
    maps = F.layer_norm(maps, maps.shape[1:])  # over (D, gh, gw) per image, no affine
    if r > 1:
        maps = F.avg_pool2d(maps, r, stride=1, padding=(r - 1) // 2, count_include_pad=True)  # (N, D, gh, gw)
    features = maps.permute(0, 2, 3, 1).reshape(n, p, d)  # (N, P, D)
    return F.normalize(features, dim=-1)


def mutual_scores(z: torch.Tensor, topmin: float = 0.3, pairs_per_call: int = 64,
                  minima: torch.Tensor | None = None) -> torch.Tensor:
    """(N, P, C) features -> (N, P) patch scores: mean of the smallest ``topmin`` share of the per-image
    nearest-patch distances to the other N-1 images. ``minima``: an (N, P, N) buffer to reuse."""
    n, p, c = z.shape
    k = int((n - 1) * topmin) if topmin < 1 else int(topmin)
    if n < MIN_IMAGES or k < 1:
        raise ValueError(f"MuSc needs at least {MIN_IMAGES} images in the batch (it scores each image against "
                         f"the others and averages the closest 30%); got {n}")
    if minima is None:
        minima = torch.empty(n, p, n, dtype=z.dtype, device=z.device)  # [i, patch, j] = min over j's patches
    minima[torch.arange(n), :, torch.arange(n)] = float("inf")  # an image is not compared with itself
    sq = (z * z).sum(dim=-1)  # (N, P) squared norms
    flat = z.reshape(n * p, c)
    # one buffer for every pair block: the squared distances are built in place (|a|^2 + |b|^2, then
    # addmm's -2ab: the same roundings as the plain expression, without its three temporaries)
    buffer = torch.empty(p, min(pairs_per_call, n) * p, dtype=z.dtype, device=z.device)
    for i in range(n - 1):
        for start in range(i + 1, n, pairs_per_call):
            stop = min(start + pairs_per_call, n)
            m = stop - start
            flat_d2 = buffer[:, : m * p]
            torch.add(sq[i][:, None], sq[start:stop].reshape(1, -1), out=flat_d2)
            flat_d2.addmm_(z[i], flat[start * p : stop * p].T, alpha=-2)
            d2 = flat_d2.view(p, m, p)  # (P, m, P) squared distances
            v1, j1 = d2.min(dim=-1)  # (P, m): i's patches -> nearest patch in each later image
            v2, j2 = d2.min(dim=0)  # (m, P): each later image's patches -> nearest patch of image i
            minima[i, :, start:stop] = v1.clamp_min(0).sqrt()
            minima[start:stop, :, i] = v2.clamp_min(0).sqrt()
            # Near-identical patches: the expansion's rounding, magnified by the square root, would show;
            # take those few distances directly as |a - b|.
            pa, mj = (v1 < EXACT_BELOW).nonzero(as_tuple=True)
            if len(pa):
                minima[i, pa, start + mj] = (z[i][pa] - z[start + mj, j1[pa, mj]]).norm(dim=-1)
            mj, q = (v2 < EXACT_BELOW).nonzero(as_tuple=True)
            if len(mj):
                minima[start + mj, q, i] = (z[start + mj, q] - z[i][j2[mj, q]]).norm(dim=-1)
    smallest = minima.topk(k, dim=-1, largest=False).values  # (N, P, k)
    return smallest.mean(dim=-1)


def musc_maps(layer_tokens: dict[int, torch.Tensor], grid: tuple[int, int], config: MuscConfig = MuscConfig()
              ) -> torch.Tensor:
    """{block: (N, P, D)} -> (N, gh, gw) patch-score maps: mean over blocks, then over r."""
    missing = [layer for layer in config.layers if layer not in layer_tokens]
    if missing:
        raise ValueError(f"MuSc needs the tokens of blocks {missing}")
    first = layer_tokens[config.layers[0]]
    n, p = first.shape[:2]
    # buffers allocated once for all blocks and degrees: at N = 200 the features alone are 161 MB, and
    # allocating them again per (block, r) leaves the allocator holding freed copies
    z = torch.empty(first.shape, dtype=torch.float32, device=first.device)  # (N, P, D)
    minima = torch.empty(n, p, n, dtype=torch.float32, device=first.device)
    per_r = []
    for r in config.radii:
        per_layer = []
        for layer in config.layers:
            tokens = layer_tokens[layer]
            for start in range(0, n, LNAMD_IMAGES_PER_CALL):  # LNAMD is per image: a few at a time, in place
                z[start : start + LNAMD_IMAGES_PER_CALL] = lnamd(tokens[start : start + LNAMD_IMAGES_PER_CALL], grid, r)
            per_layer.append(mutual_scores(z, config.topmin, config.pairs_per_call, minima))
        per_r.append(torch.stack(per_layer).mean(dim=0))  # (N, P)
    return torch.stack(per_r).mean(dim=0).reshape(n, *grid)


def image_scores(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, gh, gw) -> (N,) maximum of the map upsampled to ``size`` (bilinear, align_corners=True, as theirs)."""
    up = F.interpolate(maps[:, None].double(), size=size, mode="bilinear", align_corners=True)
    return up.flatten(1).amax(dim=1)


def rescore(scores: torch.Tensor, embeddings: torch.Tensor, k_list: tuple[int, ...]) -> torch.Tensor:
    """RsCIN: min-max normalised scores averaged over each image's k most similar images (itself included)."""
    if not k_list:
        return scores
    scores = scores.double()
    normalised = (scores - scores.min()) / (scores.max() - scores.min()).clamp_min(1e-12)
    emb = F.normalize(embeddings.double(), dim=-1)
    similarity = emb @ emb.T  # (N, N)
    out = []
    for k in k_list:
        k = min(k, similarity.shape[0])
        top = similarity.topk(k, dim=-1).indices  # (N, k)
        weights = torch.zeros_like(similarity).scatter(1, top, similarity.gather(1, top))
        out.append((weights / weights.sum(dim=1, keepdim=True)) @ normalised)
    return torch.stack(out).mean(dim=0)


class BlockTokens:
    """The block tokens of a set, collected batch by batch into tensors allocated once for ``capacity``
    images (no list-then-concatenate copy: at N = 200 that copy alone would be one more 645 MB)."""

    def __init__(self, layers: tuple[int, ...], capacity: int) -> None:
        self.layers, self.capacity, self.count = layers, capacity, 0
        self._tokens: dict[int, torch.Tensor] = {}
        self._embeddings: torch.Tensor | None = None

    def add(self, layer_tokens: dict[int, torch.Tensor], embeddings: torch.Tensor) -> None:
        """One encoded batch: {block: (B, P, D)} and its (B, E) image embeddings, kept on the device they
        come from (so a GPU also does the mutual scoring: on ZeroGPU the CPU side would not fit a GPU call)."""
        b = len(embeddings)
        if self.count + b > self.capacity:
            raise ValueError(f"more than the {self.capacity} images this store was made for")
        if self._embeddings is None:
            device = embeddings.device
            self._embeddings = torch.empty(self.capacity, embeddings.shape[-1], device=device)
            for layer in self.layers:
                self._tokens[layer] = torch.empty(self.capacity, *layer_tokens[layer].shape[1:], device=device)
        for layer in self.layers:
            self._tokens[layer][self.count : self.count + b] = layer_tokens[layer]
        self._embeddings[self.count : self.count + b] = embeddings
        self.count += b

    def tensors(self) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """({block: (N, P, D)}, (N, E)) for the images added so far (views, no copy)."""
        if self._embeddings is None:
            raise ValueError("no images were added")
        n = self.count
        return {layer: t[:n] for layer, t in self._tokens.items()}, self._embeddings[:n]


@dataclass(frozen=True)
class MuscOutput:
    maps: torch.Tensor  # (N, gh, gw) patch scores (Euclidean distances of unit vectors, in [0, 2])
    raw_scores: torch.Tensor  # (N,) map maxima before re-scoring
    scores: torch.Tensor  # (N,) final image scores (re-scored: in [0, 1], relative to this batch)


def score_batch(layer_tokens: dict[int, torch.Tensor], embeddings: torch.Tensor, grid: tuple[int, int],
                input_size: tuple[int, int], config: MuscConfig = MuscConfig()) -> MuscOutput:
    maps = musc_maps(layer_tokens, grid, config)
    raw = image_scores(maps, input_size)
    return MuscOutput(maps, raw, rescore(raw, embeddings, config.rescore_k))
