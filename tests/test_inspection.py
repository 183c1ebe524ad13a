"""Batch inspection: inputs (folders, zips, bad files), streaming scores, labelled metrics, CSV/JSON/HTML, CLI."""

import csv
import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from winclip import cli
from winclip.datasets import load_category, read_image
from winclip.evaluation import EvalSettings, evaluate_category
from winclip.inputs import collect_inputs, extract_zip, shard
from winclip.inspection import inspect_stream, run_inspection
from winclip.metrics import image_metrics
from winclip.prompt_experiments import require_labelled
from winclip.synthetic import make_part

from conftest import TINY_CONFIG
from corpus import bad_images, bomb_png, png_header_only, save_part

MODEL = ["--model", TINY_CONFIG, "--pretrained", "none"]


def part(seed: int, defect: str = "none", size: int = 160) -> Image.Image:
    return make_part(seed, size, defect).image


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """MVTec-like: cat/test/{good,crack,spot}, masks in cat/ground_truth/<defect>/<stem>_mask.png, a corrupt good."""
    root = tmp_path_factory.mktemp("labelled") / "washer"
    test = root / "test"
    for i in range(4):
        save_part(make_part(i, 160), test / "good" / f"{i:03d}.png")
    (test / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    for defect, seeds in (("crack", (40, 41)), ("spot", (50, 51))):
        for s in seeds:
            save_part(make_part(s, 160, defect), test / defect / f"{s:03d}.png",
                      root / "ground_truth" / defect / f"{s:03d}_mask.png")
    return test


def test_cli_inspect_labelled_folder_with_a_corrupt_file(labelled, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["inspect", "--images", str(labelled), "--object", "washer", "--out", str(out),
                     "--overlays", "--batch-size", "3", *MODEL])
    assert code == 0
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9  # one row per input file
    for column in ("file", "status", "score", "verdict", "zero_shot_score", "few_shot_score", "peak_x", "peak_y",
                   "seconds", "error"):
        assert column in rows[0]
    (bad,) = [r for r in rows if r["status"] == "error"]
    assert bad["file"].endswith("good/broken.png") and bad["score"] == "" and "broken.png" in bad["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"files": 9, "scored": 8, "errors": 1, "anomalous": summary["counts"]["anomalous"]}
    assert set(summary["metrics"]["image"]) == {"auroc", "aupr", "f1_max"}
    assert set(summary["metrics"]["pixel"]) == {"pauroc", "pro", "f1_max"}
    assert summary["threshold"]["how"].startswith("auto")
    ok = [r for r in rows if r["status"] == "ok"]
    direct = image_metrics([float(r["score"]) for r in ok], [int(r["label"]) for r in ok])
    assert summary["metrics"]["image"]["auroc"] == pytest.approx(direct["auroc"], abs=1e-9)
    report = (out / "report.html").read_text()
    assert report.count("data:image/jpeg;base64,") == 8 and "<svg" in report and "ROC" in report
    assert "F1-optimal" in report
    unreadable = report.split("<h2>Unreadable files (1)</h2>", 1)[1]  # the file named once, then why
    assert unreadable.count("broken.png") == 1 and "not an image file" in unreadable.split("</table>", 1)[0]
    # the settings as a reader reads them, not Python reprs
    assert "object: washer · defect words: none · normal shots: 0" in report and "labelled: yes" in report
    assert "defect_words []" not in report and "pretrained None" not in report and "scales: 2, 3" in report
    overlays = sorted((out / "overlays").iterdir())  # JPEG by default, full size, named after the file's path
    assert len(overlays) == 8 and all(f.suffix == ".jpg" for f in overlays)
    assert (out / "overlays" / f"{labelled.name}__crack__040.jpg") in overlays
    with Image.open(overlays[0]) as im:
        assert im.format == "JPEG" and im.size == (160, 160)
    printed = capsys.readouterr().out
    assert "8 scored, 1 unreadable" in printed and "overlays/ (8 JPEG files)" in printed


def test_inspect_equals_evaluate_on_the_same_folder(labelled, tmp_path, tiny):
    """Same scores and metrics as `evaluate --dataset folder --shots 0` (shared dataset and metric code)."""
    root = tmp_path / "washer"  # evaluate takes the object name from the folder name
    for sub in ("good", "crack", "spot"):
        (root / sub).mkdir(parents=True)
        for p in sorted((labelled / sub).glob("0*.png")):
            (root / sub / p.name).write_bytes(p.read_bytes())
    tiny.set_prompts("washer")
    inputs = collect_inputs([root], tmp_path / "w")
    summary, rows = run_inspection(tiny, inputs, tmp_path / "out", tiny.prototypes, None, 0.5, 2)
    evaluated = evaluate_category(tiny, load_category("folder", root, "washer"), EvalSettings(shots=(0,)),
                                  progress=lambda _: None)
    for metric in ("auroc", "aupr", "f1_max"):
        assert summary.metrics["image"][metric] == pytest.approx(evaluated["shots"]["0"]["summary"][metric]["mean"],
                                                                 abs=1e-6)
    tiny.set_prompts()


def test_stream_matches_single_image_predict(labelled, tiny):
    tiny.set_prompts("washer")
    inputs = collect_inputs([labelled / "crack"], labelled.parent)
    rows = list(inspect_stream(tiny, inputs.items, tiny.prototypes, None, batch_size=1, thumbnails=False))
    for row, item in zip(rows, inputs.items):
        assert row.score == pytest.approx(tiny.predict(read_image(item.path)).score, abs=1e-5)
    tiny.set_prompts()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_zip_with_every_kind_of_bad_entry(tmp_path, tiny):
    entries = {
        "parts/a/1.png": png(part(1)), "parts/b/1.png": png(part(2)),  # duplicate names in different folders
        "parts/empty.png": b"", "parts/notes.txt": b"not an image", "parts/trunc.png": png(part(3))[:200],
        "parts/huge.png": png_header_only(50000, 50000), "parts/bomb.png": bomb_png(9000, 9000),
        "../escape.png": png(part(4)), "/abs/escape.png": png(part(5)), "parts/inner.zip": zip_bytes({"x.png": b""}),
        "__MACOSX/parts/._1.png": b"junk", "parts/.DS_Store": b"junk",
    }
    archive = tmp_path / "batch.zip"
    archive.write_bytes(zip_bytes(entries))
    inputs = collect_inputs([archive], tmp_path / "work")
    names = sorted(it.name for it in inputs.items)
    assert names == sorted(f"batch.zip/parts/{n}" for n in ("a/1.png", "b/1.png", "empty.png", "notes.txt",
                                                             "trunc.png", "huge.png", "bomb.png"))
    assert not (tmp_path / "escape.png").exists() and not Path("/abs/escape.png").exists()
    assert sum("unsafe path" in n for n in inputs.notes) == 2 and any("nested zip" in n for n in inputs.notes)
    rows = {r.file: r for r in inspect_stream(tiny, inputs.items, batch_size=4, thumbnails=False)}
    assert {n for n, r in rows.items() if r.status == "ok"} == {"batch.zip/parts/a/1.png", "batch.zip/parts/b/1.png"}
    reasons = {n.rsplit("/", 1)[1]: r.error for n, r in rows.items() if r.status == "error"}
    assert "empty" in reasons["empty.png"] and "not an image" in reasons["notes.txt"]
    assert "corrupt" in reasons["trunc.png"] or "truncated" in reasons["trunc.png"]
    assert "pixels" in reasons["huge.png"] and "pixels" in reasons["bomb.png"]


def test_bad_image_corpus_gives_one_error_row_each(tmp_path, tiny):
    folder = tmp_path / "corpus"
    folder.mkdir()
    cases = bad_images()
    for i, (case, filename, data, _pattern) in enumerate(cases):
        (folder / f"{i:02d}_{filename}").write_bytes(data)
    part(7).save(folder / "zz_good.png")
    rows = list(inspect_stream(tiny, collect_inputs([folder], tmp_path).items, batch_size=5, thumbnails=False))
    assert len(rows) == len(cases) + 1
    assert [r.status for r in rows].count("ok") == 1 and rows[-1].status == "ok"
    assert all(r.error for r in rows[:-1])


def test_zip_bomb_is_refused_before_extracting(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.png", b"\0" * (5 << 20))
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="zip bomb"):
        extract_zip(archive, tmp_path / "out", [], max_bytes=1 << 20)
    assert not (tmp_path / "out" / "big.png").exists()
    with pytest.raises(ValueError, match="at most 0 are accepted"):
        extract_zip(archive, tmp_path / "out2", [], max_files=0)


def test_empty_folder_and_only_good(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["inspect", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), *MODEL]) == 2
    assert "no input files" in capsys.readouterr().err
    good = tmp_path / "onlygood" / "good"
    good.mkdir(parents=True)
    for i in range(2):
        part(i).save(good / f"{i}.png")
    assert cli.main(["inspect", "--images", str(tmp_path / "onlygood"), "--out", str(tmp_path / "o2"), "--json",
                     *MODEL]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "only one class" in summary["metrics"]["skipped"] and summary["counts"]["scored"] == 2


@pytest.mark.parametrize("args, message", [(["--shard", "3/2"], "0 <= I < N"), (["--shard", "x"], "I/N"),
                                           (["--threshold", "1.5"], "threshold"), (["--batch-size", "0"], "batch")])
def test_bad_arguments_exit_2(labelled, tmp_path, capsys, args, message):
    assert cli.main(["inspect", "--images", str(labelled), "--out", str(tmp_path / "o"), *args, *MODEL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_shards_partition_the_files_and_their_csvs_concatenate(labelled, tmp_path):
    items = collect_inputs([labelled], tmp_path).items
    parts = [shard(items, i, 3) for i in range(3)]
    assert sorted(it.name for p in parts for it in p) == sorted(it.name for it in items)
    assert shard(items, 1, 3) == parts[1]  # deterministic
    total = 0
    for i in range(3):
        if parts[i]:
            assert cli.main(["inspect", "--images", str(labelled), "--shard", f"{i}/3", "--out",
                             str(tmp_path / f"s{i}"), "--json", *MODEL]) == 0
            with open(tmp_path / f"s{i}" / "results.csv", newline="") as fh:
                total += len(list(csv.DictReader(fh)))
    assert total == len(items)


def test_few_shot_with_a_normal_folder_sets_an_auto_threshold(labelled, tmp_path, capsys):
    normals = tmp_path / "normals"
    normals.mkdir()
    for i in range(3):
        part(100 + i).save(normals / f"n{i}.png")
    assert cli.main(["inspect", "--images", str(labelled / "crack"), "--normal", str(normals), "--out",
                     str(tmp_path / "o"), "--json", *MODEL]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "leave-one-out" in summary["threshold"]["how"] and summary["settings"]["shots"] == 3
    with open(tmp_path / "o" / "results.csv", newline="") as fh:
        assert all(r["few_shot_score"] != "" for r in csv.DictReader(fh))


def test_cli_inspect_says_why_a_set_is_unlabelled(labelled, tmp_path, capsys):
    assert cli.main(["inspect", "--images", str(labelled), str(labelled / "crack"), "--out", str(tmp_path / "o"),
                     *MODEL]) == 0
    out = capsys.readouterr().out
    assert "note: crack: unlabelled (no AUROC or other metrics): no good/ folder" in out
    assert f"note: no metrics for this run: {labelled.name} labelled, the rest not" in out
    assert "image AUROC" not in out


def test_cli_inspect_musc_on_a_labelled_folder(labelled, tmp_path, capsys):
    out = tmp_path / "musc"
    assert cli.main(["inspect", "--images", str(labelled), "--method", "musc", "--out", str(out), "--json",
                     "--overlays", "--overlay-format", "png", *MODEL]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["settings"]["method"] == "musc" and summary["counts"]["scored"] == 8
    assert "MuSc" in summary["threshold"]["how"]
    assert set(summary["metrics"]["image"]) == {"auroc", "aupr", "f1_max"} and "pixel" in summary["metrics"]
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    scores = [float(r["score"]) for r in rows if r["status"] == "ok"]
    assert len(rows) == 9 and min(scores) >= 0.0 and max(scores) <= 1.0
    overlays = sorted((out / "overlays").iterdir())
    assert len(overlays) == 8 and all(f.suffix == ".png" for f in overlays)
    with Image.open(overlays[0]) as im:
        assert im.format == "PNG" and im.size == (160, 160)


def test_musc_with_fewer_than_five_images_says_so(labelled, tmp_path, capsys):
    assert cli.main(["inspect", "--images", str(labelled / "crack"), str(labelled / "spot"), "--method", "musc",
                     "--out", str(tmp_path / "o"), *MODEL]) == 2
    assert "at least 5 readable images" in capsys.readouterr().err


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_zipped_mvtec_category_folder_is_labelled_with_its_masks(tmp_path, tiny):
    """A zip of an MVTec category as downloaded: bottle/{train,test,ground_truth}/..."""
    archive = tmp_path / "bottle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            zf.writestr(f"bottle/train/good/{i:03d}.png", png_bytes(part(i)))
            zf.writestr(f"bottle/test/good/{i:03d}.png", png_bytes(part(10 + i)))
        for i in range(2):
            made = make_part(20 + i, 160, "crack")
            zf.writestr(f"bottle/test/crack/{i:03d}.png", png_bytes(made.image))
            zf.writestr(f"bottle/ground_truth/crack/{i:03d}_mask.png", png_bytes(Image.fromarray(made.mask)))
    inputs = collect_inputs([archive], tmp_path / "work")
    assert inputs.labelled and len(inputs.items) == 5  # test/ only: train/ holds the references, not queries
    assert sorted(it.label for it in inputs.items) == [0, 0, 0, 1, 1]
    assert all(it.mask is not None for it in inputs.items if it.label == 1)
    summary, _ = run_inspection(tiny, inputs, tmp_path / "out", threshold=0.5)
    assert "image" in summary.metrics and "pixel" in summary.metrics


def test_an_unlabelled_set_says_which_rule_it_missed(tmp_path):
    archive = tmp_path / "parts.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("line3/ok/000.png", png_bytes(part(1)))
        zf.writestr("line3/scratched/000.png", png_bytes(part(2)))
    inputs = collect_inputs([archive], tmp_path / "work")
    assert not inputs.labelled
    (note,) = inputs.notes
    assert "parts.zip: unlabelled" in note and "no good/ folder" in note and "test/" in note


def test_a_labelled_set_in_two_zips_is_labelled_and_a_mixed_run_says_why_it_has_no_metrics(tmp_path, tiny):
    def labelled_zip(name: str, seed: int) -> Path:
        archive = tmp_path / name
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr(f"washer/test/good/{seed}.png", png_bytes(part(seed)))
            zf.writestr(f"washer/test/crack/{seed}.png", png_bytes(part(seed + 1)))
        return archive

    first, second = labelled_zip("a.zip", 1), labelled_zip("b.zip", 3)
    both = collect_inputs([first, second], tmp_path / "w1")
    assert both.labelled and not both.notes
    assert sorted((it.name, it.label) for it in both.items) == [
        ("a.zip/crack/1.png", 1), ("a.zip/good/1.png", 0),
        ("b.zip/crack/3.png", 1), ("b.zip/good/3.png", 0)]

    loose = tmp_path / "loose.png"
    part(9).save(loose)
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("parts/1.png", png_bytes(part(5)))
    mixed = collect_inputs([first, plain, loose], tmp_path / "w2")
    assert not mixed.labelled
    assert {it.name: it.label for it in mixed.items} == {
        "a.zip/crack/1.png": 1, "a.zip/good/1.png": 0, "plain.zip/parts/1.png": None, "loose.png": None}
    notes = " | ".join(mixed.notes)
    assert "plain.zip: unlabelled" in notes and "1 single file given: unlabelled" in notes
    assert "no metrics for this run: a.zip labelled, the rest not" in notes
    summary, rows = run_inspection(tiny, mixed, tmp_path / "out", threshold=0.5)
    assert "image" not in summary.metrics and {r.file: r.label for r in rows}["a.zip/crack/1.png"] == 1
    with pytest.raises(ValueError, match=r"not labelled \(plain.zip: unlabelled.*no metrics for this run"):
        require_labelled(mixed)


def test_report_histogram_threshold_labels_stay_apart_and_inside(tmp_path):
    """Close thresholds near the right edge: each label on its own row, on the side of its line with room,
    and the legend above the plot instead of over the bars and labels."""
    import re

    from winclip.report import PAD, W, histogram_svg

    svg = histogram_svg([0.9, 0.92, 0.95, 0.3], [0, 0, 1, 0], {"threshold": 0.905, "F1-optimal": 0.93})
    labels = re.findall(r'<text x="([\d.]+)"( text-anchor="end")? y="([\d.]+)"[^>]*>(threshold|F1-optimal) ', svg)
    assert len(labels) == 2 and labels[0][2] != labels[1][2]  # two rows
    assert all(anchor and float(x) < W - PAD for x, anchor, _, _ in labels)  # left of their lines, inside
    legend_rows = [float(y) for y in re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="8"', svg)]
    assert legend_rows and all(y < PAD for y in legend_rows)
    low = histogram_svg([0.1, 0.2, 0.4], [0, 1, 1], {"threshold": 0.2})
    assert re.search(r'<text x="[\d.]+" y="[\d.]+"[^>]*>threshold 0.200', low)  # right of a line left of the middle


def test_report_histogram_zooms_to_scores_close_together():
    """Zero-shot scores a few hundredths apart all fell in one of 40 bars over 0-1: the axis now spans the
    scores and lines (labelled as zoomed), and a set spread over half the range or more keeps 0-1."""
    import re

    from winclip.report import PAD, W, histogram_svg, score_axis

    scores = [0.421, 0.425, 0.43, 0.434, 0.44, 0.447, 0.45]
    svg = histogram_svg(scores, [0, 0, 0, 1, 0, 1, 1], {"threshold": 0.5})
    bars = re.findall(r'<rect x="([\d.]+)" y="[\d.]+" width="[\d.]+" height="[\d.]+" fill', svg)
    assert len(set(bars)) >= 5, bars  # the scores spread over several bars (one bar before)
    ticks = [float(t) for t in re.findall(r'text-anchor="middle">([\d.]+)</text>', svg)]
    assert ticks[0] <= 0.421 and 0.5 <= ticks[-1] < 0.6 and len(ticks) >= 3, ticks
    assert "axis zoomed to 0.4-0.52" in svg and "(max bin" in svg
    line = float(re.search(r'<line x1="([\d.]+)" y1="[\d.]+" x2="[\d.]+" y2="[\d.]+" stroke="currentColor" '
                           r'stroke-width', svg).group(1))
    assert PAD < line < W - PAD  # the threshold inside the plot, at its place on the zoomed axis
    counts = [int(c) for c in re.findall(r"<title>(?:good|defective): (\d+) in", svg)]
    assert sum(counts) == len(scores)
    wide = histogram_svg([0.1, 0.9], [0, 1], {"threshold": 0.5})
    assert "zoomed" not in wide and re.findall(r'text-anchor="middle">([\d.]+)</text>', wide)[::5] == ["0.0", "1.0"]
    same = score_axis([0.3, 0.3])  # identical scores: a 0.01-wide range around them
    assert same.lo < 0.3 < same.hi and same.hi - same.lo <= 0.02
    assert score_axis([]) == score_axis([0.0, 1.0]) and score_axis([0.0, 0.01]).lo == 0.0
