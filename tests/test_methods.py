"""The method interface: a method defined only in this file, registered, runs in `inspect`, `evaluate`, the
Batch tab's choices and the `/inspect` API, with no other file naming it."""

import csv
import json
import zipfile

import pytest
import torch
import torch.nn.functional as F

import app
from winclip import cli, methods
from winclip.service import DetectionService, Settings
from winclip.synthetic import make_part

from conftest import TINY_CONFIG, serve, tiny_detector

MODEL = ["--model", TINY_CONFIG, "--pretrained", "none"]


class Darkness(methods.Method):
    """Toy method: a patch's score is how dark it is (no model, no text, no references)."""

    name = "darkness"
    title = "Darkness"
    help = "how dark each patch is (a toy)"

    def encode(self, detector, pixels, setup):  # (B, 3, H, W) -> (B, gh, gw) mean value per patch
        gh, gw = detector.grid
        return F.adaptive_avg_pool2d(pixels.mean(dim=1, keepdim=True), (gh, gw))[:, 0]

    def score(self, detector, features, setup):
        maps = torch.sigmoid(-features)
        return methods.Scores(maps.amax(dim=(-2, -1)), maps)


def expected(detector, path) -> float:
    from winclip.images import load_image

    pixels = detector.preprocess(load_image(path).image)[None]
    return float(Darkness().score(detector, Darkness().encode(detector, pixels, None), None).scores[0])


@pytest.fixture(scope="module")
def toy():
    methods.register(Darkness())
    yield
    methods.unregister("darkness")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "parts"
    for i in range(4):
        (root / "good").mkdir(parents=True, exist_ok=True)
        make_part(i, 160).image.save(root / "good" / f"g{i}.png")
    (root / "dark").mkdir()
    for i in range(3):
        image = make_part(40 + i, 160, "spot").image.point(lambda v: v // 4)  # darker: the toy's "defect"
        image.save(root / "dark" / f"d{i}.png")
    return root


def test_registered_method_runs_in_cli_inspect(toy, folder, tmp_path, capsys):
    assert "darkness" in methods.names()
    out = tmp_path / "out"
    assert cli.main(["inspect", "--images", str(folder), "--method", "darkness", "--out", str(out), "--json",
                     *MODEL]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["settings"]["method"] == "darkness" and summary["counts"]["scored"] == 7
    assert summary["metrics"]["image"]["auroc"] == 1.0  # every darkened part outscores every good one
    detector = tiny_detector()
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        assert float(row["score"]) == pytest.approx(expected(detector, folder.parent / row["file"]), abs=1e-6)
    assert "darkness" in cli.build_parser().format_help() or "darkness" in cli.method_help()


def test_registered_method_runs_in_evaluate(toy, folder, tmp_path):
    assert cli.main(["evaluate", "--dataset", "folder", "--root", str(folder), "--method", "darkness",
                     "--pixel-size", "32", "--out", str(tmp_path / "res"), *MODEL]) == 0
    result = json.loads((tmp_path / "res" / "folder" / "darkness" / "parts.json").read_text())
    assert set(result["shots"]) == {"0"}  # no references: zero-shot only, one run
    assert result["shots"]["0"]["summary"]["auroc"]["mean"] == 1.0
    report = (tmp_path / "res" / "folder" / "darkness" / "report.md").read_text()
    assert "Darkness evaluation" in report and "## 0-shot (Darkness)" in report


def test_registered_method_is_a_batch_tab_choice_and_runs_through_the_api(toy, folder, tmp_path):
    from gradio_client import Client, handle_file

    service = DetectionService(Settings(model=TINY_CONFIG, pretrained=None, precision="fp32"))
    assert service.load(), service.error
    demo = app.build_demo(service)
    radios = [b for b in demo.blocks.values() if type(b).__name__ == "Radio" and b.label == "Method"]
    assert len(radios) == 1 and ("Darkness", "Darkness") in radios[0].choices
    archive = tmp_path / "parts.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*.png")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    with serve(demo) as url:
        client = Client(url, verbose=False, ssl_verify=False)
        summary, gallery, hist, roc, table, downloads = client.predict(
            [handle_file(str(archive))], [], "washer", "", 2, 3, True, 0.5, True, "", "", "", "two_class",
            "harmonic", "Darkness", api_name="/inspect")
    assert "7 scored" in summary and "Image AUROC" in summary
    rows = table["data"]
    header = table["headers"]
    scores = {r[header.index("file")]: r[header.index("score")] for r in rows}
    detector = tiny_detector()
    assert len(scores) == 7
    for name, score in scores.items():  # "parts.zip/dark/d0.png": the zip's one top folder is the set
        assert float(score) == pytest.approx(expected(detector, folder / name.split("/", 1)[1]), abs=1e-3)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="choose from winclip, musc"):
        methods.get("nope")
