"""The real first-run path (tag -> Hub -> cache -> load) against a local Hub server, with huggingface_hub's client.

The tiny test model gets a pretrained tag whose weights live in a Hub repository served on loopback;
``huggingface_hub.constants`` point the client at that server and at a fresh cache per test.
"""

import io
import re
import time
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from safetensors.torch import save

import app
from winclip import WeightsError, WinClip
from winclip.loading import DEFAULT_MODEL, DEFAULT_PRETRAINED, hub_files, resolve_model_name
from winclip.service import DetectionService, DetectOptions, Settings
from winclip.synthetic import make_part

from conftest import TINY_CONFIG, serve, tiny_detector
from hub_server import LocalHub

ROOT = Path(__file__).resolve().parent.parent
REPO = "winclip-test/tiny-clip"
TAG = "hubtest"

pytestmark = pytest.mark.slow  # subprocesses and servers: seconds each


@pytest.fixture(scope="module")
def state():
    return {k: v.contiguous() for k, v in tiny_detector(seed=5).backbone.model.state_dict().items()}


@pytest.fixture()
def hub_setup(monkeypatch, tmp_path):
    """Point huggingface_hub at a fresh cache and register the tiny model's Hub tag; yields a server factory."""
    name = resolve_model_name(TINY_CONFIG)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {TAG: {"hf_hub": f"{REPO}/"}})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 2)
    servers = []

    def start(files):
        hub = LocalHub(files).__enter__()
        servers.append(hub)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        return hub

    yield start
    for hub in servers:
        hub.__exit__(None, None, None)


def first_weight(detector: WinClip) -> torch.Tensor:
    return detector.backbone.model.visual.conv1.weight.detach().float()


def test_first_start_downloads_then_offline_start_uses_the_cache(hub_setup, state, monkeypatch, tmp_path):
    hub = hub_setup({(REPO, "open_clip_model.safetensors"): save(state)})
    service = DetectionService(Settings(model=TINY_CONFIG, pretrained=TAG, precision="fp32"))
    service.start_loading().join(120)
    assert service.detector is not None, service.error
    assert any(m == "GET" for m, _ in hub.requests)
    torch.testing.assert_close(first_weight(service.detector), state["visual.conv1.weight"].float())
    assert isinstance(try_to_load_from_cache(REPO, "open_clip_model.safetensors"), str)
    query = tmp_path / "q.png"
    make_part(3, 200, "crack").image.save(query)
    with serve(app.build_demo(service)) as url:  # the app answers
        from gradio_client import Client, handle_file

        client = Client(url, verbose=False, ssl_verify=False)
        label, verdict, *_ = client.predict(handle_file(str(query)), [], "washer", api_name="/detect")
        assert "zero-shot WinCLIP" in verdict
    seen = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = DetectionService(Settings(model=TINY_CONFIG, pretrained=TAG, precision="fp32"))
    assert again.load(), again.error
    assert len(hub.requests) == seen  # no request at all
    torch.testing.assert_close(first_weight(again.detector), first_weight(service.detector))


def test_repository_with_only_the_bin_file_is_read_after_the_safetensors_404(hub_setup, state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    hub = hub_setup({(REPO, "open_clip_pytorch_model.bin"): buffer.getvalue()})
    detector = WinClip.from_pretrained(TINY_CONFIG, pretrained=TAG)
    torch.testing.assert_close(first_weight(detector), state["visual.conv1.weight"].float())
    asked = [path.rsplit("/", 1)[-1] for _, path in hub.requests]
    assert asked.index("open_clip_model.safetensors") < asked.index("open_clip_pytorch_model.bin")  # open_clip's order


@pytest.mark.parametrize("mode", ["404", "500"])
def test_failing_hub_gives_the_clear_banner(hub_setup, state, mode, monkeypatch):
    import huggingface_hub.utils._http as hf_http

    hub = hub_setup({(REPO, "open_clip_model.safetensors"): save(state)})
    hub.mode = mode
    # huggingface_hub retries a 500 after 1, 2, 4, 8 and 8 s: its waits are added up instead of slept
    waits: list[float] = []
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=waits.append))
    service = DetectionService(Settings(model=TINY_CONFIG, pretrained=TAG, precision="fp32"))
    start = time.perf_counter()
    assert not service.load()
    assert time.perf_counter() - start + sum(waits) < 60
    if mode == "500":
        assert sum(waits) > 0 and len(hub.requests) > len(waits)  # it did retry, and then gave up
    text = app.banner(service)
    assert "could not be loaded" in text and "hf download" in text and "WINCLIP_PRETRAINED" in text
    with pytest.raises(ValueError, match="not loaded"):
        service.detect(None, [], DetectOptions())


