"""Anomaly classification and segmentation metrics, as reported in the WinCLIP paper (§5).

Image level: AUROC, AUPR (average precision), F1-max. Pixel level: pAUROC, PRO (area under the
per-region-overlap curve for FPR <= 0.3, divided by 0.3; regions = connected components of the
ground truth, 8-connected), F1-max. All in [0, 1]. Pure numpy / scikit-learn / scipy; the three pixel
metrics are computed exactly at every distinct threshold from one sort of the pixels, so a full category
at full resolution needs memory for a few copies of the maps, never a per-threshold loop.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

PRO_FPR_LIMIT = 0.3
PIXEL_SIZE = 256  # pixel metrics compare maps and masks at this square resolution (inspect, prompts, evaluate)


def _f1_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F1 at each of precision_recall_curve's points, and the thresholds (one fewer: the last point has none)."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    return 2 * precision * recall / np.maximum(precision + recall, 1e-12), thresholds


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(_f1_curve(labels, scores)[0].max())


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold at which F1 is highest (the threshold behind ``f1_max``)."""
    f1, thresholds = _f1_curve(labels, scores)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def curves(scores, labels) -> dict[str, tuple[list[float], list[float]]]:
    """Points of the ROC curve (FPR, TPR) and of the PR curve (recall, precision), for plotting."""
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    return {"roc": (fpr.tolist(), tpr.tolist()), "pr": (recall.tolist(), precision.tolist())}


def _check_binary(labels: np.ndarray, what: str) -> None:
    if labels.min() == labels.max():
        raise ValueError(f"{what} need both normal and anomalous examples; got only {int(labels.flat[0])}s")


def image_metrics(scores, labels) -> dict[str, float]:
    """scores (N,) higher = more anomalous, labels (N,) 1 = anomalous -> {auroc, aupr, f1_max}."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.shape[0]} scores for {labels.shape[0]} labels")
    _check_binary(labels, "image metrics")
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr": float(average_precision_score(labels, scores)),
        "f1_max": f1_max(labels, scores),
    }


def aurocs(scores, labels) -> np.ndarray:
    """Image AUROC of each row of ``scores`` (R, N) against ``labels`` (N,), all rows at once: the
    Mann-Whitney statistic with tied scores given their average rank, which is the trapezoid ROC area
    scikit-learn's ``roc_auc_score`` computes (a tie counts one half). For tables of many prompts."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.ndim != 2 or scores.shape[1] != labels.shape[0]:
        raise ValueError(f"scores {scores.shape} need one row per candidate and {labels.shape[0]} columns")
    _check_binary(labels, "image metrics")
    if np.isnan(scores).any():
        raise ValueError("the scores contain NaN")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    ranks = rankdata(scores, axis=1)
    return (ranks[:, labels].sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives)


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Ground-truth regions (8-connected components of each mask) numbered 1.. across the images, 0 on
    normal pixels (uint32), and how many there are."""
    regions = np.zeros(masks.shape, dtype=np.uint32)
    n_regions = 0
    structure = np.ones((3, 3), dtype=int)
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=structure)
        regions[i] = np.where(labelled > 0, labelled + n_regions, 0)
        n_regions += count
    return regions, n_regions


def _ranked(maps: np.ndarray, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every pixel ranked by score, descending, in one sort: for each distinct score (a threshold), the
    count of anomalous (tps) and of normal (fps) pixels at or above it; with the ranked region ids and the
    index of each threshold's last pixel in that ranking.

    Scores are compared as float32 (-0.0 as 0.0). The sort is of one uint64 per pixel, the score's bits
    made order-preserving above the pixel's region id: numpy sorts plain integers several times faster
    than it argsorts (SIMD where the CPU has it; benchmarks/metrics_bench.py), and the region comes along
    without a gather.
    """
    scores = np.asarray(maps, dtype=np.float32) + np.float32(0.0)  # + 0.0: -0.0 becomes 0.0
    if np.isnan(scores).any():
        raise ValueError("the anomaly maps contain NaN; check the model's output before measuring it")
    bits = scores.ravel().view(np.uint32)
    # IEEE floats order as integers once negatives have all bits flipped and positives their sign bit set
    keys = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= regions.ravel()
    keys.sort()
    keys = keys[::-1].copy()  # descending
    halves = keys.view(np.uint32).reshape(-1, 2)
    key_high, ranked = (halves[:, 1], halves[:, 0]) if np.little_endian else (halves[:, 0], halves[:, 1])
    last = np.empty(len(keys), dtype=bool)
    np.not_equal(key_high[1:], key_high[:-1], out=last[:-1])  # all ties enter together
    last[-1] = True
    ends = np.flatnonzero(last)
    tps = np.cumsum(ranked > 0)[ends]
    return tps, ends + 1 - tps, ranked, ends


def _pro(n_regions: int, ranked: np.ndarray, ends: np.ndarray, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every threshold, starting at (0, 0): each anomalous pixel adds 1 / (|its region| *
    n_regions) to PRO, each normal pixel 1 / n_normal to FPR."""
    if n_regions == 0 or fps[-1] == 0:
        raise ValueError("PRO needs at least one anomalous region and some normal pixels")
    sizes = np.bincount(ranked, minlength=n_regions + 1).astype(np.float64)
    step = np.zeros(n_regions + 1)
    step[1:] = 1.0 / (sizes[1:] * n_regions)
    pro = np.cumsum(step.take(ranked))[ends]
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, pro]


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, descending thresholds, starting at (0, 0).

    maps (N, H, W) float (compared as float32), masks (N, H, W) bool. PRO = mean over ground-truth
    regions of the fraction of the region at or above the threshold; FPR over all normal pixels.
    """
    regions, n_regions = _regions(np.asarray(masks).astype(bool))
    _, fps, ranked, ends = _ranked(maps, regions)
    return _pro(n_regions, ranked, ends, fps)


def area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit], x non-decreasing, linear interpolation at the limit."""
    keep = x <= limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < limit and keep.sum() < len(x):
        nxt = int(keep.sum())
        x0, x1, y0, y1 = x[nxt - 1], x[nxt], y[nxt - 1], y[nxt]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.r_[xs, limit], np.r_[ys, y_lim]
    return float(np.trapezoid(ys, xs))


def pixel_metrics(maps, masks) -> dict[str, float]:
    """maps (N, H, W) anomaly maps, masks (N, H, W) bool ground truth -> {pauroc, pro, f1_max}.

    All three from one ranking of the pixels (``_ranked``): pAUROC is the trapezoid area under the ROC
    points at every distinct score, as scikit-learn's ``roc_auc_score``; F1-max the best 2TP / (TP + FP + P)
    over those thresholds, as the maximum over ``precision_recall_curve``.
    """
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks).astype(bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ; resize both to one size first")
    _check_binary(masks.ravel(), "pixel metrics")
    regions, n_regions = _regions(masks)
    tps, fps, ranked, ends = _ranked(maps, regions)
    fpr, pro = _pro(n_regions, ranked, ends, fps)
    tpr = np.r_[0.0, tps / tps[-1]]
    return {
        "pauroc": float(np.trapezoid(tpr, fpr)),
        "pro": area_up_to(fpr, pro, PRO_FPR_LIMIT) / PRO_FPR_LIMIT,
        "f1_max": float((2 * tps / (tps + fps + tps[-1])).max()),
    }
