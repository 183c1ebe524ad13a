import pytest
import torch
from torch.testing import assert_close

from winclip.windows import aggregate_windows, combine_scales, coverage, window_indices, window_starts


def test_window_indices_golden():
    expected = torch.tensor([[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]])
    assert torch.equal(window_indices((3, 3), 2), expected)


@pytest.mark.parametrize("k, n", [(2, 196), (3, 169), (15, 1)])
def test_window_counts_on_15x15(k, n):
    idx = window_indices((15, 15), k)
    assert idx.shape == (n, k * k)
    assert len({tuple(r) for r in idx.tolist()}) == n


def test_stride_keeps_every_patch_covered():
    assert window_starts(5, 2, 2) == [0, 2, 3]
    idx = window_indices((5, 7), 2, stride=2)
    assert coverage((5, 7), idx).any(dim=1).all()


def test_window_larger_than_grid_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        window_indices((3, 3), 4)


def test_harmonic_aggregation_golden():
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25]])
    out = aggregate_windows(scores, (3, 3), window_indices((3, 3), 2))
    expected = torch.tensor([[[1.0, 0.857142857, 0.75], [0.666666667, 0.48, 0.375], [0.5, 0.333333333, 0.25]]])
    assert_close(out, expected)


def _loop_aggregate(scores, grid, k, stride, mode):
    gh, gw = grid
    rows, cols = window_starts(gh, k, stride), window_starts(gw, k, stride)
    out = torch.zeros(scores.shape[0], gh, gw, dtype=torch.float64)
    for b in range(scores.shape[0]):
        for i in range(gh):
            for j in range(gw):
                covering = []
                n = 0
                for r in rows:
                    for c in cols:
                        if r <= i < r + k and c <= j < c + k:
                            covering.append(float(scores[b, n]))
                        n += 1
                if mode == "harmonic":
                    out[b, i, j] = len(covering) / sum(1.0 / s for s in covering)
                else:
                    out[b, i, j] = sum(covering) / len(covering)
    return out


@pytest.mark.parametrize("grid, k, stride", [((6, 6), 2, 1), ((5, 7), 3, 1), ((7, 5), 2, 2), ((8, 8), 3, 2)])
@pytest.mark.parametrize("mode", ["harmonic", "arithmetic"])
def test_vectorised_equals_loop(grid, k, stride, mode):
    idx = window_indices(grid, k, stride)
    scores = torch.rand(2, idx.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.01
    assert_close(aggregate_windows(scores, grid, idx, mode), _loop_aggregate(scores, grid, k, stride, mode))


def test_zero_window_score_zeroes_its_patches_only():
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.5]])
    out = aggregate_windows(scores, (3, 3), window_indices((3, 3), 2))
    assert torch.isfinite(out).all()
    assert out[0, 0, 0] == 0 and out[0, 1, 1] == 0  # both covered by window 0
    assert_close(out[0, 2, 2], torch.tensor(0.5))


def test_combine_scales():
    a = torch.full((1, 2, 2), 0.5)
    b = torch.full((1, 2, 2), 0.25)
    assert_close(combine_scales([a, b]), torch.full((1, 2, 2), 1 / 3))
    assert_close(combine_scales([a, b], "arithmetic"), torch.full((1, 2, 2), 0.375))
    assert combine_scales([a, torch.zeros(1, 2, 2)]).eq(0).all()
