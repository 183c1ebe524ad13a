import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from winclip import WinClipConfig
from winclip.synthetic import make_part

from conftest import tiny_detector


def test_output_shapes_ranges_and_components(tiny, pixels):
    out = tiny.forward(pixels)
    assert out.image_scores.shape == (3,) and out.grid_maps.shape == (3, 6, 6)
    assert set(out.zero_shot_components) == {"image", "window_2", "window_3"}
    assert out.few_shot_maps is None and out.few_shot_components == {}
    for t in (out.image_scores, out.grid_maps, *out.zero_shot_components.values()):
        assert torch.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()
    assert_close(out.image_scores, out.zero_shot_scores)


def test_zero_shot_map_is_harmonic_mean_of_scales(tiny, pixels):
    out = tiny.forward(pixels)
    parts = torch.stack(list(out.zero_shot_components.values()))
    assert_close(out.zero_shot_maps, 3 / (1 / parts).sum(0))
    assert (out.grid_maps.amax((1, 2)) - out.grid_maps.amin((1, 2)) > 0).all()  # not constant per image


def test_deterministic(pixels):
    a, b = tiny_detector(), tiny_detector()
    assert torch.equal(a.forward(pixels).grid_maps, b.forward(pixels).grid_maps)
    assert torch.equal(a.forward(pixels).image_scores, a.forward(pixels).image_scores)


def test_predict_map_has_the_image_size(tiny):
    image = make_part(3, 130, "spot").image.resize((130, 77))
    pred = tiny.predict(image)
    assert pred.anomaly_map.shape == (77, 130) and pred.anomaly_map.dtype == np.float32
    assert 0.0 <= pred.score <= 1.0 and np.isfinite(pred.anomaly_map).all()
    assert pred.grid_map.shape == (6, 6) and pred.shots == 0 and pred.few_shot_map is None
    assert all(m.shape == (77, 130) for m in pred.components.values())


def test_preprocess_squashes_and_normalises(tiny):
    image = Image.new("RGB", (300, 100), (255, 255, 255))
    pixels = tiny.preprocess(image)
    assert pixels.shape == (3, 96, 96)
    assert_close(pixels[:, 0, 0], ((1 - tiny.mean) / tiny.std).flatten())


def test_query_identical_to_reference_gives_zero_few_shot_map(fresh, pixels):
    fresh.set_references(pixels[:1])
    out = fresh.forward(pixels[:1])
    assert_close(out.few_shot_maps, torch.zeros(1, 6, 6), atol=1e-6, rtol=0)
    for part in out.few_shot_components.values():
        assert_close(part, torch.zeros(1, 6, 6), atol=1e-6, rtol=0)


def test_changed_region_raises_only_windows_touching_it(fresh, pixels):
    reference = pixels[:1]
    query = reference.clone()
    query[:, :, 0:16, 80:96] = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))  # patch (0, 5)
    fresh.set_references(reference)
    feats = fresh.encode(query)
    from winclip.association import associate

    for k, emb in feats.window_embeddings.items():
        scores = associate(emb, fresh.references.windows[k])[0]  # (N,)
        touches = (fresh.windows[k] == 5).any(dim=1)
        assert (scores[touches] > 1e-4).all(), f"k={k}: touched windows should rise"
        assert_close(scores[~touches], torch.zeros(int((~touches).sum())), atol=1e-6, rtol=0)


def test_few_shot_fusion_follows_eqs_5_and_6(fresh, pixels):
    fresh.set_references(pixels[1:])
    out = fresh.forward(pixels[:1])
    fs = torch.stack([out.few_shot_components[k] for k in ("patch", "window_2", "window_3")]).mean(0)
    assert_close(out.few_shot_maps, fs)
    assert_close(out.grid_maps, (out.zero_shot_maps + fs) / 2)
    assert_close(out.image_scores, (out.zero_shot_scores + fs.amax((1, 2))) / 2)


def test_references_cached_and_cleared(fresh, pixels):
    first = fresh.set_references(pixels[:2])
    assert first.shots == 2 and first.patch.shape == (2 * 36, 64) and first.windows[2].shape == (2 * 25, 32)
    assert fresh.set_references(pixels[:2]) is first
    assert fresh.set_references(pixels[:1]) is not first
    assert fresh.set_references([]) is None and fresh.references is None


def test_references_from_pil_images_of_mixed_sizes(fresh):
    refs = [make_part(0, 120).image, make_part(1, 200).image.resize((200, 150))]
    memory = fresh.set_references(refs)
    assert memory.shots == 2
    pred = fresh.predict(make_part(2, 120, "scratch").image)
    assert pred.shots == 2 and pred.few_shot_map is not None and 0 <= pred.score <= 1


def test_prototypes_cached_per_prompt_set(fresh, monkeypatch):
    calls = []
    original = fresh.encode_prompts
    monkeypatch.setattr(fresh, "encode_prompts", lambda prompts: calls.append(len(prompts)) or original(prompts))
    fresh.set_prompts("bottle", ["crack"])
    fresh.set_prompts("bottle", ["crack"])
    assert calls == [154 + 110]  # normal and anomalous in one call (one prefix tree)
    fresh.set_prompts("cable")
    assert len(calls) == 2


