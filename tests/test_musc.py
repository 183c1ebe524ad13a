"""MuSc maths against plain loops written from the definition, the N < 5 guard, and the batch path."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from winclip.musc import (LNAMD_IMAGES_PER_CALL, MIN_IMAGES, BlockTokens, MuscConfig, image_scores, lnamd, musc_maps,
                          mutual_scores, rescore, score_batch)


def test_lnamd_against_a_loop():
    torch.manual_seed(0)
    tokens = torch.randn(2, 16, 5)  # (N, P, D) on a 4x4 grid
    out = lnamd(tokens, (4, 4), 3)
    for n in range(2):
        m = tokens[n].reshape(4, 4, 5)
        m = (m - m.mean()) / torch.sqrt(m.var(unbiased=False) + 1e-5)  # LayerNorm over the whole map
        for y in range(4):
            for x in range(4):
                acc = torch.zeros(5)
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        if 0 <= y + dy < 4 and 0 <= x + dx < 4:
                            acc += m[y + dy, x + dx]
                expected = F.normalize(acc / 9, dim=0)  # zero padding counts in the mean
                assert_close(out[n, y * 4 + x], expected, atol=1e-5, rtol=1e-5)


def test_mutual_scores_against_ordered_pairs():
    torch.manual_seed(1)
    z = F.normalize(torch.randn(7, 9, 4), dim=-1)
    got = mutual_scores(z, 0.3, pairs_per_call=2)  # chunked: several calls per image
    k = int(6 * 0.3)
    for i in range(7):
        per_image = torch.stack([torch.cdist(z[i], z[j]).amin(dim=1) for j in range(7) if j != i], dim=1)  # (P, 6)
        assert_close(got[i], per_image.sort(dim=1).values[:, :k].mean(dim=1), atol=1e-6, rtol=1e-6)


def test_fewer_than_five_images_is_a_clear_error():
    z = F.normalize(torch.randn(MIN_IMAGES - 1, 4, 3), dim=-1)
    with pytest.raises(ValueError, match="at least 5 images"):
        mutual_scores(z)


def test_rescore_against_a_loop():
    torch.manual_seed(2)
    scores, emb = torch.rand(6), torch.randn(6, 8)
    got = rescore(scores, emb, (1, 2, 3))
    norm = (scores - scores.min()) / (scores.max() - scores.min())
    sim = F.normalize(emb, dim=-1) @ F.normalize(emb, dim=-1).T
    expected = torch.zeros(6, dtype=torch.float64)
    for k in (1, 2, 3):
        for i in range(6):
            top = sim[i].argsort(descending=True)[:k]
            expected[i] += float((sim[i, top] * norm[top]).sum() / sim[i, top].sum()) / 3
    assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert_close(rescore(scores, emb, (1,)), norm.double(), atol=1e-7, rtol=1e-7)  # k = 1: the image itself


def test_an_odd_patch_scores_highest_and_maps_have_the_grid_shape():
    torch.manual_seed(3)
    base = torch.randn(1, 16, 8).expand(8, 16, 8) + 0.01 * torch.randn(8, 16, 8)
    tokens = base.clone()
    tokens[5, 6] += 4.0  # one defect patch in image 5
    layers = {0: tokens, 1: tokens * 2}
    cfg = MuscConfig(layers=(0, 1), radii=(1,))
    out = score_batch(layers, torch.randn(8, 4), (4, 4), (64, 64), cfg)
    assert out.maps.shape == (8, 4, 4) and int(out.raw_scores.argmax()) == 5
    assert int(out.maps[5].flatten().argmax()) == 6
    cfg = MuscConfig(layers=(0, 1), radii=(1, 3))
    assert_close(image_scores(out.maps, (4, 4)), out.maps.flatten(1).amax(1).double())  # same size: the max
    assert musc_maps(layers, (4, 4), cfg).shape == (8, 4, 4)


def test_maps_with_shared_buffers_equal_each_block_and_degree_scored_alone():
    """musc_maps reuses one feature and one minima buffer for every (block, r), LNAMD a few images at a time."""
    torch.manual_seed(4)
    n = LNAMD_IMAGES_PER_CALL + 3  # two LNAMD calls, the second partial
    layers = {0: torch.randn(n, 16, 6), 3: torch.randn(n, 16, 6) * 3}
    cfg = MuscConfig(layers=(0, 3), radii=(1, 3), pairs_per_call=5)
    expected = torch.stack([torch.stack([mutual_scores(lnamd(layers[b], (4, 4), r), 0.3, 5) for b in (0, 3)]).mean(0)
                            for r in (1, 3)]).mean(0).reshape(n, 4, 4)
    assert_close(musc_maps(layers, (4, 4), cfg), expected, atol=1e-6, rtol=1e-6)


def test_block_tokens_fill_one_store_batch_by_batch():
    store = BlockTokens((1, 2), capacity=5)
    parts = [({1: torch.randn(2, 4, 3), 2: torch.randn(2, 4, 3)}, torch.randn(2, 6)) for _ in range(2)]
    for tokens, emb in parts:
        store.add(tokens, emb)
    tokens, emb = store.tensors()  # 4 of 5 slots used (an unreadable image leaves one empty)
    assert_close(tokens[2], torch.cat([parts[0][0][2], parts[1][0][2]]))
    assert_close(emb, torch.cat([parts[0][1], parts[1][1]]))
    with pytest.raises(ValueError, match="more than the 5 images"):
        store.add(*parts[0])
    with pytest.raises(ValueError, match="no images"):
        BlockTokens((1,), 3).tensors()
