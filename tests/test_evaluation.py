"""End-to-end evaluation on a synthetic MVTec-layout dataset with the tiny model, including resume."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from winclip.datasets import list_categories, load_category, load_mask
from winclip.evaluation import EvalSettings, object_name, run_evaluation, write_report
from winclip.synthetic import make_part

from conftest import TINY_CONFIG, tiny_detector

ROOT = Path(__file__).resolve().parent.parent


def make_mvtec(root: Path, category: str, gray: bool = False, size: int = 700) -> None:  # MVTec-like size
    base = root / category
    for i in range(4):
        (base / "train" / "good").mkdir(parents=True, exist_ok=True)
        im = make_part(i, size).image
        (im.convert("L") if gray else im).save(base / "train" / "good" / f"{i:03d}.png")
    for i in range(3):
        (base / "test" / "good").mkdir(parents=True, exist_ok=True)
        im = make_part(50 + i, size).image
        (im.convert("L") if gray else im).save(base / "test" / "good" / f"{i:03d}.png")
    for defect in ("scratch", "spot"):
        for i in range(2):
            sample = make_part(100 + i + (10 if defect == "spot" else 0), size, defect)
            (base / "test" / defect).mkdir(parents=True, exist_ok=True)
            (base / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            im = sample.image.convert("L") if gray else sample.image
            if gray and i == 0:  # a 16-bit grayscale test image
                im = Image.fromarray(np.asarray(im).astype(np.uint16) * 257, mode="I;16")
            im.save(base / "test" / defect / f"{i:03d}.png")
            Image.fromarray(sample.mask.astype(np.uint8) * (1 if i else 255)).save(  # 0/1 and 0/255 masks
                base / "ground_truth" / defect / f"{i:03d}_mask.png")


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    make_mvtec(root, "washer")
    make_mvtec(root, "metal_nut", gray=True)
    return root


def test_mvtec_layout_is_read(mvtec):
    assert list_categories("mvtec", mvtec) == ["metal_nut", "washer"]
    cat = load_category("mvtec", mvtec, "washer")
    assert len(cat.train_good) == 4 and len(cat.test) == 7 and cat.has_masks
    assert cat.defect_types == ("scratch", "spot")
    assert cat.references(2, 0) == cat.references(2, 0) and cat.references(2, 0) != cat.references(2, 1)
    with pytest.raises(ValueError, match="only 4"):
        cat.references(5, 0)
    mask = load_mask(next(s.mask for s in cat.test if s.label), (100, 50))
    assert mask.shape == (50, 100) and mask.any()
    assert object_name("metal_nut") == "metal nut" and object_name("pcb4") == "pcb"


def test_evaluate_end_to_end_and_resume(mvtec, tmp_path):
    det = tiny_detector()
    cats = [load_category("mvtec", mvtec, c) for c in ("washer", "metal_nut")]
    settings = EvalSettings(shots=(0, 1), seeds=2, pixel_size=64, batch_size=3, model=TINY_CONFIG)
    report = run_evaluation(det, cats, settings, tmp_path, progress=lambda s: None)
    results = {c.name: json.loads((tmp_path / f"{c.name}.json").read_text()) for c in cats}
    for r in results.values():
        assert set(r["shots"]) == {"0", "1"} and len(r["shots"]["1"]["runs"]) == 2
        for block in r["shots"].values():
            for m in ("auroc", "aupr", "f1_max", "pauroc", "pro", "pixel_f1_max"):
                assert 0.0 <= block["summary"][m]["mean"] <= 1.0
        runs = r["shots"]["1"]["runs"]
        assert np.isclose(r["shots"]["1"]["summary"]["auroc"]["mean"], np.mean([x["auroc"] for x in runs]))
    text = report.read_text()
    mean_auroc = np.mean([r["shots"]["0"]["summary"]["auroc"]["mean"] * 100 for r in results.values()])
    assert f"**{mean_auroc:.1f}**" in text and "| 0-shot | auroc |" in text and "91.8" in text
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + 2 * 2 * 6

    # resume: finished categories are kept, a changed setting recomputes
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    run_evaluation(det, cats, settings, tmp_path, progress=lambda s: None)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")} == before
    (tmp_path / "washer.json").unlink()
    run_evaluation(det, cats, settings, tmp_path, progress=lambda s: None)
    assert (tmp_path / "metal_nut.json").stat().st_mtime_ns == before["metal_nut.json"]
    assert json.loads((tmp_path / "washer.json").read_text())["shots"] == results["washer"]["shots"]  # deterministic


def test_report_is_recomputed_from_json(mvtec, tmp_path):
    det = tiny_detector()
    cats = [load_category("mvtec", mvtec, "washer")]
    settings = EvalSettings(shots=(0,), seeds=1, pixel_size=32)
    run_evaluation(det, cats, settings, tmp_path, progress=lambda s: None)
    data = json.loads((tmp_path / "washer.json").read_text())
    data["shots"]["0"]["summary"]["auroc"]["mean"] = 0.4321
    (tmp_path / "washer.json").write_text(json.dumps(data))
    assert "43.2" in write_report(tmp_path, ["washer"], settings).read_text()


def test_folder_layout_and_image_only_metrics(tmp_path):
    root = tmp_path / "parts"
    (root / "good").mkdir(parents=True)
    (root / "dent").mkdir()
    for i in range(5):
        make_part(i, 160).image.save(root / "good" / f"g{i}.png")
    for i in range(3):
        make_part(40 + i, 160, "spot").image.save(root / "dent" / f"d{i}.png")
    cat = load_category("folder", root, "parts")
    assert not cat.has_masks and len(cat.test) == 8
    settings = EvalSettings(shots=(0, 2), seeds=2, pixel_size=32)
    run_evaluation(tiny_detector(), [cat], settings, tmp_path / "out", progress=lambda s: None)
    r = json.loads((tmp_path / "out" / "parts.json").read_text())
    assert "pauroc" not in r["shots"]["0"]["summary"] and "auroc" in r["shots"]["2"]["summary"]


def test_visa_csv(tmp_path):
    (tmp_path / "split_csv").mkdir()
    for sub in ("candle/Data/Images/Normal", "candle/Data/Images/Anomaly", "candle/Data/Masks/Anomaly"):
        (tmp_path / sub).mkdir(parents=True)
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        make_part(i, 120).image.save(tmp_path / f"candle/Data/Images/Normal/{i:04d}.JPG", format="JPEG")
        rows.append(f"candle,train,normal,candle/Data/Images/Normal/{i:04d}.JPG,")
    s = make_part(9, 120, "spot")
    s.image.save(tmp_path / "candle/Data/Images/Anomaly/0000.JPG", format="JPEG")
    Image.fromarray(s.mask.astype(np.uint8)).save(tmp_path / "candle/Data/Masks/Anomaly/0000.png")
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/0000.JPG,candle/Data/Masks/Anomaly/0000.png")
    rows.append("candle,test,normal,candle/Data/Images/Normal/0002.JPG,")
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    assert list_categories("visa", tmp_path) == ["candle"]
    cat = load_category("visa", tmp_path, "candle")
    assert len(cat.train_good) == 3 and [x.label for x in cat.test] == [1, 0] and cat.has_masks
    with pytest.raises(ValueError, match="no rows"):
        load_category("visa", tmp_path, "pcb1")
    with pytest.raises(ValueError, match="1cls.csv"):
        load_category("visa", tmp_path / "candle", "candle")


@pytest.mark.slow
def test_cli_evaluate_with_weights_file(mvtec, tmp_path):
    weights = tmp_path / "tiny.pt"
    torch.save(tiny_detector().backbone.model.state_dict(), weights)
    r = subprocess.run([sys.executable, "-m", "winclip", "evaluate", "--dataset", "mvtec", "--root", str(mvtec),
                        "--categories", "washer", "--shots", "0", "1", "--seeds", "2", "--pixel-size", "48",
                        "--model", TINY_CONFIG, "--pretrained", str(weights), "--out", str(tmp_path / "res"),
                        "--defect-words", "dataset"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "res" / "mvtec" / "winclip" / "report.md").is_file()
    data = json.loads((tmp_path / "res" / "mvtec" / "winclip" / "washer.json").read_text())
    assert data["defect_words"] == ["scratch", "spot"]
    bad = subprocess.run([sys.executable, "-m", "winclip", "evaluate", "--dataset", "mvtec", "--root",
                          str(tmp_path / "nope"), "--out", str(tmp_path), "--model", TINY_CONFIG, "--pretrained",
                          "none", "--ablation", "bogus"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown ablation" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_evaluate_musc_writes_the_report_with_the_published_comparison(mvtec, tmp_path, capsys):
    from winclip import cli

    assert cli.main(["evaluate", "--dataset", "mvtec", "--root", str(mvtec), "--method", "musc", "--pixel-size", "48",
                     "--model", TINY_CONFIG, "--pretrained", "none", "--out", str(tmp_path / "res")]) == 0
    report = (tmp_path / "res" / "mvtec" / "musc" / "report.md").read_text()
    assert "MuSc evaluation" in report and "| 0-shot | auroc |" in report and "94.8" in report
    assert "uses the test images" in report or "test images as the unlabelled batch" in report
    data = json.loads((tmp_path / "res" / "mvtec" / "musc" / "washer.json").read_text())
    assert data["method"] == "musc" and data["n_test"] == 7 and data["musc"]["rescore_k"] == [1, 2, 3]
    assert set(data["shots"]) == {"0"} and "pro" in data["shots"]["0"]["summary"]
