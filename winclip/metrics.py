"""Anomaly classification and segmentation metrics, as reported in the WinCLIP paper (§5).

Image level: AUROC, AUPR (average precision), F1-max. Pixel level: pAUROC, PRO (area under the
per-region-overlap curve for FPR <= 0.3, divided by 0.3; regions = connected components of the
ground truth, 8-connected), F1-max. All in [0, 1]. Pure numpy / scikit-learn / scipy; the PRO curve is
computed exactly at every distinct threshold by one sort, so a full category at full resolution needs
memory for a few copies of the maps, never a per-threshold loop.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
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


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, descending thresholds, starting at (0, 0).

    maps (N, H, W) float, masks (N, H, W) bool. PRO = mean over ground-truth regions of the fraction
    of the region at or above the threshold; FPR over all normal pixels.
    """
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    regions = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    structure = np.ones((3, 3), dtype=int)
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=structure)
        regions[i] = np.where(labelled > 0, labelled + n_regions, 0)
        n_regions += count
    if n_regions == 0 or masks.all():
        raise ValueError("PRO needs at least one anomalous region and some normal pixels")
    flat_scores = maps.ravel()
    flat_regions = regions.ravel()
    region_sizes = np.bincount(flat_regions, minlength=n_regions + 1).astype(np.float64)
    # Each anomalous pixel adds 1 / (|its region| * n_regions) to PRO; each normal pixel 1 / n_normal to FPR.
    pro_step = np.where(flat_regions > 0, 1.0 / (region_sizes[flat_regions] * n_regions), 0.0)
    n_normal = float((flat_regions == 0).sum())
    fpr_step = (flat_regions == 0) / n_normal
    order = np.argsort(-flat_scores, kind="stable")
    sorted_scores = flat_scores[order]
    fpr = np.cumsum(fpr_step[order])
    pro = np.cumsum(pro_step[order])
    last_of_value = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]  # all ties enter together
    return np.r_[0.0, fpr[last_of_value]], np.r_[0.0, pro[last_of_value]]


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
    """maps (N, H, W) anomaly maps, masks (N, H, W) bool ground truth -> {pauroc, pro, f1_max}."""
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks).astype(bool)
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ; resize both to one size first")
    flat_masks = masks.ravel()
    _check_binary(flat_masks, "pixel metrics")
    fpr, pro = pro_curve(maps, masks)
    return {
        "pauroc": float(roc_auc_score(flat_masks, maps.ravel())),
        "pro": area_up_to(fpr, pro, PRO_FPR_LIMIT) / PRO_FPR_LIMIT,
        "f1_max": f1_max(flat_masks, maps.ravel()),
    }
