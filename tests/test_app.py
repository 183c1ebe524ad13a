"""The demo: service handlers on the tiny model, and the app served in-process called via gradio_client."""

import io
import os
import re
import shutil
import signal
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import app
from winclip.detector import WinClip
from winclip.service import DetectionService, DetectOptions, Settings
from winclip.synthetic import make_part

from conftest import TINY_CONFIG, app_py_process, serve, spy_on_encoding, spy_on_prompts, started_as_app_py
from corpus import labelled_zip

TINY = Settings(model=TINY_CONFIG, pretrained=None, precision="fp32")


@pytest.fixture(scope="module")
def service():
    s = DetectionService(TINY)
    assert s.load(), s.error
    return s


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("app")
    make_part(21, 480, "crack").image.resize((640, 480)).save(d / "query.png")
    for i in range(5):
        make_part(i, 300).image.save(d / f"good{i}.png")
    return d


def test_detect_few_shot(service, images):
    r = service.detect(str(images / "query.png"), [str(images / "good0.png"), str(images / "good1.png")],
                       DetectOptions(object_name="washer", defect_words=("crack",), threshold=0.3))
    assert 0 <= r.score <= 1 and r.verdict in ("normal", "anomalous") and r.shots == 2
    assert r.overlay.size == (640, 480) and r.mask.size == (640, 480)
    assert r.suggested_threshold is not None and 0 <= r.suggested_threshold <= 1
    captions = [c for _, c in r.panels]
    assert captions[:2] == ["zero-shot map (WinCLIP)", "few-shot map (2 shots, eq. 5)"]
    assert "few-shot · patch tokens" in captions and "zero-shot · 3x3 windows" in captions


def test_a_repeat_click_reuses_the_suggested_threshold_and_draws_small_panels(service, images, monkeypatch):
    """A repeat click with the same references and prompts reuses their suggested threshold (K leave-one-out
    scorings: most of a repeat click's scoring, real model, 4 shots: 0.03 of 0.04 s); other prompts score it
    anew. The per-scale panels are drawn at most PANEL_SIDE px (gallery tiles; 8 of the 10 images a click
    draws); the overlay, the mask and the map keep the query's size."""
    from winclip.visualize import PANEL_SIDE

    large = images / "large.png"
    make_part(5, 900, "spot").image.resize((900, 600)).save(large)
    refs = [str(images / f"good{i}.png") for i in range(3)]
    opts = DetectOptions(object_name="washer", defect_words=("crack",))
    first = service.detect(str(large), refs, opts)
    calls, real = [], WinClip.leave_one_out_scores
    monkeypatch.setattr(WinClip, "leave_one_out_scores", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    again = service.detect(str(large), refs, replace(opts, threshold=0.2))
    assert calls == [] and again.suggested_threshold == first.suggested_threshold
    assert again.score == first.score and np.array_equal(again.anomaly_map, first.anomaly_map)
    other = service.detect(str(large), refs, replace(opts, defect_words=("scratch",)))
    assert calls == [1] and other.suggested_threshold is not None
    assert {im.size for im, _ in first.panels} == {(PANEL_SIDE, round(600 * PANEL_SIDE / 900))}
    assert first.prediction.zero_shot_map.shape == (341, 512) and first.anomaly_map.shape == (600, 900)
    assert first.overlay.size == first.mask.size == (900, 600)
    small = service.detect(str(images / "query.png"), refs, opts)  # 640 x 480: its panels are drawn 512 x 384
    assert {im.size for im, _ in small.panels} == {(512, 384)} and small.overlay.size == (640, 480)


def test_threshold_only_changes_verdict_and_reuses_features(service, images, monkeypatch):
    opts = DetectOptions(object_name="washer")
    first = service.detect(str(images / "query.png"), [], opts)
    calls = []
    monkeypatch.setattr(type(service.detector), "encode", lambda *a, **k: calls.append(1) or pytest.fail("recomputed"))
    for t in (0.0, 1.0):
        again = service.detect(str(images / "query.png"), [], DetectOptions(object_name="washer", threshold=t))
        assert again.score == first.score
        assert again.verdict == ("anomalous" if t == 0.0 else "normal")
    assert not calls


def test_window_settings_change_components(service, images):
    r = service.detect(str(images / "query.png"), [], DetectOptions(min_window=1, max_window=4, image_scale=False))
    assert set(r.prediction.components) == {f"zero_shot/window_{k}" for k in (1, 2, 3, 4)}
    r = service.detect(str(images / "query.png"), [], DetectOptions(min_window=0, max_window=3))
    assert set(r.prediction.components) == {"zero_shot/image"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"references": 5}, "at most 4"),
        ({"query": None}, "Upload a query"),
        ({"options": DetectOptions(max_window=9)}, "patch grid"),
        ({"options": DetectOptions(threshold=2)}, "threshold"),
        ({"options": DetectOptions(templates=("no slot",))}, "placeholder"),
    ],
)
def test_bad_requests_get_clear_messages(service, images, kwargs, message):
    query = kwargs.get("query", str(images / "query.png"))
    refs = [str(images / f"good{i}.png") for i in range(kwargs.get("references", 0))]
    with pytest.raises(ValueError, match=message):
        service.detect(query, refs, kwargs.get("options", DetectOptions()))


def test_prompt_report(service, images):
    rep = service.explain_prompts(str(images / "query.png"),
                                  DetectOptions(object_name="washer", defect_words=("crack", "scratch")))
    assert rep.prompt_count == (154, 6 * 22)
    assert len(rep.rows) == 154 + 132
    assert all(0 <= row[3] <= 1 and -1 <= row[2] <= 1 for row in rep.rows)
    assert [w[0] for w in rep.word_rows] == ["crack", "scratch"]
    for word, with_all, without, contribution in rep.word_rows:
        assert with_all == pytest.approx(rep.score, abs=1e-5)
        assert contribution == pytest.approx(with_all - without, abs=1e-4)


def test_unloaded_service_explains_how_to_supply_weights(tmp_path):
    s = DetectionService(Settings(model=TINY_CONFIG, pretrained=str(tmp_path / "missing.bin"), precision="fp32"))
    assert not s.load()
    assert "WINCLIP_PRETRAINED" in app.banner(s)
    with pytest.raises(ValueError, match="not loaded"):
        s.detect(np.zeros(1), [], DetectOptions())


def test_random_weights_banner(service):
    assert "RANDOM WEIGHTS" in app.banner(service)


@pytest.fixture(scope="module")
def served(service):
    with serve(app.build_demo(service)) as url:
        yield url


def test_gradio_client_detect(served, images):
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False, ssl_verify=False)
    label, verdict, overlay, mask, gallery = client.predict(
        handle_file(str(images / "query.png")),
        [handle_file(str(images / "good0.png")), handle_file(str(images / "good1.png"))],
        "washer", "crack", api_name="/detect",
    )
    scores = {c["label"]: c["confidence"] for c in label["confidences"]}
    assert 0 <= scores["anomalous"] <= 1 and scores["threshold"] == 0.5  # the Detect tab's default
    assert label["label"] == ("anomalous" if scores["anomalous"] >= 0.5 else "normal")  # the verdict
    assert "2-shot WinCLIP+" in verdict
    with Image.open(overlay) as im:
        assert im.size == (640, 480)
    with Image.open(mask) as im:
        assert im.size == (640, 480)
    assert len(gallery) == 2 + 6
    # the API: these four endpoints, each once (Detect's button and the text boxes' Enter are one event)
    api = client.view_api(return_format="dict", print_info=False)
    assert sorted(api["named_endpoints"]) == ["/detect", "/explain_prompts", "/inspect", "/measure_prompts"]
    assert not api["unnamed_endpoints"]


