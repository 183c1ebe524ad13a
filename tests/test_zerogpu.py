"""ZeroGPU for real, on a CPU: app.py started as a ZeroGPU Space (the real `spaces` package, its fake-CUDA
mode, its worker fork and pickling; a loopback device API and a CPU shim for CUDA initialisation and the
host-to-device copy, see zerogpu_stub.py).

- real-size weights (ViT-B-16-plus-240, random, saved to a file) load on "cuda" and every tensor is
  packed for the GPU; /detect, /explain_prompts, /inspect (WinCLIP and MuSc) and /measure_prompts answer;
- no call asks for more than GPU_MAX_SECONDS, batches go in bounded calls, threshold moves make none;
- a visitor whose quota is short gets the quota message (what ran out, when it refills, how to get
  more), never a stack trace; auto's precision check runs inside the first GPU call.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, free_port
from zerogpu_stub import DeviceApi, visitor_token

spaces = pytest.importorskip("spaces")

ROOT = Path(__file__).resolve().parent.parent
import app  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses and servers: seconds each


@contextlib.contextmanager
def zero_gpu_app(tmp_path: Path, api: DeviceApi, args: list[str], env_extra: dict | None = None):
    """app.py as a ZeroGPU Space; yields (url, report) once it serves."""
    port, report = free_port(), tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WINCLIP_", "SPACES_", "ZEROGPU_"))}
    env.update({"SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": api.url, "WINCLIP_DEVICE": "auto",
                "ZEROGPU_OFFLOAD_DIR": str(tmp_path / "offload"), "WINCLIP_CACHE": str(tmp_path / "cache"),
                "HOME": str(tmp_path / "home"), "GRADIO_ANALYTICS_ENABLED": "False", **(env_extra or {})})
    (tmp_path / "home").mkdir(exist_ok=True)
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "zerogpu_app.py"), str(port), str(report), *args],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not report.exists():
            assert proc.poll() is None, (tmp_path / "app.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the ZeroGPU app did not start in 240 s"
            time.sleep(0.5)
        time.sleep(0.5)  # the report is written whole before the rename-free read below
        yield f"http://127.0.0.1:{port}/", json.loads(report.read_text())
    finally:  # the app and its forked GPU workers: one process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(20)
        log.close()


@pytest.fixture(scope="module")
def real_size_weights(tmp_path_factory):
    """ViT-B-16-plus-240 with seeded random weights in a .safetensors file (~830 MB): what a Space loads."""
    import torch
    from safetensors.torch import save_file

    from winclip.loading import load_clip

    path = tmp_path_factory.mktemp("weights") / "vit_b16plus_random.safetensors"
    model = load_clip("ViT-B-16-plus-240", None, "cpu", "fp32", seed=0).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return path


def images(folder: Path, n: int, size: int = 200) -> list[Path]:
    from winclip.synthetic import make_part

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"part_{i}.png"
        make_part(60 + i, size, "crack" if i == 1 else "none").image.save(path)
        out.append(path)
    return out


def test_real_size_weights_from_a_file_are_packed_and_every_endpoint_answers(tmp_path, real_size_weights):
    from gradio_client import Client, handle_file

    from corpus import labelled_zip

    with DeviceApi() as api, zero_gpu_app(tmp_path, api, ["--pretrained", str(real_size_weights)],
                                          {"WINCLIP_PRECISION": "fp32"}) as (url, report):
        assert report["error"] is None and report["zero_gpu"]
        assert report["device"] == "cuda:0" and report["misplaced"] == []  # every tensor on "cuda"
        assert report["packed_bytes"] >= report["model_bytes"] > 500e6  # all of the model packed for the GPU
        assert not report["examples_prepared"]  # caches live in the GPU worker: preparing would spend quota
        client = Client(url, verbose=False, ssl_verify=False)
        parts = images(tmp_path / "parts", 5)
        label, verdict, *_ = client.predict(handle_file(str(parts[1])), [handle_file(str(parts[0]))], "washer",
                                            "crack", api_name="/detect")
        assert 0 <= label["confidences"][0]["confidence"] <= 1 and "1-shot WinCLIP+" in verdict
        summary, table, _ = client.predict(handle_file(str(parts[1])), "washer", "crack", api_name="/explain_prompts")
        assert "zero-shot image score" in summary and len(table["data"]) > 100
        for method in ("WinCLIP", "MuSc"):
            summary, gallery, *_ = client.predict([handle_file(str(p)) for p in parts], [], "washer", "", 0, 3,
                                                  True, 0.5, True, "", "", "", "two_class", "harmonic", method,
                                                  api_name="/inspect")
            assert "5 scored" in summary and len(gallery) == 5, summary
        summary, sets, *_ = client.predict([handle_file(str(labelled_zip(tmp_path / "w.zip")))], [], "washer", "",
                                           0, 3, api_name="/measure_prompts")
        assert "5 images (3 good, 2 defective" in summary and len(sets["data"]) == 2
    assert api.durations and max(api.durations) <= app.GPU_MAX_SECONDS
    # detect, explain, two batch calls per method (threshold, then one chunk of 5), two for measure
    # (one chunk of 5 encoded, then the measurements): 8 GPU calls
    assert len(api.durations) == 8, api.durations


def test_short_quota_says_what_ran_out_and_when_and_auto_checks_in_the_gpu_call(tmp_path):
    from gradio_client import Client, handle_file

    parts = images(tmp_path / "parts", 5, size=120)
    with DeviceApi() as api, zero_gpu_app(tmp_path, api, ["--pretrained", "none", "--model", TINY_CONFIG],
                                          {"WINCLIP_PRECISION": "auto"}) as (url, report):
        assert report["error"] is None and report["misplaced"] == []
        client = Client(url, verbose=False, ssl_verify=False, headers={"X-IP-Token": visitor_token()})
        label, *_ = client.predict(handle_file(str(parts[1])), [], "washer", "crack", api_name="/detect")
        assert 0 <= label["confidences"][0]["confidence"] <= 1
        verdicts = json.loads((tmp_path / "cache" / "int8-check.json").read_text())  # written by the GPU worker
        assert [v["precision"] for v in verdicts.values()] in (["bf16"], ["fp16"])
        calls = len(api.durations)
        api.left = 3  # the visitor has 3 s of GPU time left today
        with pytest.raises(Exception) as err:
            client.predict(handle_file(str(parts[2])), [], "washer", "crack", api_name="/detect")
        text = str(err.value)
        assert "quota" in text and "3s left" in text and "Try again in 1:00:00" in text  # what ran out, when
        assert "Signed-in" in text and "Traceback" not in text  # how to get more; no stack trace
        assert len(api.durations) == calls + 1 and api.refused


def gpu_events(zero_gpu: bool, monkeypatch) -> dict[str, tuple[str, bool]]:
    """handler name -> (trigger, makes a GPU call) for the demo's events, built as on ZeroGPU or elsewhere."""
    from winclip.service import DetectionService, Settings

    monkeypatch.setattr(app, "on_zero_gpu", lambda: zero_gpu)
    service = DetectionService(Settings(TINY_CONFIG, None, "cpu", "fp32"))
    assert service.load()
    demo = app.build_demo(service)
    events = {}
    for fn in demo.fns.values():
        if fn.name:
            events.setdefault(fn.name, (fn.targets[0][1], hasattr(fn.fn, "gpu_seconds")))
    return events


