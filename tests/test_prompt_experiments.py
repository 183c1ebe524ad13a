"""Prompt experiments: set comparison equals evaluate, per-prompt AUROC by direct computation, bad sets, CLI."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from winclip import cli
from winclip.datasets import load_category
from winclip.evaluation import EvalSettings, evaluate_category
from winclip.inputs import collect_inputs
from winclip.metrics import image_metrics
from winclip.prompt_experiments import (PromptSet, compare_sets, defect_word_contributions, encode_labelled,
                                        paper_default, per_prompt_auroc, shipped_sets, suggest)
from winclip.synthetic import make_part

from conftest import TINY_CONFIG, tiny_detector
from corpus import save_part


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled") / "washer"
    for i in range(5):
        save_part(make_part(i, 128), root / "good" / f"{i}.png")
    for defect, seeds in (("crack", (60, 61, 62)), ("spot", (70, 71))):
        for s in seeds:
            save_part(make_part(s, 128, defect), root / defect / f"{s}.png", root / "masks" / defect / f"{s}.png")
    return root


@pytest.fixture(scope="module")
def encoded(folder, tmp_path_factory):
    detector = tiny_detector()
    return detector, encode_labelled(detector, collect_inputs([folder], tmp_path_factory.mktemp("w")), 3)


def test_default_set_equals_evaluate_zero_shot(folder, encoded):
    detector, data = encoded
    (result,) = compare_sets(detector, data, [paper_default()], "washer")
    evaluated = evaluate_category(tiny_detector(), load_category("folder", folder, "washer"), EvalSettings(shots=(0,)),
                                  progress=lambda _: None)["shots"]["0"]["summary"]
    for metric in ("auroc", "aupr", "f1_max"):
        assert result["zero_shot"][metric] == pytest.approx(evaluated[metric]["mean"], abs=1e-6)
    assert result["pixel"]["pauroc"] == pytest.approx(evaluated["pauroc"]["mean"], abs=1e-6)
    assert result["pixel"]["pro"] == pytest.approx(evaluated["pro"]["mean"], abs=1e-6)


def test_per_prompt_auroc_against_a_direct_computation(encoded):
    detector, data = encoded
    rows = per_prompt_auroc(detector, data, paper_default(), "washer")
    assert len(rows) == (7 + 4) * 22
    ensemble = paper_default().ensemble("washer")
    image = F.normalize(data.features.image_embeddings, dim=-1)
    normal_proto, anomalous_proto = (F.normalize(p, dim=-1) for p in detector.prototypes_for(ensemble))
    for row in (rows[0], rows[100], rows[-1]):
        emb = F.normalize(detector.encode_prompts([row["prompt"]])[0], dim=-1)
        pair = torch.stack([emb, anomalous_proto]) if row["class"] == "normal" else torch.stack([normal_proto, emb])
        probability = ((image @ pair.T) / 0.07).softmax(-1)[:, 1].numpy()
        assert row["auroc"] == pytest.approx(image_metrics(probability, data.labels)["auroc"], abs=1e-9)


def test_explain_prompts_follows_the_configured_scoring(tmp_path):
    """The playground's per-prompt probability uses the detector's scoring, one_class included."""
    from winclip.service import DetectionService, DetectOptions, Settings

    service = DetectionService(Settings(model=TINY_CONFIG, pretrained=None, device="cpu", precision="fp32"))
    assert service.load()
    make_part(5, 128, "crack").image.save(tmp_path / "q.png")
    report = service.explain_prompts(str(tmp_path / "q.png"), DetectOptions(scoring="one_class"))
    for cls, prompt, cosine, probability in report.rows:
        if cls == "normal":  # one_class: (1 - cos(e, normal prompt)) / 2
            assert probability == pytest.approx((1 - cosine) / 2, abs=2e-5)


def test_defect_words_and_suggestion(encoded):
    detector, data = encoded
    words = defect_word_contributions(detector, data, PromptSet("w", defect_words=("crack", "spot")), "washer")
    assert [w["defect_word"] for w in words] == ["crack", "spot"]
    for w in words:
        assert w["contribution"] == pytest.approx(w["auroc_with"] - w["auroc_without"])
    result = suggest(detector, data, paper_default(), "washer")
    assert (result.split.choose, result.split.held_out, result.split.seed) == (6, 4, 0)  # 3 + 3 chosen, 2 + 2 held out
    for value in (result.start_auroc_held_out, result.pruned_auroc_held_out, result.pruned_auroc_choose_half):
        assert 0.0 <= value <= 1.0
    assert result.pruned_auroc_choose_half >= result.start_auroc_choose_half  # greedy never lowers it
    assert result.to_dict()["split"] == {"choose": 6, "held_out": 4, "seed": 0} and not result.skipped


def test_image_auroc_alone_comes_from_the_class_token_without_the_maps(encoded, monkeypatch):
    """Without references or pixel metrics only the class token's scores are needed: the defect-word table and
    the suggested pruning (dozens of measurements) compute no window maps, and get the same numbers."""
    from winclip.detector import WinClip
    from winclip.prompt_experiments import set_metrics

    detector, data = encoded
    words = PromptSet("w", defect_words=("crack", "spot"))
    protos = detector.prototypes_for(words.ensemble("washer"))
    assert torch.equal(detector.class_scores(data.features, protos),
                       detector.score(data.features, protos, references=None).image_scores)
    full = set_metrics(detector, data, words, "washer")  # the set has masks: pixel metrics, so the maps
    assert "pixel" in full
    monkeypatch.setattr(WinClip, "score", lambda *a, **k: pytest.fail("window maps computed"))
    assert set_metrics(detector, data, words, "washer", pixel=False) == {"set": "w", "zero_shot": full["zero_shot"]}
    assert len(defect_word_contributions(detector, data, words, "washer")) == 2
    assert not suggest(detector, data, words, "washer").skipped


@pytest.mark.parametrize("text, message", [
    ('{"normal_states": ["ok {}", ""]}', r"normal_states\[1\].*empty"),
    ('{"normal_states": ["ok {}", "ok {}"]}', "duplicate"),
    ('{"templates": ["a photo"]}', "placeholder"),
    ('{"anomalous_states": ["' + "x" * 300 + ' {}"]}', "characters"),
    ('{"normal_states": [}', "not valid JSON"),
    ('{"normal_states": []}', "empty"),
    ('{"colour": ["red"]}', "unknown key"),
    ('["a {}"]', "JSON object"),
])
def test_bad_prompt_sets_name_the_entry(text, message):
    with pytest.raises(ValueError, match=message):
        PromptSet.from_json(text, "upload")


def test_shipped_sets_load():
    names = {s.name for s in shipped_sets()}
    assert {"clip_ac", "generic_defects"} <= names


def test_only_good_is_refused(tmp_path):
    good = tmp_path / "x" / "good"
    good.mkdir(parents=True)
    make_part(1, 96).image.save(good / "a.png")
    with pytest.raises(ValueError, match="good and defective"):
        encode_labelled(tiny_detector(), collect_inputs([tmp_path / "x"], tmp_path))


@pytest.mark.slow
def test_cli_prompts(folder, tmp_path, capsys):
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"defect_words": ["crack", "spot"]}))
    code = cli.main(["prompts", "--labelled", str(folder), "--object", "washer", "--sets", "default", "clip_ac",
                     str(custom), "--per-prompt", "--suggest", "--out", str(tmp_path / "o"), "--model", TINY_CONFIG,
                     "--pretrained", "none", "--device", "cpu", "--precision", "fp32"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "prompts.json").read_text())
    assert [s["set"] for s in report["sets"]] == ["default", "clip_ac", "mine"]
    assert "pixel" in report["sets"][0] and "suggestion" in report and "mine" in report["defect_words"]
    with open(tmp_path / "o" / "per_prompt.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == (7 + 4) * 22 + 2 + (7 + 4 + 2) * 22  # default, clip_ac, mine (2 defect words)
    assert cli.main(["prompts", "--labelled", str(folder), "--sets", str(tmp_path / "missing.json"), "--out",
                     str(tmp_path / "o2"), "--model", TINY_CONFIG, "--pretrained", "none"]) == 2
    assert "not found" in capsys.readouterr().err