def test_importing_the_app_writes_no_stub_beside_it():
    """Gradio writes a .pyi beside the module of any gr.Component subclass when the class is defined: a stray
    app.pyi in the user's checkout (and an import error where that folder is read-only). The app wraps
    instances instead."""
    assert not Path(app.__file__).with_suffix(".pyi").exists()


def test_gradio_client_error_is_a_message(served, images, tmp_path):
    from gradio_client import Client, handle_file

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    client = Client(served, verbose=False, ssl_verify=False)
    with pytest.raises(Exception, match="corrupt|not an image") as info:
        client.predict(handle_file(str(bad)), [], api_name="/detect")
    assert "Traceback" not in str(info.value)
    label, *_ = client.predict(handle_file(str(images / "query.png")), [], api_name="/detect")
    assert 0 <= label["confidences"][0]["confidence"] <= 1  # still serving


def test_gradio_client_explain_prompts(served, images):
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False, ssl_verify=False)
    summary, table, words = client.predict(handle_file(str(images / "query.png")), "washer", "crack",
                                           api_name="/explain_prompts")
    assert "154 normal + 110 anomalous prompts" in summary
    assert len(table["data"]) == 264 and words["data"][0][0] == "crack"


def test_gallery_captions_name_the_folder_where_file_names_repeat():
    """An MVTec test set has a 000.png per defect type: the captions then say which folder (cut to fit a tile,
    the file name whole); names that do not repeat stay as they were."""
    files = ([f"bottle/test/{d}/000.png" for d in ("broken_large", "contamination", "good")]
             + ["bottle/test/good/001.png"])
    assert app.caption_names(files) == ["broken_large/000.png", "contaminati…/000.png", "good/000.png", "good/001.png"]
    assert all(len(n) <= app.CAPTION_NAME_CHARS for n in app.caption_names(files))
    assert app.caption_names(["set.zip/a/1.png", "set.zip/a/station3_camera2_part_0001.jpg"]) == [
        "1.png", "station3_c…_0001.jpg"]