def test_prompts_partly_evicted_from_the_cache_are_encoded_again(fresh, monkeypatch):
    """The per-prompt cache is least-recently-used: a set whose older prompts are still cached while its others
    were evicted (a server after ~30 object names) gets every embedding, the same as when first encoded."""
    import winclip.detector as detector_module

    monkeypatch.setattr(detector_module, "PROMPT_CACHE_SIZE", 4)
    first = fresh.encode_prompts(["a photo of a bottle.", "a photo of a cable."])
    fresh.encode_prompts(["a photo of a screw.", "a photo of a nut."])  # the cache is full
    again = fresh.encode_prompts(["a photo of a bottle.", "a photo of a hole."])  # the oldest cached, one new
    assert torch.equal(again[0], first[0]) and len(fresh._prompt_cache) == 4
    assert "a photo of a bottle." in fresh._prompt_cache and "a photo of a cable." not in fresh._prompt_cache


def test_prompts_change_scores(fresh, pixels):
    fresh.set_prompts("bottle")
    a = fresh.forward(pixels).image_scores
    fresh.set_prompts("bottle", ["crack", "hole"])
    b = fresh.forward(pixels).image_scores
    assert not torch.equal(a, b)


def test_score_reuses_features_with_other_prototypes(fresh, pixels):
    feats = fresh.encode(pixels)
    fresh.set_prompts("screw")
    assert_close(fresh.score(feats).grid_maps, fresh.forward(pixels).grid_maps)


def test_too_long_prompt_rejected(fresh):
    with pytest.raises(ValueError, match="tokens"):
        fresh.set_prompts("x1y2z3 " * 28)  # under 200 characters, ~170 tokens


def test_wrong_pixel_shape_rejected(tiny):
    with pytest.raises(ValueError, match="preprocess"):
        tiny.forward(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="PIL"):
        tiny.predict(np.zeros((10, 10, 3)))


@pytest.mark.parametrize(
    "config, parts",
    [
        (WinClipConfig(scoring="one_class"), {"image", "window_2", "window_3"}),
        (WinClipConfig(state_ensemble=False, template_ensemble=False), {"image", "window_2", "window_3"}),
        (WinClipConfig(window_scales=(2,), image_scale=False), {"window_2"}),
        (WinClipConfig(window_scales=(), image_scale=True), {"image"}),
        (WinClipConfig(aggregation="arithmetic", window_scales=(1, 4)), {"image", "window_1", "window_4"}),
        (WinClipConfig(prototype="mean_normalized", window_stride=2), {"image", "window_2", "window_3"}),
    ],
)
def test_ablation_switches(config, parts, pixels):
    det = tiny_detector(config)
    out = det.forward(pixels)
    assert set(out.zero_shot_components) == parts
    assert torch.isfinite(out.grid_maps).all() and (out.grid_maps >= 0).all() and (out.grid_maps <= 1).all()


def test_baseline_prompts_when_ensembles_off():
    det = tiny_detector(WinClipConfig(state_ensemble=False, template_ensemble=False))
    assert det.prompts.normal == ("a photo of a normal object.",)
    assert det.prompts.anomalous == ("a photo of a anomalous object.",)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 0}, {"scoring": "x"}, {"window_scales": (0,)}, {"window_scales": (), "image_scale": False},
     {"aggregation": "geometric"}, {"window_stride": 0}, {"baseline_template": "no slot"}],
)
def test_bad_config_rejected(kwargs):
    with pytest.raises(ValueError):
        WinClipConfig(**kwargs)


def test_window_scale_larger_than_grid_rejected():
    with pytest.raises(ValueError, match="grid"):
        tiny_detector(WinClipConfig(window_scales=(7,)))


def test_leave_one_out_reuses_memories(fresh, pixels):
    memory = fresh.set_references(pixels)
    loo = fresh.leave_one_out_scores()
    assert len(loo) == 3
    for i in range(3):
        others = torch.cat([pixels[:i], pixels[i + 1 :]])
        direct = fresh.score(fresh.encode(pixels[i : i + 1]), references=fresh.memory_for(others))
        assert abs(loo[i] - float(direct.image_scores[0])) < 1e-5
    assert fresh.references is memory  # state untouched
    with pytest.raises(ValueError, match="at least 2"):
        fresh.leave_one_out_scores(fresh.memory_for(pixels[:1]))


def test_with_config_shares_model_and_prompts(fresh, pixels):
    fresh.set_prompts("bottle", ["crack"])
    other = fresh.with_config(WinClipConfig(window_scales=(2,), image_scale=False))
    assert other.backbone is fresh.backbone and other.prompts == fresh.prompts
    assert set(other.forward(pixels).zero_shot_components) == {"window_2"}
    assert set(fresh.forward(pixels).zero_shot_components) == {"image", "window_2", "window_3"}
    direct = tiny_detector(WinClipConfig(window_scales=(2,), image_scale=False))
    direct.set_prompts("bottle", ["crack"])
    assert_close(other.forward(pixels).grid_maps, direct.forward(pixels).grid_maps)


def test_score_with_explicit_references_leaves_state(fresh, pixels):
    memory = fresh.memory_for(pixels[1:])
    feats = fresh.encode(pixels[:1])
    out = fresh.score(feats, references=memory)
    assert out.shots == 2 and fresh.references is None
    assert fresh.score(feats).shots == 0
