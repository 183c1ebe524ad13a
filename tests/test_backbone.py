"""The adapter invariants that catch open_clip layout changes (e.g. the batch-first trap)."""

import pytest
import torch
from torch.testing import assert_close

from winclip.backbone import ClipBackbone, check_layout
from winclip.windows import window_indices

from conftest import tiny_detector


def test_window_of_all_patches_reproduces_encode_image(tiny, pixels):
    bb = tiny.backbone
    full = bb.encode_full(pixels)
    everything = torch.arange(bb.n_patches)[None]  # one window holding every patch, in order
    windows = bb.encode_windows(full.input_tokens, everything)
    with torch.inference_mode():
        reference = bb.model.encode_image(pixels)
    assert_close(windows[:, 0], reference)
    assert_close(full.image_embeddings, reference)


def test_patch_tokens_are_final_layer_after_ln_post(tiny, pixels):
    bb = tiny.backbone
    bb.visual.output_tokens = True
    try:
        with torch.inference_mode():
            _, tokens = bb.visual(pixels)
    finally:
        bb.visual.output_tokens = False
    full = bb.encode_full(pixels)
    assert full.patch_tokens.shape == (3, 36, 64)  # unprojected width
    assert_close(full.patch_tokens, tokens)


def test_different_windows_differ(tiny, pixels):
    bb = tiny.backbone
    full = bb.encode_full(pixels)
    emb = bb.encode_windows(full.input_tokens, window_indices(bb.grid, 2))  # (B, 25, E)
    flat = emb.reshape(-1, emb.shape[-1])
    distances = torch.cdist(flat, flat) + torch.eye(flat.shape[0]) * 1e9
    assert distances.min() > 1e-4  # no two windows (nor images) collapse to one embedding


def test_batch_equals_each_image_alone(tiny, pixels):
    bb = tiny.backbone
    idx = window_indices(bb.grid, 3)
    batched = bb.encode_windows(bb.encode_full(pixels).input_tokens, idx)
    for b in range(pixels.shape[0]):
        alone = bb.encode_windows(bb.encode_full(pixels[b : b + 1]).input_tokens, idx)
        assert_close(batched[b : b + 1], alone, atol=1e-5, rtol=1e-5)


def test_chunked_windows_equal_one_call(tiny, pixels):
    bb = tiny.backbone
    full = bb.encode_full(pixels)
    idx = window_indices(bb.grid, 2)
    assert_close(bb.encode_windows(full.input_tokens, idx, max_tokens=7 * 5), bb.encode_windows(full.input_tokens, idx),
                 atol=1e-5, rtol=1e-5)


def test_window_embedding_depends_only_on_its_patches(tiny, pixels):
    """Changing pixels outside a window leaves its embedding unchanged (masked tokens are dropped)."""
    bb = tiny.backbone
    changed = pixels.clone()
    changed[:, :, 48:, 48:] = torch.randn_like(changed[:, :, 48:, 48:])  # bottom-right 3x3 patches
    idx = torch.tensor([[0, 1, 6, 7]])  # top-left 2x2 window
    a = bb.encode_windows(bb.encode_full(pixels).input_tokens, idx)
    b = bb.encode_windows(bb.encode_full(changed).input_tokens, idx)
    assert_close(a, b)