def test_gradio_client_inspect_labelled_zip(served, images, tmp_path):
    import csv

    from gradio_client import Client, handle_file

    archive = labelled_zip(tmp_path / "washers.zip")
    client = Client(served, verbose=False, ssl_verify=False)
    work_folders = set(Path(tempfile.gettempdir()).glob("winclip-batch-*"))
    summary, gallery, hist, roc, table, downloads = client.predict(
        [handle_file(str(archive))], [handle_file(str(images / "good0.png")), handle_file(str(images / "good1.png"))],
        "washer", "crack", api_name="/inspect")
    assert "5 scored" in summary and "1 unreadable" in summary and "Image AUROC" in summary and "Pixel AUROC" in summary
    assert len(gallery) == 5 and all("·" in item["caption"] for item in gallery)
    assert len(table["data"]) == 6
    scores = {row[0].rsplit("/", 1)[-1]: row[table["headers"].index("score")] for row in table["data"]}
    assert scores.pop("broken.png") is None and all(isinstance(v, float) for v in scores.values())  # numbers, null
    names = sorted(Path(d).name for d in downloads)
    assert names == ["overlays.zip", "report.html", "results.csv", "summary.json"]
    with zipfile.ZipFile(next(d for d in downloads if d.endswith("overlays.zip"))) as zf:  # stored: JPEGs already
        entries = zf.infolist()
        assert len(entries) == 5 and all(e.compress_type == zipfile.ZIP_STORED for e in entries)
        assert all(e.filename.endswith(".jpg") for e in entries)
        with Image.open(io.BytesIO(zf.read(entries[0]))) as im:
            assert im.format == "JPEG" and im.size == (160, 160)
    csv_path = next(d for d in downloads if d.endswith("results.csv"))
    with open(csv_path, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    # the run's work folder (unpacked zip, overlays, reports) is gone: the downloads came from Gradio's copies
    assert set(Path(tempfile.gettempdir()).glob("winclip-batch-*")) == work_folders


def test_uploads_and_results_are_deleted_after_the_output_hours(service, images, monkeypatch):
    """Gradio's cache holds every upload and result (0.3 MB of results a 900 px click): after WINCLIP_OUTPUT_HOURS it
    is deleted, so a server that runs for weeks does not fill its disk."""
    from gradio_client import Client, handle_file

    monkeypatch.setenv("WINCLIP_OUTPUT_HOURS", str(2 / 3600))  # two seconds, looked at every two seconds
    demo = app.build_demo(service)
    with serve(demo) as url:
        examples = {Path(f) for files in demo.temp_file_sets for f in files}  # kept: the Examples' images
        client = Client(url, verbose=False, ssl_verify=False)
        client.predict(handle_file(str(images / "query.png")), [], "washer", "crack", api_name="/detect")
        cached = {Path(f) for files in demo.temp_file_sets for f in files} - examples
        assert {".png", ".jpeg"} <= {f.suffix for f in cached}, cached  # the upload and the results
        deadline = time.monotonic() + 15
        while any(f.exists() for f in cached) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [f for f in cached if f.exists()]
        assert examples and all(f.exists() for f in examples)  # the Examples' images stay (Gradio keeps them)


def test_output_files_keep_the_newest_only():
    """The app's own copies of outputs (images, the Playground's current_edit.json) stay bounded: the newest
    ``keep``; a download keeps its name."""
    store = app.OutputFiles(keep=3)
    paths = [Path(store.image(Image.new("RGB", (8, 8)))), Path(store.text("current_edit.json", "{}")),
             Path(store.image(Image.new("RGB", (8, 8)))), Path(store.text("current_edit.json", '{"a": 1}'))]
    assert paths[1].name == "current_edit.json" and paths[1] != paths[3]
    assert [p.exists() for p in paths] == [False, True, True, True]
    Path(store.image(Image.new("RGB", (8, 8))))
    assert not paths[1].exists() and not paths[1].parent.exists()  # its folder went with it
    assert Image.open(paths[2]).format == "JPEG" and paths[3].read_text() == '{"a": 1}'
    assert len(list(store.dir.iterdir())) == 3
    shutil.rmtree(store.dir)


def test_output_files_go_when_the_server_process_ends():
    """The app's own output folder is removed when the process ends (it stayed in /tmp after every stop)."""
    import subprocess
    import sys

    code = ("from PIL import Image; import app; path = app.outputs.image(Image.new('RGB', (8, 8))); "
            "print(app.outputs.dir)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(app.__file__).parent, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert folder.name.startswith("winclip-outputs-") and not folder.exists()


def test_a_server_stopped_by_sigterm_leaves_no_uploads_or_results(tmp_path):
    """``docker stop``, systemd and ``kill`` send SIGTERM, which skipped the exit handlers: every such stop
    left the app's output folder in the temporary directory; and any stop left the uploads and results in
    Gradio's cache. app.py as started from the command line."""
    from gradio_client import handle_file

    temp = tmp_path / "tmp"
    temp.mkdir()
    server, _, client = app_py_process(dict(os.environ, WINCLIP_MODEL=TINY_CONFIG, WINCLIP_PRETRAINED="none",
                                            WINCLIP_PRECISION="fp32", TMPDIR=str(temp),
                                            GRADIO_TEMP_DIR=str(temp / "gradio")))
    try:
        query = tmp_path / "q.png"
        make_part(1, 64).image.save(query)
        _, verdict, *_ = client.predict(handle_file(str(query)), [], api_name="/detect")
        assert "This click took" in verdict
        (folder,) = temp.glob("winclip-outputs-*")
        assert any(folder.iterdir())  # the click's images
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        assert not folder.exists()
        left = sorted(p.name for p in (temp / "gradio").rglob("*") if p.is_file())  # the upload, the results
        assert left == sorted({Path(f).name for q, refs, *_ in app.example_rows() for f in (q, *refs)}), left
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)


@pytest.fixture()
def main_in_process(monkeypatch):
    """``app.main()`` called in this process: the statuses ``leave_now`` was called with (os._exit would end
    pytest itself), without the process-wide allocator settings, its SIGTERM handler undone afterwards."""
    left = []
    monkeypatch.setattr(app, "leave_now", lambda status=0: left.append(status))
    monkeypatch.setattr(app, "configure_process", lambda device: False)
    handler = signal.getsignal(signal.SIGTERM)
    yield left
    signal.signal(signal.SIGTERM, handler)


def hold_the_load(monkeypatch):
    """(loading, release): model loads from now on set ``loading`` and wait for ``release`` (at most 30 s)
    before they load: a load that takes as long as the test needs."""
    import threading

    loading, release = threading.Event(), threading.Event()
    load = WinClip.from_pretrained

    def held(*args, **kwargs):
        loading.set()
        release.wait(30)
        return load(*args, **kwargs)

    monkeypatch.setattr(WinClip, "from_pretrained", held)
    return loading, release


def test_a_stop_while_the_server_starts_closes_it_without_a_traceback(monkeypatch, main_in_process):
    """A stop (Ctrl+C, or SIGTERM through ``stop_on_sigterm``) that lands while launch() is still starting the
    server, before it waits for one: the KeyboardInterrupt went out of main() (a traceback, exit code 1;
    seen with SIGTERM 0 s after the server answered). Now main() closes the server and returns."""
    import urllib.request

    import gradio as gr

    from conftest import free_port

    started = []

    def stopped_first(demo):  # where launch() waits for a stop: the stop came first
        started.append(demo.local_url)
        urllib.request.urlopen(demo.local_url, timeout=10).close()  # the server was up
        assert demo.winclip_service.wait_for_model(60)  # loaded: nothing left running that main must leave
        raise KeyboardInterrupt

    monkeypatch.setattr(gr.Blocks, "block_thread", stopped_first)
    monkeypatch.setenv("GRADIO_SERVER_PORT", str(free_port()))
    try:
        app.main(["--model", TINY_CONFIG, "--pretrained", "none", "--precision", "fp32", "--host", "127.0.0.1"])
    except KeyboardInterrupt:
        pytest.fail("the stop went out of main()")
    assert started and not main_in_process
    with pytest.raises(OSError):  # closed
        urllib.request.urlopen(started[0], timeout=5).close()


def test_a_server_that_cannot_start_while_the_model_loads_says_why_and_exits_1(monkeypatch, main_in_process):
    """launch() failing (an address this machine does not have) while the model still loads: the process
    leaves without the interpreter's shutdown (``leave_now``), with status 1 and the error printed; the
    leaving first made it exit 0, printing only that it had stopped."""
    import gradio as gr

    def cannot_bind(*args, **kwargs):
        raise OSError("Cannot find empty port in range: 7911-8010.")

    _, release = hold_the_load(monkeypatch)
    monkeypatch.setattr(gr.Blocks, "launch", cannot_bind)
    try:
        with pytest.raises(OSError, match="empty port"):
            app.main(["--model", TINY_CONFIG, "--pretrained", "none", "--precision", "fp32"])
    finally:
        release.set()
    assert main_in_process == [1]


def test_output_hours_must_be_a_positive_number(monkeypatch):
    assert app.cache_schedule() == (600, 6 * 3600)  # looked at every 10 minutes, deleted after 6 hours
    for bad in ("abc", "0", "-1"):
        monkeypatch.setenv("WINCLIP_OUTPUT_HOURS", bad)
        with pytest.raises(SystemExit, match="WINCLIP_OUTPUT_HOURS=.*positive number"):
            app.cache_schedule()


def test_an_upload_deleted_from_the_server_says_upload_it_again(service, images, tmp_path):
    gone = tmp_path / "query.png"
    shutil.copy(images / "query.png", gone)
    service.detect(str(gone), [], DetectOptions())
    gone.unlink()  # as after WINCLIP_OUTPUT_HOURS, with the tab still open
    with pytest.raises(ValueError, match=r"query image \(query.png\): the uploaded file is no longer on the server"
                                         r" \(uploads are deleted after 6 hours, WINCLIP_OUTPUT_HOURS\); "
                                         r"upload it again"):
        service.detect(str(gone), [], DetectOptions())
    with pytest.raises(ValueError, match=r"query.png: the uploaded file is no longer on the server.*upload it again"):
        service.batch([str(gone), str(images / "good0.png")], [], DetectOptions(), tmp_path / "out")  # not a row error
    with pytest.raises(ValueError, match=r"query.png, q2.png: 2 uploaded files are no longer .*upload them again"):
        service.compare_prompts([str(gone), str(tmp_path / "q2.png")], [], DetectOptions())


def test_batch_outputs_histogram_counts_every_scored_image(service, tmp_path):
    inputs, run = service.batch([str(labelled_zip(tmp_path / "w.zip"))], [], DetectOptions(), tmp_path / "o")
    *rows, summary = list(run)
    text, gallery, hist, roc, table, downloads = app.batch_outputs(rows, summary, tmp_path / "o")
    import re

    counts = [int(c) for c in re.findall(r"<title>(?:good|defective|unlabelled): (\d+) in", hist)]
    assert sum(counts) == 5  # every scored image in a bar
    assert ">good</text>" in hist and ">defective</text>" in hist and ">unlabelled</text>" not in hist
    assert "threshold 0.500" in hist and "F1-optimal" in hist and "of 5 at or above" in hist  # the lines, drawn
    assert roc["visible"] and len(roc["value"]) >= 2 and len(gallery) == 5 and len(table["data"]) == 6
    assert "Image AUROC" in text
    shown = gr.Dataframe(interactive=False).postprocess(table)  # what the Batch table shows, and what the API gets
    header, rows_of = shown.headers, {row[0]: row for row in shown.data}
    for row, display in zip(shown.data, shown.metadata["display_value"]):
        cells = dict(zip(header, display))
        if row[header.index("status")] == "ok":
            assert isinstance(row[header.index("score")], float) and re.fullmatch(r"0\.\d{4}", cells["score"])
            assert re.fullmatch(r"\d\.\d{3}", cells["seconds"]) and cells["few_shot_score"] == "–"  # no references
        else:  # the unreadable file: its error, "–" where a value does not apply to it
            assert cells["score"] == cells["verdict"] == cells["peak_x"] == "–" and "not an image" in cells["error"]
    assert rows_of["w.zip/crack/0.png"][header.index("label")] == 1  # ints stay ints
    # an unlabelled run after it: its own legend, no stale groups, and no empty ROC box
    unlabelled = [replace(r, label=None) for r in rows]
    _, _, hist2, roc2, *_ = app.batch_outputs(unlabelled, replace(summary, metrics={}, curves={}), tmp_path / "o")
    assert ">unlabelled</text>" in hist2 and ">good</text>" not in hist2 and "F1-optimal" not in hist2
    assert roc2["visible"] is False and len(roc2["value"]) == 0


def test_batch_limits_and_empty_upload(service, tmp_path):
    with pytest.raises(ValueError, match="Upload images"):
        service.batch([], [], DetectOptions(), tmp_path)
    big = tmp_path / "many.zip"
    import zipfile

    with zipfile.ZipFile(big, "w") as zf:
        for i in range(201):
            zf.writestr(f"{i}.png", b"x")
    with pytest.raises(ValueError, match="at most 200"):
        service.batch([str(big)], [], DetectOptions(), tmp_path / "o")


def test_gradio_client_measure_prompts_same_numbers_as_the_cli(served, tmp_path):
    import json
    import zipfile

    from gradio_client import Client, handle_file

    from winclip import cli

    archive = labelled_zip(tmp_path / "washers.zip")
    client = Client(served, verbose=False, ssl_verify=False)
    summary, sets, prompts, words, current = client.predict(
        [handle_file(str(archive))], [], "washer", "crack", api_name="/measure_prompts")
    assert "5 images (3 good, 2 defective" in summary and "re-scored" in summary
    rows = {row[0]: row for row in sets["data"]}
    assert set(rows) == {"default", "current edit"}
    assert len(prompts["data"]) == (7 + 5) * 22 and words["data"][0][0] == "crack"
    assert json.loads(Path(current).read_text())["defect_words"] == ["crack"]
    again, *_ = client.predict([handle_file(str(archive))], [], "washer", "crack", api_name="/measure_prompts")
    assert "from the cache" in again
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp_path / "x")
    custom = tmp_path / "current.json"
    custom.write_text(Path(current).read_text())
    assert cli.main(["prompts", "--labelled", str(tmp_path / "x"), "--object", "washer", "--sets", "default",
                     str(custom), "--out", str(tmp_path / "o"), "--model", TINY_CONFIG, "--pretrained", "none",
                     "--device", "cpu", "--precision", "fp32"]) == 0
    report = json.loads((tmp_path / "o" / "prompts.json").read_text())
    for result, name in zip(report["sets"], ("default", "current edit")):
        assert rows[name][1] == pytest.approx(result["zero_shot"]["auroc"], abs=1e-4)
        assert rows[name][5] == pytest.approx(result["pixel"]["pauroc"], abs=1e-4)