def test_which_events_borrow_the_gpu(monkeypatch):
    events = gpu_events(True, monkeypatch)
    gpu = {name for name, (_, on_gpu) in events.items() if on_gpu}
    assert gpu == {"detect", "explain"}  # inspect's and measure's model work go through bounded chunks
    assert events["rethreshold"] == ("input", False)  # a threshold move redraws on the CPU
    assert events["inspect"][1] is False and events["measure"][1] is False  # their loops hold no GPU
    assert "prewarm" not in events  # no warm-up calls whose caches no later call would see
    assert "prewarm" in gpu_events(False, monkeypatch)  # elsewhere uploads still warm the caches


def test_durations_are_computed_from_the_work_and_capped(monkeypatch):
    captured = {}

    class FakeSpaces:
        @staticmethod
        def GPU(duration):  # noqa: N802 - spaces' name
            def wrap(fn):
                captured[fn.__name__] = duration
                return fn
            return wrap

    monkeypatch.setattr(app, "spaces", FakeSpaces)
    gpu_events(True, monkeypatch)
    detect, batch = captured["detect"], captured["model_work"]
    measure = batch
    one, four = detect("q.png", []), detect("q.png", ["r"] * 4)
    assert 0 < one < four <= app.GPU_MAX_SECONDS
    chunk = batch("batch_rows", ["img"] * app.ZERO_GPU_CHUNK, [], None, 0.5, "winclip", None, 4)
    assert batch("batch_rows", ["img"], [], None, 0.5, "winclip", None, 4) < chunk <= app.GPU_MAX_SECONDS
    assert batch("batch_rows", ["img"] * 200, [], None, 0.5, "musc", None, 4) == app.GPU_MAX_SECONDS  # capped
    assert measure("labelled_part", ["img"] * app.ZERO_GPU_CHUNK, True, None) <= app.GPU_MAX_SECONDS

    class Labelled:
        names = ["img"] * 200  # the largest labelled set the app takes

    assert measure("measure_sets", Labelled(), [], None, [], True, False, 0.0) <= app.GPU_MAX_SECONDS