def test_layout_check_fails_loudly_on_a_non_vit():
    class NotClip(torch.nn.Module):
        visual = torch.nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match="VisionTransformer"):
        check_layout(NotClip())
    with pytest.raises(RuntimeError, match="VisionTransformer"):
        ClipBackbone(NotClip())


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sdpa_min_tokens", [None, 2], ids=["default", "sdpa-for-all"])
@pytest.mark.parametrize("batch", [1, 3])
def test_packed_path_equals_reference_path(pixels, batch, sdpa_min_tokens, device, monkeypatch):
    """Packed fast path = straightforward path (image, patch tokens, windows, MuSc's block tokens), per device."""
    from winclip.kernels import packed

    if sdpa_min_tokens is not None:
        monkeypatch.setattr(packed, "SDPA_MIN_TOKENS", sdpa_min_tokens)
    bb = tiny_detector(device=device).backbone
    assert bb.packable
    windows = {k: window_indices(bb.grid, k, s) for k, s in ((1, 1), (2, 1), (3, 2), (6, 1))}
    ref_full, ref_windows = bb.encode_all(pixels[:batch], windows, packed=False, layers=(0, 1))
    full, packed_windows = bb.encode_all(pixels[:batch], windows, packed=True, layers=(0, 1))
    assert_close(full.image_embeddings, ref_full.image_embeddings, atol=1e-5, rtol=1e-5)
    assert_close(full.patch_tokens, ref_full.patch_tokens, atol=1e-5, rtol=1e-5)
    for k in windows:
        assert_close(packed_windows[k], ref_windows[k], atol=1e-5, rtol=1e-5)
    for layer in (0, 1):
        assert_close(full.layer_tokens[layer], ref_full.layer_tokens[layer], atol=1e-5, rtol=1e-5)


def test_packed_path_chunks_by_images(tiny, pixels):
    bb = tiny.backbone
    windows = {2: window_indices(bb.grid, 2)}
    one_call = bb.encode_all(pixels, windows)[1][2]
    chunked = bb.encode_all(pixels, windows, max_tokens=1)[1][2]  # one image per call
    assert_close(chunked, one_call, atol=1e-5, rtol=1e-5)


def test_unknown_block_type_falls_back_to_reference_path(fresh, pixels):
    from winclip.kernels import packable

    blocks = fresh.backbone.visual.transformer.resblocks
    expected = fresh.forward(pixels).grid_maps
    original = blocks[0]
    blocks[0] = type("Wrapped", (torch.nn.Module,), {"forward": lambda self, x, attn_mask=None: original(x)})()
    try:
        assert not packable(fresh.backbone.visual)
        fresh.backbone.packable = packable(fresh.backbone.visual)
        assert_close(fresh.forward(pixels).grid_maps, expected, atol=1e-5, rtol=1e-5)
    finally:
        blocks[0] = original
        fresh.backbone.packable = True


def test_truncated_text_encoder_equals_open_clip(tiny):
    bb = tiny.backbone
    assert bb.text_truncatable
    prompts = ["a photo of a bottle.", "a", "a jpeg corrupted photo of the flawless bottle for anomaly detection."]
    ids = tiny.tokenizer(prompts)
    with torch.inference_mode():
        expected = bb.model.encode_text(ids)
    assert_close(bb.encode_text(ids), expected, atol=1e-5, rtol=1e-5)


def test_prefix_tree_text_encoder_equals_open_clip(tiny):
    """The default prompts (templates x states, a defect word) as a prefix tree: every embedding equals
    open_clip's own encode_text of that prompt padded to 77, in the caller's order, with any tree size
    (a cap of 12 tokens splits it into many calls); the tokens run are the distinct beginnings only."""
    from winclip.backbone import TEXT_TREE_NODES, PrefixTree, tree_groups
    from winclip.prompting import build_ensemble

    bb = tiny.backbone
    ensemble = build_ensemble("washer", ("crack", "hole"))
    prompts = [*ensemble.anomalous, *ensemble.normal, "a", ensemble.normal[0]]  # a 1-word prompt, a repeat
    ids = tiny.tokenizer(prompts)
    with torch.inference_mode():
        expected = bb.model.encode_text(ids)
    rows = [row[: int(end) + 1] for row, end in zip(ids.tolist(), ids.argmax(-1))]
    seen = []
    hook = bb.model.transformer.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        for max_nodes in (4096, TEXT_TREE_NODES, 12):
            seen.clear()
            assert_close(bb.encode_text(ids, max_nodes=max_nodes), expected, atol=1e-5, rtol=1e-5)
            assert max(seen) <= max(max_nodes, max(map(len, rows))), (max_nodes, seen)  # a longer prompt alone
            if max_nodes == 4096:
                one_call = list(seen)
    finally:
        hook.remove()
    distinct = len({tuple(row[:k]) for row in rows for k in range(1, len(row) + 1)})
    assert one_call == [distinct] and distinct < 0.4 * len(prompts) * max(map(len, rows))  # vs padding to the longest
    # the tree: a node attends to itself and its ancestors, at its position in the prompt
    tree = PrefixTree.of([[5, 6, 7], [5, 6, 8], [5, 9]])
    assert tree.tokens.tolist() == [5, 6, 7, 8, 9] and tree.positions.tolist() == [0, 1, 2, 2, 1]
    assert tree.ends.tolist() == [2, 3, 4]
    assert tree.allowed[3].tolist() == [True, True, False, True, False]
    assert [sorted(g) for g in tree_groups([[5, 6, 7], [9, 1], [5, 6, 8]], max_nodes=4)] == [[0, 2], [1]]