def test_gradio_client_inspect_with_musc(served, tmp_path):
    from gradio_client import Client, handle_file

    archive = labelled_zip(tmp_path / "washers.zip")
    client = Client(served, verbose=False, ssl_verify=False)
    work_folders = set(Path(tempfile.gettempdir()).glob("winclip-batch-*"))
    summary, gallery, hist, roc, table, downloads = client.predict(
        [handle_file(str(archive))], [], "washer", "", 2, 3, True, 0.5, True, "", "", "", "two_class", "harmonic",
        "MuSc", api_name="/inspect")
    assert "5 scored" in summary and "MuSc" in summary and "Image AUROC" in summary
    assert len(gallery) == 5
    assert set(Path(tempfile.gettempdir()).glob("winclip-batch-*")) == work_folders  # removed after the run
    small = tmp_path / "small.zip"
    import zipfile

    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(small, "w") as dst:
        for name in [n for n in src.namelist() if "/good/" in n][:3]:
            dst.writestr(name, src.read(name))
    with pytest.raises(Exception, match="at least 5"):
        client.predict([handle_file(str(small))], [], "washer", "", 2, 3, True, 0.5, True, "", "", "", "two_class",
                       "harmonic", "MuSc", api_name="/inspect")


def test_prewarm_leaves_only_scoring_for_the_click(images, monkeypatch):
    s = DetectionService(TINY)
    assert s.load()
    refs = [str(images / "good2.png"), str(images / "good3.png")]
    opts = DetectOptions(object_name="gasket", defect_words=("dent",))
    assert s.prewarm(str(images / "query.png"), refs, opts) == "prepared: prompts, 2 references, query"
    detector = s.detector_for(opts)
    monkeypatch.setattr(type(detector), "encode", lambda *a, **k: pytest.fail("image encoded at click time"))
    monkeypatch.setattr(type(detector), "encode_prompts", lambda *a, **k: pytest.fail("prompts encoded at click"))
    result = s.detect(str(images / "query.png"), refs, opts)
    assert result.shots == 2
    assert s.prewarm(str(images / "missing.png"), [], opts).startswith("not prepared")


def test_a_click_during_the_upload_warm_up_counts_the_wait(images):
    """The warm-up started by an upload has its own queue, so a click made during it starts at once and
    waits inside the handler, where the verdict counts the wait (in the shared queue it waited unseen:
    the browser benchmark's first click took 23 s while its verdict said 0.21 s)."""
    import threading

    s = DetectionService(TINY)
    assert s.load()
    demo = app.build_demo(s)
    queues = {f.fn.__name__: f.concurrency_id for f in demo.fns.values() if f.fn}  # not the browser-only ones
    assert queues["prewarm"] == "warm-up" and queues["detect"] == "model"
    refs = [str(images / "good2.png"), str(images / "good3.png")]
    opts = DetectOptions(object_name="gasket")
    detector = s.detector_for(opts)
    real = detector.encode
    entered = threading.Event()

    def slow_encode(*args, **kwargs):  # the references' encoding, one image at a time
        entered.set()
        time.sleep(1.5)
        return real(*args, **kwargs)

    detector.encode = slow_encode
    warm = threading.Thread(target=s.prewarm, args=(str(images / "query.png"), refs, opts))
    warm.start()
    assert entered.wait(30)
    result = s.detect(str(images / "query.png"), refs, opts)
    warm.join()
    assert result.steps["encoding begun at upload"] >= 1.0 and "waiting for other requests" not in result.steps
    again = s.detect(str(images / "query.png"), refs, opts)  # nothing warming now
    assert "encoding begun at upload" not in again.steps and again.steps["waiting for other requests"] < 0.5


def test_repeat_click_does_not_decode_the_same_image_again(images, tmp_path, monkeypatch):
    import shutil

    from winclip import requests as requests_module

    s = DetectionService(TINY)
    assert s.load()
    query = tmp_path / "q.png"
    shutil.copy(images / "query.png", query)
    decoded = []
    real = requests_module.load_image
    monkeypatch.setattr(requests_module, "load_image", lambda src, *a, **k: decoded.append(src) or real(src, *a, **k))
    opts = DetectOptions(object_name="washer")
    first = s.detect(str(query), [str(images / "good0.png")], opts)
    again = s.detect(str(query), [str(images / "good0.png")], replace(opts, threshold=0.3))
    assert len(decoded) == 2 and again.score == first.score  # query and reference, once each
    elsewhere = tmp_path / "upload2" / "q.png"  # an API client uploads the same file anew, to a fresh path
    elsewhere.parent.mkdir()
    shutil.copy(query, elsewhere)
    third = s.detect(str(elsewhere), [str(images / "good0.png")], opts)
    assert len(decoded) == 2 and third.score == first.score
    make_part(99, 200, "spot").image.save(query)  # the same path with other content is decoded again
    changed = s.detect(str(query), [], opts)
    assert len(decoded) == 3 and changed.overlay.size == (200, 200)


def test_batch_in_bounded_chunks_gives_the_rows_and_summary_of_one_run(service, tmp_path):
    """The app's batch goes through ``chunk`` (one ZeroGPU call each on a Space): a threshold call, then
    at most ``max_chunk`` images per call; rows, metrics and files equal those of a single run."""
    from winclip.inspection import Summary
    from winclip.service import DetectOptions

    archive = labelled_zip(tmp_path / "w.zip")
    calls = []

    def chunk(action, *args):
        calls.append((action, len(args[0])))
        return getattr(service, action)(*args)

    results = {}
    for name, kwargs in (("whole", {}), ("chunked", {"chunk": chunk, "max_chunk": 2})):
        _, run = service.batch([str(archive)], [], DetectOptions(object_name="washer"), tmp_path / name, **kwargs)
        results[name] = list(run)
    assert calls == [("batch_setup", 0), ("batch_rows", 2), ("batch_rows", 2), ("batch_rows", 2)]
    whole, chunked = results["whole"], results["chunked"]
    assert [r.file for r in whole[:-1]] == [r.file for r in chunked[:-1]]
    assert [r.score for r in whole[:-1]] == pytest.approx([r.score for r in chunked[:-1]], abs=1e-6)
    assert isinstance(chunked[-1], Summary)
    assert chunked[-1].metrics["image"] == pytest.approx(whole[-1].metrics["image"])
    assert (tmp_path / "chunked" / "results" / "report.html").is_file()


