"""The real loading path, offline: tiny weights saved to a file and loaded through from_pretrained."""

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from winclip import WeightsError, WinClip
from winclip.loading import resolve_dtype

from conftest import TINY_CONFIG, tiny_detector


@pytest.fixture(scope="module")
def source():
    return tiny_detector(seed=3)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_file_round_trip(source, pixels, tmp_path, suffix):
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in source.backbone.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = WinClip.from_pretrained(TINY_CONFIG, pretrained=str(path))
    assert loaded.source.pretrained == str(path.resolve())
    assert_close(loaded.forward(pixels).grid_maps, source.forward(pixels).grid_maps)
    assert not torch.equal(tiny_detector(seed=4).forward(pixels).grid_maps, source.forward(pixels).grid_maps)


def test_checkpoint_with_state_dict_key_and_module_prefix(source, pixels, tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.backbone.model.state_dict().items()}}, path)
    loaded = WinClip.from_pretrained(TINY_CONFIG, pretrained=str(path))
    assert_close(loaded.forward(pixels).image_scores, source.forward(pixels).image_scores)


def test_pickled_code_is_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(WeightsError, match="cannot read"):
        WinClip.from_pretrained(TINY_CONFIG, pretrained=str(path))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "not found"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"not a checkpoint at all"), "cannot read"),
    ],
)
def test_bad_weights_files(tmp_path, make, message):
    path = tmp_path / "w.pt"
    make(path)
    with pytest.raises(WeightsError, match=message) as info:
        WinClip.from_pretrained(TINY_CONFIG, pretrained=str(path))
    assert "--pretrained" in str(info.value) or message in ("empty",)


def test_truncated_file(source, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.model.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="truncated"):
        WinClip.from_pretrained(TINY_CONFIG, pretrained=str(path))


def test_wrong_architecture(tmp_path):
    path = tmp_path / "other.pt"
    state = tiny_detector().backbone.model.state_dict()
    state["visual.conv1.weight"] = torch.zeros(8, 3, 16, 16)
    torch.save(state, path)
    with pytest.raises(WeightsError, match="do not fit"):
        WinClip.from_pretrained(TINY_CONFIG, pretrained=str(path))
    torch.save({"visual.only": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="missing keys"):
        WinClip.from_pretrained(TINY_CONFIG, pretrained=str(path))


def test_unknown_names_and_tags():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        WinClip.from_pretrained("ViT-Nope", pretrained=None)
    with pytest.raises(ValueError, match="model config file not found"):
        WinClip.from_pretrained("missing.json", pretrained=None)
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        WinClip.from_pretrained("ViT-B-16-plus-240", pretrained="laion9000")


def test_precisions():
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="CUDA"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        resolve_dtype("int3", "cpu")


def test_bf16_close_to_fp32(pixels):
    fp32, bf16 = tiny_detector(), tiny_detector(precision="bf16")
    assert bf16.backbone.visual.conv1.weight.dtype is torch.bfloat16
    a, b = fp32.forward(pixels), bf16.forward(pixels)
    assert b.grid_maps.dtype is torch.float32
    assert (a.image_scores - b.image_scores).abs().max() < 0.02


def test_allocator_settings_respect_the_opt_out(monkeypatch):
    from winclip import runtime

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setenv("WINCLIP_MALLOC_TUNING", "0")
    monkeypatch.setattr(runtime, "_state", {})
    runtime.request_huge_pages()
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    assert runtime.tune_cpu_allocator() is False
    monkeypatch.setenv("WINCLIP_MALLOC_TUNING", "1")
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's own choice is kept
    runtime.request_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_allocator_tuning_applies_once_on_linux(monkeypatch):
    from winclip import runtime

    monkeypatch.delenv("WINCLIP_MALLOC_TUNING", raising=False)
    monkeypatch.setattr(runtime, "_state", {})
    assert runtime.tune_cpu_allocator() is True
    assert runtime._state == {"tuned": True}


@pytest.mark.slow
def test_import_and_loading_change_nothing_process_wide(tmp_path):
    """`import winclip` and a load from a file leave the environment and torch.nn.init as they were."""
    import subprocess

    weights = tmp_path / "w.pt"
    torch.save(tiny_detector(seed=3).backbone.model.state_dict(), weights)
    code = (
        "import os, torch; before = dict(os.environ); init = dict(vars(torch.nn.init))\n"
        "import winclip\n"
        f"d = winclip.WinClip.from_pretrained({TINY_CONFIG!r}, pretrained={str(weights)!r})\n"
        "assert dict(os.environ) == before, set(os.environ) ^ set(before)\n"
        "assert dict(vars(torch.nn.init)) == init\n"
        "from winclip import runtime; assert runtime._state == {}, runtime._state\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_skipping_random_init_is_thread_local():
    """While one thread builds a model from a file, another thread's modules still get initialised."""
    import threading

    from winclip.loading import skip_random_init

    inside, outside = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        inside.wait(10)
        layer = torch.nn.Linear(64, 64)
        torch.nn.init.normal_(layer.bias, mean=5.0)
        seen["bias_mean"] = float(layer.bias.mean())
        outside.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with skip_random_init():
        marked = torch.full((8,), 7.0)
        inside.set()
        outside.wait(10)
        torch.nn.init.normal_(marked)
    thread.join(10)
    assert_close(marked, torch.full((8,), 7.0))  # skipped in this thread
    assert 4.0 < seen["bias_mean"] < 6.0  # the other thread's init really ran
    skipped = torch.full((8,), 7.0)
    with skip_random_init():
        torch.nn.init.normal_(skipped)
        torch.nn.init.uniform_(skipped)
        torch.nn.init.kaiming_uniform_(skipped.view(2, 4))
        torch.nn.init.xavier_uniform_(skipped.view(2, 4))  # no torch-function hook of its own: uniform_ inside
    assert_close(skipped, torch.full((8,), 7.0))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_from_a_file_land_on_the_requested_device(source, tmp_path, suffix, device):
    """Every parameter and buffer ends where it was asked for, not where the file was read ("meta"
    stands in for a GPU where there is none: a device other than the CPU the file is read on)."""
    import open_clip

    from winclip.loading import _from_file, misplaced, resolve_model_name

    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in source.backbone.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    model = _from_file(open_clip, resolve_model_name(TINY_CONFIG), str(path), device)
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device.type == device for t in tensors)
    assert misplaced(model, device) == []
    assert misplaced(source.backbone.model, device)  # the check itself tells
    if device == "cuda":  # and the detector built on it answers there, as the CPU does
        det = WinClip.from_pretrained(TINY_CONFIG, pretrained=str(path), device="cuda")
        assert det.backbone.device.type == "cuda"
        pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
        assert_close(det.forward(pixels).image_scores.cpu(), source.forward(pixels).image_scores, atol=1e-4, rtol=0)


def test_a_model_split_across_devices_is_refused(source):
    from winclip.loading import misplaced, place

    class Stuck(torch.nn.Module):  # a module whose .to() leaves its tensors behind
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))
            self.register_buffer("mask", torch.zeros(2))

        def _apply(self, fn, recurse=True):
            return self

    with pytest.raises(RuntimeError, match="not on meta"):
        place(Stuck(), "meta")
    assert misplaced(source.backbone.model, "cpu") == []
    assert source.backbone.device.type == "cpu"
