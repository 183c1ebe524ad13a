import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from winclip.metrics import area_up_to, aurocs, f1_max, image_metrics, pixel_metrics, pro_curve


def slow_pro(maps, masks, limit=0.3):
    """PRO from the definition: for every threshold, binarise, then FPR and the mean region overlap."""
    regions = []
    for i in range(len(masks)):
        labelled, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        binary = maps >= t
        fpr = (binary & normal).sum() / normal.sum()
        pro = np.mean([(binary[i] & region).sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    fprs, pros = map(np.array, zip(*points))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_case(seed, n=3, size=12, levels=None):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        for _ in range(rng.integers(0, 3)):
            y, x = rng.integers(0, size - 3, 2)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    masks[0, 1:3, 1:3] = True  # at least one region
    maps = rng.random((n, size, size)) + masks * rng.random() * 0.8
    if levels:
        maps = np.round(maps * levels) / levels  # many ties
    return maps, masks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 7])
def test_pro_matches_definition(seed, levels):
    maps, masks = random_case(seed, levels=levels)
    assert abs(pixel_metrics(maps, masks)["pro"] - slow_pro(maps, masks)) < 1e-4


@pytest.mark.parametrize("seed", range(4))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = rng.random(60) + labels * 0.3
    m = image_metrics(scores, labels)
    assert abs(m["auroc"] - roc_auc_score(labels, scores)) < 1e-12
    assert abs(m["aupr"] - average_precision_score(labels, scores)) < 1e-12
    best = max(2 * ((scores >= t) & (labels == 1)).sum() / ((scores >= t).sum() + (labels == 1).sum())
               for t in np.unique(scores))
    assert abs(m["f1_max"] - best) < 1e-9


def test_aurocs_of_many_rows_match_sklearn_with_ties():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 50)
    labels[:2] = [0, 1]
    scores = np.round(rng.random((30, 50)) + 0.2 * labels, 1).astype(np.float32)  # many ties
    got = aurocs(scores, labels)
    assert got.shape == (30,)
    assert np.abs(got - [roc_auc_score(labels, row) for row in scores]).max() < 1e-12
    with pytest.raises(ValueError, match="both normal and anomalous"):
        aurocs(scores, np.zeros(50))
    with pytest.raises(ValueError, match="50 columns"):
        aurocs(scores[0], labels)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 7, 2])
def test_pixel_auroc_and_f1_match_sklearn_with_ties_and_negative_scores(seed, levels):
    maps, masks = random_case(seed, levels=levels)
    maps = (maps - 0.5).astype(np.float32)  # negative, positive, and with levels both zeros below
    if levels:
        maps[0, 0, :4] = [-0.0, 0.0, -0.0, 0.0]  # equal scores, different bits: one threshold
    m = pixel_metrics(maps, masks)
    assert abs(m["pauroc"] - roc_auc_score(masks.ravel(), maps.ravel())) < 1e-12
    assert abs(m["f1_max"] - f1_max(masks.ravel(), maps.ravel())) < 1e-12  # scikit-learn's precision_recall_curve
    assert abs(m["pro"] - slow_pro(maps, masks)) < 1e-4


def test_nan_in_a_map_is_named():
    maps, masks = random_case(2)
    maps[1, 3, 3] = np.nan
    with pytest.raises(ValueError, match="contain NaN"):
        pixel_metrics(maps, masks)


def test_perfect_and_inverted_maps():
    _, masks = random_case(1)
    perfect = pixel_metrics(masks.astype(float), masks)
    assert perfect["pauroc"] == pytest.approx(1.0) and perfect["pro"] == pytest.approx(1.0)
    assert perfect["f1_max"] == pytest.approx(1.0)
    inverted = pixel_metrics(1.0 - masks, masks)
    assert inverted["pauroc"] == pytest.approx(0.0) and inverted["pro"] == pytest.approx(0.0)
    labels = np.array([0, 0, 1, 1])
    assert image_metrics([0.1, 0.2, 0.8, 0.9], labels)["auroc"] == 1.0
    assert image_metrics([0.9, 0.8, 0.2, 0.1], labels)["auroc"] == 0.0


def test_pro_curve_monotone_and_area_interpolates():
    maps, masks = random_case(5)
    fpr, pro = pro_curve(maps, masks)
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == pytest.approx(1) and pro[-1] == pytest.approx(1)
    assert (np.diff(fpr) >= 0).all() and (np.diff(pro) >= 0).all()
    assert area_up_to(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.3) == pytest.approx(0.045)


def test_bad_metric_input():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        image_metrics([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="differ"):
        pixel_metrics(np.zeros((1, 4, 4)), np.zeros((1, 5, 5)))
    with pytest.raises(ValueError, match="both"):
        pixel_metrics(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))


@pytest.mark.slow
def test_full_resolution_category_fits_in_memory():
    rng = np.random.default_rng(0)
    maps = rng.random((40, 512, 512), dtype=np.float32)
    masks = np.zeros((40, 512, 512), bool)
    masks[::2, 100:180, 200:260] = True
    m = pixel_metrics(maps, masks)  # 10.5 M pixels
    assert 0.45 < m["pauroc"] < 0.55


def test_f1_optimal_threshold_gives_f1_max():
    from winclip.metrics import f1_optimal_threshold

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 50)
    scores = rng.random(50) + 0.3 * labels
    t = f1_optimal_threshold(labels, scores)
    predicted = scores >= t
    tp = int((predicted & (labels == 1)).sum())
    f1 = 2 * tp / (predicted.sum() + labels.sum())
    assert f1 == pytest.approx(f1_max(labels, scores), abs=1e-12)