def test_threshold_move_redraws_the_verdict_and_mask_without_the_model(service, images):
    from winclip.visualize import mask_overlay

    demo = app.build_demo(service)
    detect = next(f.fn for f in demo.fns.values() if f.name == "detect")
    rethreshold = next(f.fn for f in demo.fns.values() if f.name == "rethreshold")
    *_, last = detect(str(images / "query.png"), [], "washer", "", 2, 3, True, 0.5, progress=lambda *a, **k: None)
    calls = []
    service.detect, real = (lambda *a, **k: calls.append(a)), service.detect  # a threshold move must not score
    try:
        low_box, low, low_mask = rethreshold(last, 0.0)
        high_box, high, high_mask = rethreshold(last, 1.0)
    finally:
        service.detect = real
    assert not calls
    # the score box's headline is the verdict at the threshold (gr.Label headlined the longer bar: "normal" for
    # any score under 0.5, whatever the threshold); its bars stay the score
    score_box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "score")
    assert score_box.postprocess(low_box).label == "anomalous" and score_box.postprocess(high_box).label == "normal"
    bars = {c.label: c.confidence for c in score_box.postprocess(high_box).confidences}
    assert bars == {"anomalous": pytest.approx(last["score"]), "threshold": 1.0}  # the score beside the threshold
    for box in (low_box, high_box):  # the score's bar first whichever is longer (gr.Label put the longer first)
        assert [c.label for c in score_box.postprocess(box).confidences] == ["anomalous", "threshold"]
    assert low.startswith("**ANOMALOUS**") and high.startswith("**NORMAL**") and "vs threshold 1.0000" in high
    # the verdict says how much of the image the drawn region covers, and why it is empty when it is
    amap = demo.winclip_held.get(last)[1]
    assert "region at or above it: **100.0%** of the image" in low
    assert f"region at or above it: **none** (the map's highest value is {amap.max():.4f})" in high
    _, middle, _ = rethreshold(last, float(np.median(amap)))
    assert re.search(r"region at or above it: \*\*(49\.\d|50\.\d)%\*\* of the image", middle), middle

    def jpeg(image):
        import io

        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG")
        return np.asarray(Image.open(buffer))

    for mask, threshold in ((low_mask, 0.0), (high_mask, 1.0)):  # files, as JPEG (see app.OutputFiles)
        expected = jpeg(mask_overlay(*demo.winclip_held.get(last), threshold))
        assert np.array_equal(expected, np.asarray(Image.open(mask)))
    assert not np.array_equal(np.asarray(Image.open(low_mask)), np.asarray(Image.open(high_mask)))


def test_measurement_in_bounded_chunks_gives_the_numbers_of_one_pass(tmp_path):
    """The playground's measurement through ``chunk`` (one ZeroGPU call each on a Space): the labelled set
    encoded at most ``max_chunk`` images per call, then one call for the measurements; same table."""
    archive = labelled_zip(tmp_path / "w.zip")
    results, calls = {}, []
    for name, kwargs in (("whole", {}), ("chunked", {"max_chunk": 2})):
        svc = DetectionService(Settings(TINY_CONFIG, None, "cpu", "fp32"))  # its own cache of encoded sets
        assert svc.load()

        def chunk(action, *args, svc=svc):
            calls.append(action)
            return getattr(svc, action)(*args)

        results[name] = svc.compare_prompts([str(archive)], [], DetectOptions(object_name="washer"),
                                            chunk=chunk, **kwargs)
        if name == "chunked":
            again = svc.compare_prompts([str(archive)], [], DetectOptions(object_name="washer"), chunk=chunk,
                                        **kwargs)
    # whole: one part, then measure; chunked: 6 files in parts of 2, then measure; again: cached, measure only
    assert calls == ["labelled_part", "measure_sets"] + ["labelled_part"] * 3 + ["measure_sets"] * 2
    assert results["whole"].sets == results["chunked"].sets == again.sets
    assert results["whole"].prompts == results["chunked"].prompts and again.encode_seconds == 0.0
    assert results["chunked"].images == 5 and len(results["chunked"].errors) == 1  # the unreadable file