def test_slow_hub_shows_loading_and_a_request_meanwhile_waits_and_succeeds(hub_setup, state, tmp_path):
    hub = hub_setup({(REPO, "open_clip_model.safetensors"): save(state)})
    hub.mode, hub.delay = "slow", 1.5
    service = DetectionService(Settings(model=TINY_CONFIG, pretrained=TAG, precision="fp32"))
    thread = service.start_loading()
    assert "Loading" in app.banner(service)
    query = tmp_path / "q.png"
    make_part(2, 200, "crack").image.save(query)
    result = service.detect(str(query), [], DetectOptions(object_name="washer"))  # waits for the load
    assert 0.0 <= result.score <= 1.0 and service.detector is not None
    thread.join(30)
    assert app.banner(service) == ""  # loaded: no banner


def test_truncated_download_is_not_cached_as_complete(hub_setup, state):
    hub = hub_setup({(REPO, "open_clip_model.safetensors"): save(state)})
    hub.mode = "truncated"
    with pytest.raises(WeightsError, match="could not download"):
        WinClip.from_pretrained(TINY_CONFIG, pretrained=TAG)
    assert not isinstance(try_to_load_from_cache(REPO, "open_clip_model.safetensors"), str)
    hub.mode = "ok"
    detector = WinClip.from_pretrained(TINY_CONFIG, pretrained=TAG)  # a later start completes it
    torch.testing.assert_close(first_weight(detector), state["visual.conv1.weight"].float())


def test_unreachable_hub_fails_fast(hub_setup, monkeypatch):
    hub_setup({})
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(WeightsError, match="cannot be reached"):
        WinClip.from_pretrained(TINY_CONFIG, pretrained=TAG)
    assert time.perf_counter() - start < 10


def front_matter_preloads() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("---")[1]
    block = text.split("preload_from_hub:")[1]
    return [tuple(m.groups()) for m in re.finditer(r"^\s+-\s+(\S+)\s+(\S+)\s*$", block, re.M)]


def test_space_preloads_exactly_what_open_clip_fetches_first():
    repo, names = hub_files(DEFAULT_MODEL, DEFAULT_PRETRAINED)
    assert (repo, names[0]) in front_matter_preloads()
    assert list(open_clip.pretrained._get_safe_alternatives(names[-1])) == [names[0]]  # open_clip's own rule


def test_preloaded_cache_starts_offline_with_no_request(hub_setup, state, monkeypatch):
    """What the Space build does (preload_from_hub = hf_hub_download of the listed file), then an offline start."""
    hub = hub_setup({(REPO, "open_clip_model.safetensors"): save(state),
                     (REPO, "open_clip_pytorch_model.bin"): b"not used"})
    _, names = hub_files(resolve_model_name(TINY_CONFIG), TAG)
    hf_hub_download(REPO, names[0], endpoint=hub.url)  # the preload
    seen = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    service = DetectionService(Settings(model=TINY_CONFIG, pretrained=TAG, precision="fp32"))
    assert service.load(), service.error
    assert len(hub.requests) == seen


def test_host_that_accepts_and_never_answers_fails_within_seconds(hub_setup, monkeypatch):
    """A captive proxy or firewall: the connection is accepted, nothing is ever said back."""
    import socket
    import threading

    hub_setup({})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted, stop = [], threading.Event()

    def accept_and_stay_silent():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])  # kept open, never read or answered
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    start = time.perf_counter()
    try:
        with pytest.raises(WeightsError, match="did not answer within") as err:
            WinClip.from_pretrained(TINY_CONFIG, pretrained=TAG)
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()
    assert time.perf_counter() - start < 10
    assert accepted, "the probe never connected"
    assert "WINCLIP_PRETRAINED" in str(err.value)  # the way out is in the message