def test_fused_bf16_path_matches_aten_bf16_path(pixels):
    """bf16 on CPU runs the linears as oneDNN ops with bias/GELU/residual fused; same result as aten's."""
    bb = tiny_detector(precision="bf16").backbone
    assert bb.fused == (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    windows = {k: window_indices(bb.grid, k) for k in (2, 3)}
    fused_full, fused_windows = bb.encode_all(pixels, windows)
    bb.fused = False
    plain_full, plain_windows = bb.encode_all(pixels, windows)
    assert_close(fused_full.image_embeddings, plain_full.image_embeddings, atol=0.03, rtol=0.03)
    assert_close(fused_full.patch_tokens, plain_full.patch_tokens, atol=0.05, rtol=0.05)
    for k in windows:
        assert_close(fused_windows[k], plain_windows[k], atol=0.03, rtol=0.03)
        cosine = torch.nn.functional.cosine_similarity(fused_windows[k], plain_windows[k], dim=-1)
        assert cosine.min() > 0.999


def test_fusable_only_for_bf16_exact_gelu_without_layer_scale(tiny):
    from winclip.kernels import fusable

    visual = tiny.backbone.visual
    assert not fusable(visual, torch.float32)  # fp32 keeps aten's kernels: the reference numbers
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("this torch build or CPU has no oneDNN bf16")
    assert fusable(visual, torch.bfloat16)
    blk = visual.transformer.resblocks[0]
    original_act, original_ls = blk.mlp.gelu, blk.ls_2
    try:
        blk.mlp.gelu = torch.nn.GELU(approximate="tanh")
        assert not fusable(visual, torch.bfloat16)
        blk.mlp.gelu = original_act
        blk.ls_2 = torch.nn.Linear(1, 1)  # stands in for a LayerScale
        assert not fusable(visual, torch.bfloat16)
    finally:
        blk.mlp.gelu, blk.ls_2 = original_act, original_ls


@pytest.mark.parametrize("budget", [40, 100, 4096])
def test_plain_path_keeps_the_token_budget(pixels, budget):
    """The plain (reference) path never puts more than max_tokens_per_call tokens through one transformer call:
    full images and window sequences both count tokens, not images or windows."""
    from winclip import WinClipConfig

    det = tiny_detector(WinClipConfig(packed=False, max_tokens_per_call=budget))
    calls = []
    first = det.backbone.visual.transformer.resblocks[0]
    hook = first.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0] * args[0].shape[1]))
    try:
        feats = det.encode(pixels)  # 3 images: 3 x 37 tokens, 3 x 25 windows of 5 tokens, 3 x 16 of 10
    finally:
        hook.remove()
    assert max(calls) <= budget and sum(calls) == 3 * 37 + 3 * 25 * 5 + 3 * 16 * 10
    reference = tiny_detector(WinClipConfig(packed=False)).encode(pixels)
    assert_close(feats.window_embeddings[3], reference.window_embeddings[3], atol=1e-5, rtol=1e-5)