@pytest.mark.slow
def test_identical_requests_at_once_all_get_complete_images(served, images):
    """8 clients x 12 identical /detect requests, 3 bursts: every returned image downloads whole and
    decodes (a PIL output used to be rewritten in place under its content hash while being downloaded)."""
    import threading

    from gradio_client import Client, handle_file

    outcomes: list[str] = []
    lock = threading.Lock()

    def client_run():
        # ssl_verify=False: plain http on loopback either way, but with it gradio_client no longer loads the CA
        # bundle for every upload and download (36 ms each here): the suite's slowest test took 97 s with it
        client = Client(served, verbose=False, ssl_verify=False)
        for _ in range(12):
            try:
                _, _, overlay, mask, gallery = client.predict(handle_file(str(images / "query.png")), [], "washer",
                                                              "crack", api_name="/detect")
                for path in [overlay, mask] + [item["image"] for item in gallery]:
                    with Image.open(path) as im:
                        im.load()  # the whole file, decoded
                result = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure is counted and shown
                result = f"{type(exc).__name__}: {exc}"
            with lock:
                outcomes.append(result)

    for _burst in range(3):
        threads = [threading.Thread(target=client_run) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    failures = [o for o in outcomes if o != "ok"]
    assert len(outcomes) == 288 and not failures, failures[:5]


def test_notes_with_angle_brackets_are_shown_as_written(service, tmp_path):
    """A note such as 'masks/<defect>/<stem>.png' reaches the Markdown escaped, not as an HTML tag."""
    from winclip.inspection import Summary

    summary = Summary(counts={"scored": 0, "errors": 0, "anomalous": 0}, threshold={"value": 0.5, "how": "given"},
                      metrics={"pixel_skipped": "no masks found (masks/<defect>/<stem>.png)"}, curves={},
                      timing={"images_per_s": 0}, settings={}, notes=["see <defect> folders"])
    (tmp_path / "results").mkdir()
    text, *_ = app.batch_outputs([], summary, tmp_path)
    assert "masks/&lt;defect&gt;/&lt;stem&gt;.png" in text and "see &lt;defect&gt; folders" in text
    assert "<defect>" not in text


def test_the_suggested_threshold_applies_in_one_click(service, images):
    demo = app.build_demo(service)
    fns = {f.name: f.fn for f in demo.fns.values() if f.name}
    refs = [str(images / "good0.png"), str(images / "good1.png")]
    *_, last = fns["detect"](str(images / "query.png"), refs, "washer", "", 2, 3, True, 0.5,
                             progress=lambda *a, **k: None)
    assert last["suggested"] is not None
    button = fns["suggestion_button"](last)
    assert button["visible"] and f"{last['suggested']:.4f}" in button["value"]
    value, box, verdict, mask = fns["apply_suggested"](last)
    assert value == pytest.approx(last["suggested"], abs=5e-5) and f"vs threshold {value:.4f}" in verdict
    assert box["verdict"] == ("anomalous" if last["score"] >= value else "normal")
    assert Image.open(mask).size == Image.open(images / "query.png").size
    *_, zero_shot = fns["detect"](str(images / "query.png"), [], "washer", "", 2, 3, True, 0.5,
                                  progress=lambda *a, **k: None)
    assert fns["suggestion_button"](zero_shot)["visible"] is False  # no references, no suggestion, no button


def test_stop_keeps_the_rows_so_far_and_says_so(service, tmp_path):
    """Stop during a Batch run: the run ends after the current row; the table, results.csv, summary.json
    and report.html hold the rows scored so far, and the summary says 'Stopped after n of N'."""
    demo = app.build_demo(service)
    fns = {f.name: f.fn for f in demo.fns.values() if f.name}
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(12):
        make_part(70 + i, 120).image.save(folder / f"p{i:02d}.png")
    files = [str(p) for p in sorted(folder.iterdir())]
    run = fns["inspect"](files, [], "washer", "", 2, 3, True, 0.5, True, progress=lambda *a, **k: None)
    preparing = next(run)  # the previous run's outputs cleared, saying what happens
    assert preparing[0].startswith("Preparing") and preparing[1] == [] and preparing[4] is None
    outputs = next(run)  # the first 8 rows are in
    fns["stop_batch"]()  # the Stop button (same session: "local" without a browser)
    last = outputs
    for last in run:  # the files are read before the generator goes on, as Gradio copies them
        if last[5]:
            break
    text, gallery, hist, roc, table, downloads = last
    assert text.startswith("**Stopped after 8 of 12 files") and len(table["data"]) == 8 and len(gallery) == 8
    csv_file = next(d for d in downloads if d.endswith("results.csv"))
    assert len(Path(csv_file).read_text().strip().splitlines()) == 1 + 8
    report = next(d for d in downloads if d.endswith("report.html"))
    assert "stopped after 8 of 12" in Path(report).read_text()
    assert next(run, None) is None and not Path(csv_file).exists()  # then the run's work folder goes


def small_parts(tmp_path: Path, count: int) -> list[Path]:
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(count):
        make_part(i, 64).image.save(folder / f"p{i:02d}.png")
    return sorted(folder.iterdir())


def test_batch_rows_stream_and_stop_is_heard_within_a_batch(service, tmp_path, monkeypatch):
    """Off ZeroGPU the Batch tab's rows come as they are scored: after the first 8 rows, Stop leaves most of
    a 40-image set unencoded (in ZeroGPU-sized chunks all of the first 32 were encoded before any row came,
    so the bar stood still and Stop waited for them)."""
    fns = {f.name: f.fn for f in app.build_demo(service).fns.values() if f.name}
    files = small_parts(tmp_path, 40)
    encoded = spy_on_encoding(monkeypatch)
    run = fns["inspect"]([str(p) for p in files], [], "washer", "", 2, 3, True, 0.5, True,
                         progress=lambda *a, **k: None)
    next(run)  # preparing
    assert next(run)[0] == "Inspecting… 8/40 files done."
    fns["stop_batch"]()
    *_, last = run
    assert last[0].startswith("**Stopped after 8 of 40 files")
    assert sum(encoded) <= 8 + 3 * 4, encoded  # the rows shown, a queue of 4 and the batches under way


def test_a_click_during_a_long_batch_waits_for_one_batch_not_the_run(served, images, tmp_path, monkeypatch):
    """A Batch run has a queue of its own and lets interactive requests in between its batches: a Detect click
    made during a run is answered while the run goes on (it waited in the queue for the whole run)."""
    from gradio_client import Client, handle_file

    files = small_parts(tmp_path, 24)
    calls = spy_on_encoding(monkeypatch, seconds=0.4)  # a batch of 4 takes 0.4 s: the run about 2.4 s
    client = Client(served, verbose=False, ssl_verify=False)
    job = client.submit([handle_file(str(p)) for p in files], [], "washer", "", api_name="/inspect")
    deadline = time.monotonic() + 60
    while not calls and time.monotonic() < deadline:  # the run has started encoding
        time.sleep(0.05)
    assert calls, "the batch did not start"
    label, verdict, *_ = client.predict(handle_file(str(images / "query.png")), [], "washer", "", api_name="/detect")
    batch_calls_then = len(calls) - 1  # the click's own encoding was one call
    assert "This click took" in verdict and not job.done()  # answered while the run goes on
    assert batch_calls_then < 6
    summary = job.result()[0]
    assert "24 scored" in summary


def test_the_verdict_says_where_the_click_time_went(tmp_path):
    """A first click with new references says what it waited for (encoding references and prompts), not
    only the scoring; the stages are reported to the progress bar as they start."""
    svc = DetectionService(Settings(TINY_CONFIG, None, "cpu", "fp32"))
    assert svc.load()
    fns = {f.name: f.fn for f in app.build_demo(svc).fns.values() if f.name}
    query, refs = tmp_path / "q.png", [tmp_path / f"r{i}.png" for i in range(2)]
    make_part(1, 120, "crack").image.save(query)
    for i, r in enumerate(refs):
        make_part(2 + i, 120).image.save(r)
    seen = []

    def progress(value=None, desc=None, **kwargs):
        seen.append((value, desc))

    _, verdict, *_ = fns["detect"](str(query), [str(r) for r in refs], "washer", "", 2, 3, True, 0.5,
                                   progress=progress)
    assert "This click took" in verdict and "on the server" in verdict
    stages = [d for _, d in seen if d]
    assert stages[:2] == ["Reading the images…", "Text prompts…"] and "Encoding 2 references…" in stages
    assert all(done <= total for (done, total), _ in [(v, d) for v, d in seen if isinstance(v, tuple)])
    r = svc.detect(str(query), [str(r) for r in refs], DetectOptions(object_name="washer"))
    assert sum(r.steps.values()) <= r.seconds + 1e-3 and "scoring" in r.steps  # a repeat: all cached
    assert r.steps.get("encoding 2 references", 0.0) < 0.05


def test_a_click_during_the_load_counts_the_wait(tmp_path, monkeypatch):
    """A click that arrives while the model loads waits for it, and its verdict says so: the time shown is
    what the person waited once the click reached the model, not only the detect step."""
    from winclip import hosting

    real = hosting.WinClip.from_pretrained

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(hosting.WinClip, "from_pretrained", slow)
    svc = DetectionService(Settings(TINY_CONFIG, None, "cpu", "fp32"))
    fns = {f.name: f.fn for f in app.build_demo(svc).fns.values() if f.name}
    query = tmp_path / "q.png"
    make_part(1, 120, "crack").image.save(query)
    svc.start_loading()
    _, verdict, *_ = fns["detect"](str(query), [], "washer", "", 2, 3, True, 0.5, progress=lambda *a, **k: None)
    total = float(re.search(r"This click took \*\*([\d.]+) s\*\*", verdict).group(1))
    wait = float(re.search(r"waiting for the model to load ([\d.]+) s", verdict).group(1))
    assert 1.0 <= wait <= total, verdict
    _, again, *_ = fns["detect"](str(query), [], "washer", "", 2, 3, True, 0.5, progress=lambda *a, **k: None)
    assert "waiting for the model" not in again  # loaded: nothing to wait for


def test_tables_show_every_number_with_the_same_decimals_and_keep_them_numbers(service, images, tmp_path):
    """0.5 beside 0.4167, 0.47775 beside 0.4658: the playground's tables showed each number as it rounded.
    Now every number in a column has the same decimals and a value that does not apply reads "–"; the cells
    stay numbers, so a header click sorts them as numbers (-0.13 before -0.05) and the API returns them."""
    table = gr.Dataframe(interactive=False).postprocess(
        app.number_table([["a", 0.5, None, 3], ["b", -0.41666, 0.2, None]], ["name", "x", "y", "count"]))
    assert table.metadata["display_value"] == [["a", "0.5000", "–", "3"], ["b", "-0.4167", "0.2000", "–"]]
    assert table.data == [["a", 0.5, None, 3], ["b", -0.41666, 0.2, None]]
    fns = {f.name: f.fn for f in app.build_demo(service).fns.values() if f.name}
    _, sets, prompts, words, _ = fns["measure"]([str(labelled_zip(tmp_path / "w.zip"))], [], "washer", "")
    _, scores, word_scores = fns["explain"](str(images / "query.png"), "washer", "crack, dent", 2, 3, True, "", "",
                                             "", "two_class", "harmonic")
    for styled in (sets, prompts, words, scores, word_scores):
        shown = gr.Dataframe(interactive=False).postprocess(styled)
        for row, display in zip(shown.data, shown.metadata["display_value"]):
            for value, text in zip(row, display):
                if value is None:
                    assert text == "–"
                elif isinstance(value, float):
                    assert re.fullmatch(r"-?\d\.\d{4}", text), (shown.headers, row, display)
    shown = gr.Dataframe(interactive=False).postprocess(sets)
    assert shown.headers[4] == "WinCLIP+ AUROC" and [row[4] for row in shown.data] == [None, None]  # no references
    assert shown.metadata["display_value"][0][4] == "–"
    assert gr.Dataframe(interactive=False).postprocess(words).data == [[app.NO_WORDS, None, None, None]]


def test_measure_with_a_suggestion_shows_it_or_why_not(service, tmp_path):
    """The playground's suggestion (a typed Suggestion): its held-out figures, or why there is none."""
    import zipfile

    fns = {f.name: f.fn for f in app.build_demo(service).fns.values() if f.name}
    summary, *_ = fns["measure"]([str(labelled_zip(tmp_path / "w.zip"))], [], "washer", "", 2, 3, True, "", "", "",
                                 "two_class", "harmonic", [], [], True)
    assert "**Suggested pruned set**" in summary and "measured on the other 2 (held out)" in summary
    assert "Normal states: " in summary
    tiny_set = tmp_path / "tiny.zip"  # 2 good, 1 defective: one half would hold a single class
    with zipfile.ZipFile(tiny_set, "w") as zf:
        parts = (("good/0.png", 500, "none"), ("good/1.png", 501, "none"), ("crack/0.png", 502, "crack"))
        for name, seed, defect in parts:
            path = tmp_path / name.replace("/", "_")
            make_part(seed, 160, defect).image.save(path)
            zf.write(path, f"parts/{name}")
    summary, *_ = fns["measure"]([str(tiny_set)], [], "washer", "", 2, 3, True, "", "", "", "two_class", "harmonic",
                                 [], [], True)
    assert "Suggestion skipped: too few images of each class" in summary


def test_musc_reports_its_steps_on_the_bar_before_any_row(service, tmp_path):
    """MuSc scores the set as a whole, so no row comes until the end: the one bar says which step it is in
    (encoding k of N, scoring the set, drawing k of N) instead of sitting at 0 until the results appear."""
    demo = app.build_demo(service)
    fns = {f.name: f.fn for f in demo.fns.values() if f.name}
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(9):
        make_part(90 + i, 120, "none" if i % 3 else "scratch").image.save(folder / f"p{i:02d}.png")
    seen = []

    def progress(value=None, desc=None, **kwargs):
        seen.append((value, desc))

    *_, (summary, *_) = fns["inspect"]([str(p) for p in sorted(folder.iterdir())], [], "washer", "", 2, 3, True, 0.5,
                                       True, "", "", "", "two_class", "harmonic", "MuSc", progress=progress)
    assert "9 scored" in summary
    descs = [d for _, d in seen if d]
    first_row = next(i for i, d in enumerate(descs) if d.startswith("Scored"))
    before = descs[:first_row]
    encoded = [v for v, d in seen if d and "encoded" in d]
    assert encoded and encoded[-1] == (9, 9) and encoded == sorted(encoded)  # k of N, rising to N
    assert any(d == "MuSc: scoring the 9 images against each other…" for d in before)
    assert any(d == "MuSc: drew 9 of 9 maps…" for d in before)
    assert before.index("MuSc: scoring the 9 images against each other…") > before.index("MuSc: encoded 9 of 9 images…")


def test_detect_results_are_held_bounded_outside_the_sessions_state(service, images):
    """A session's gr.State gets a key and the verdict's small fields; the image and map stay in one
    server-side store bounded in bytes (Gradio keeps every session's State: an image and map there grew the
    server ~6 MB per session at 900 px). A dropped result says so on a threshold move instead of failing."""
    import pickle

    demo = app.build_demo(service)
    fns = {f.name: f.fn for f in demo.fns.values() if f.name}
    held = demo.winclip_held
    first = fns["detect"](str(images / "query.png"), [], "washer", "", 2, 3, True, 0.5,
                          progress=lambda *a, **k: None)[-1]
    assert "image" not in first and "map" not in first and len(pickle.dumps(first)) < 4096
    image, anomaly_map = held.get(first)
    one = image.width * image.height * 3 + anomaly_map.nbytes
    held.max_bytes = int(2.5 * one)  # room for two results
    states = [fns["detect"](str(images / "query.png"), [], "washer", "", 2, 3, True, 0.5,
                            progress=lambda *a, **k: None)[-1] for _ in range(4)]
    assert held.held_bytes() <= held.max_bytes and len(held._items) == 2
    assert held.get(first) is None and held.get(states[-1]) is not None
    _, verdict, mask = fns["rethreshold"](first, 0.3)
    assert "no longer held" in verdict and "vs threshold 0.3000" in verdict
    _, verdict, mask = fns["rethreshold"](states[-1], 0.3)
    assert "no longer held" not in verdict and Image.open(mask).size == image.size


def test_the_server_prepares_its_examples_so_a_first_click_on_one_encodes_nothing(images, monkeypatch):
    """A server started as app.py starts it encodes its examples (prompts, references, queries) once the model
    is up, so a person's first Detect on an example costs scoring and drawing (real model, int8, 2-core
    EPYC: 0.29 s; it was 5.6 s, and 15.2 s in fp32). The clicks send what the page sends: the settings at
    their start values, whose prompts are prepared too (a first upload encodes only its image)."""
    from gradio_client import Client, handle_file

    demo = started_as_app_py(monkeypatch)
    svc = demo.winclip_service
    assert re.search(r"the start prompts and 3 examples prepared in [\d.]+ s", svc.status()), svc.status()
    encoded, prompts = spy_on_encoding(monkeypatch), spy_on_prompts(monkeypatch)
    left_out, loo = [], WinClip.leave_one_out_scores
    monkeypatch.setattr(WinClip, "leave_one_out_scores", lambda self, *a, **k: left_out.append(1) or loo(self, *a, **k))
    with serve(demo) as url:
        client = Client(url, verbose=False, ssl_verify=False)
        for query, refs, name, words in app.example_rows():
            _, verdict, *_ = client.predict(handle_file(query), [handle_file(r) for r in refs], name, words,
                                            api_name="/detect")
            assert "This click took" in verdict and "encoding" not in verdict
        assert encoded == [] and prompts == []
        client.predict(handle_file(str(images / "query.png")), [], api_name="/detect")  # the start settings
    assert encoded == [1] and prompts == []
    assert left_out == []  # the examples' suggested thresholds were prepared too


def test_preparing_the_examples_lets_a_click_in_between_its_steps(images, monkeypatch):
    """The examples are prepared one step (prompts, references, a query) at a time, each once no click waits:
    a click made meanwhile waits for one step, not for all of them."""
    s = DetectionService(TINY)
    assert s.load()
    examples = [(str(images / f"good{i}.png"), [], DetectOptions(object_name="washer")) for i in range(4)]
    calls = spy_on_encoding(monkeypatch, seconds=0.6)  # the four queries: about 2.4 s
    thread = s.prepare(examples, "4 examples")
    deadline = time.monotonic() + 30
    while not calls and time.monotonic() < deadline:  # the preparation has started encoding
        time.sleep(0.02)
    result = s.detect(str(images / "query.png"), [], DetectOptions(object_name="washer"))
    assert s.preparing and len(calls) <= 3, calls  # the click was answered between two of the four
    assert result.steps["waiting for other requests"] < 1.5
    thread.join(30)
    assert "4 examples prepared" in s.status() and s.prepare(examples, "again") is None  # once per server


def test_a_stopping_server_ends_its_background_work_after_the_step_under_way(images, monkeypatch):
    """``stop_background`` (app.py's main, as the server stops): the preparation takes no further step and the
    step under way finishes before it returns, so no model work runs while the interpreter shuts down."""
    s = DetectionService(TINY)
    assert s.load()
    s.quiet_s = 0.0
    examples = [(str(images / f"good{i}.png"), [], DetectOptions(object_name="washer")) for i in range(4)]
    calls = spy_on_encoding(monkeypatch, seconds=0.6)
    thread = s.prepare(examples, "4 examples")
    deadline = time.monotonic() + 30
    while not calls and time.monotonic() < deadline:  # a step is under way
        time.sleep(0.02)
    assert s.stop_background(timeout=30)
    done = len(calls)
    thread.join(30)
    assert not thread.is_alive() and len(calls) == done < 4, calls  # nothing after the stop
    assert "4 examples not prepared: the server stopped" in s.status()


def test_a_server_stopped_while_the_model_loads_says_the_load_is_still_running(monkeypatch):
    """The load is native code in a thread of its own (seconds; with int8, compiling too): a stop meanwhile
    says so (app.py then leaves without the interpreter's shutdown, which the load ended with SIGABRT,
    2 of 2 stops 0.5 and 2 s after a real-size server answered) instead of waiting for it."""
    loading, release = hold_the_load(monkeypatch)
    s = DetectionService(TINY)
    thread = s.start_loading()
    assert loading.wait(30)
    assert not s.stop_background(timeout=30, grace=0.2)
    release.set()
    thread.join(30)
    assert s.stop_background(timeout=30, grace=0.2)


def test_clicks_in_quick_succession_do_not_wait_for_the_preparation(images, monkeypatch):
    """Background work takes a step only after ``quiet_s`` without a click: clicks 0.3 s apart find the model
    free (before, the preparation took a step in each gap and the next click waited for it), and the
    preparation resumes once the clicks stop."""
    s = DetectionService(TINY)
    assert s.load()
    s.quiet_s = 1.5
    examples = [(str(images / f"good{i}.png"), [], DetectOptions(object_name="washer")) for i in range(4)]
    calls = spy_on_encoding(monkeypatch, seconds=1.0)  # each image encoded takes 1 s longer
    thread = s.prepare(examples, "4 examples")
    deadline = time.monotonic() + 30
    while not calls and time.monotonic() < deadline:  # the preparation has started encoding
        time.sleep(0.02)
    waits = []
    for _ in range(4):  # the first click waits for the step under way and encodes its query; then cached
        result = s.detect(str(images / "query.png"), [], DetectOptions(object_name="washer"))
        waits.append(result.steps["waiting for other requests"])
        time.sleep(0.3)
    assert len(calls) == 2 and s.preparing, calls  # the step under way and the first click's query: no more
    assert max(waits[1:]) < 0.2, waits
    thread.join(30)
    assert "4 examples prepared" in s.status() and len(calls) == 5


def test_a_click_that_waited_for_the_load_goes_before_the_preparation(images, monkeypatch):
    """A freshly started server: a click made while the model loads is answered first when the load ends,
    not after a step of the examples' preparation (which the same start asked for)."""
    from winclip import hosting

    real = hosting.WinClip.from_pretrained

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(hosting.WinClip, "from_pretrained", slow)
    s = DetectionService(TINY)
    s.quiet_s = 1.5
    s.start_loading()
    thread = s.prepare([(str(images / f"good{i}.png"), [], DetectOptions(object_name="washer")) for i in range(2)],
                       "2 examples")
    calls = spy_on_encoding(monkeypatch, seconds=1.0)
    result = s.detect(str(images / "query.png"), [], DetectOptions(object_name="washer"))  # waits for the load
    assert calls == [1] and result.steps["waiting for other requests"] < 0.2, (calls, result.steps)
    thread.join(30)
    assert "2 examples prepared" in s.status() and len(calls) == 3


def test_examples_that_cannot_be_prepared_say_why_and_clicks_still_work(images, tmp_path):
    s = DetectionService(TINY)
    assert s.load()
    s.prepare([(str(tmp_path / "gone.png"), [], DetectOptions())], "1 example").join(30)
    assert "1 example not prepared (ValueError: query image" in s.status()
    assert s.detect(str(images / "query.png"), [], DetectOptions()).verdict in ("normal", "anomalous")


def test_what_was_prepared_for_the_examples_stays_however_busy_the_server_gets(images, tmp_path, monkeypatch):
    """The examples' features, reference memory and prompts are kept for good: after more other queries,
    reference sets and object names than the caches hold (a busy Space), a click on an example still
    encodes nothing, while the others' entries are evicted as before."""
    from winclip.detector import PROTOTYPE_CACHE_SIZE
    from winclip.service import MAX_IMAGE_CACHE, MAX_REFERENCE_CACHE

    s = DetectionService(TINY)
    assert s.load()
    query, refs = str(images / "query.png"), [str(images / "good0.png"), str(images / "good1.png")]
    example = DetectOptions(object_name="washer", defect_words=("crack",))
    s.prepare([(query, refs, example)], "1 example").join(60)
    rng = np.random.default_rng(0)
    others = []
    for i in range(MAX_IMAGE_CACHE + 2):
        others.append(tmp_path / f"other{i}.png")
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(others[-1])
    assert len(others) > max(MAX_REFERENCE_CACHE, PROTOTYPE_CACHE_SIZE)
    for i, other in enumerate(others):  # a new query, reference set and object name each
        s.detect(str(other), [str(others[i - 1])] if i else [], DetectOptions(object_name=f"part {i}"))
    encoded, prompts = spy_on_encoding(monkeypatch), spy_on_prompts(monkeypatch)
    result = s.detect(query, refs, example)
    assert encoded == [] and prompts == [] and result.shots == 2
    s.detect(str(others[0]), [], DetectOptions(object_name="part 0"))
    assert encoded == [1]  # an early other query was evicted: the caches stay bounded


def test_a_reference_set_with_one_image_more_encodes_only_that_one(images, monkeypatch):
    """Reference memories are built from each image's cached features: adding a third reference encodes one
    image, not three, and scores as the library's memory of the three in one batch does."""
    from winclip.images import load_image

    s = DetectionService(TINY)
    assert s.load()
    refs = [str(images / f"good{i}.png") for i in range(3)]
    opts = DetectOptions(object_name="washer", defect_words=("crack",))
    s.detect(str(images / "query.png"), refs[:2], opts)
    calls = spy_on_encoding(monkeypatch)
    result = s.detect(str(images / "query.png"), refs, opts)
    assert calls == [1] and result.shots == 3  # the new reference; the query and the other two from the cache
    detector = s.detector_for(opts)
    memory = detector.memory_for([load_image(r).image for r in refs])  # the library: one batch of three
    features = detector.encode(detector.preprocess(load_image(str(images / "query.png")).image)[None])
    expected = detector.score(features, detector.prototypes_for(s.ensemble(opts, detector)), references=memory)
    assert float(expected.image_scores[0]) == pytest.approx(result.score, abs=1e-6)
