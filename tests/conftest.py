"""Shared fixtures: a tiny registered open_clip ViT (2 layers, 64 wide, 96 px -> 6x6 grid), seeded."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from winclip import WinClip, WinClipConfig
from winclip.hardware import CpuInfo

TINY_CONFIG = str(Path(__file__).parent / "assets" / "winclip-tiny.json")
# CPUs the hardware policy is tested against (tests/test_hardware.py, tests/test_precision.py)
INTEL_AMX = CpuInfo("Intel Xeon Platinum 8481C", frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                                            "amx_bf16", "amx_int8"}), 2)
INTEL_AVX512 = CpuInfo("Intel Xeon 8259CL", frozenset({"avx2", "fma", "avx512f", "avx512_vnni"}), 2)
AMD_ZEN4 = CpuInfo("AMD EPYC 9B14", frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}), 2)  # no AMX
# an Intel Xeon (family 6 model 207) whose hypervisor hides AMX: /proc/cpuinfo's flags as read on one
INTEL_HIDDEN_AMX = CpuInfo("Intel(R) Xeon(R) Processor", frozenset({"avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni",
                                                                   "avx512_bf16", "avx512_fp16"}), 2)


_TEMP_ROOT = pytest.StashKey[tuple]()  # (the private temp folder, the patch of the environment)
_PASSED = pytest.StashKey[bool]()


def pytest_configure(config):
    """Everything the suite writes to the temp folder goes to one private folder, removed at the end when
    every test passed (kept for a look otherwise): the app servers' Gradio caches and image folders, and
    gradio_client's download folders (one per downloaded file, left behind empty), pytest's tmp_path. A
    machine that ran the suite all day had 7 GB of Gradio caches, 6 GB of tmp_path folders (the real-size
    weights: 1.6 GB a run, three runs kept) and 138,000 empty folders in /tmp, and CI there ran out of disk."""
    inherited = os.environ.get("WINCLIP_TESTS_ROOT")
    if inherited and os.environ.get("PYTEST_XDIST_WORKER"):  # a worker of ``-n 2``: the run's folder, as it is
        config.stash[_TEMP_ROOT] = (None, None)  # (a folder of its own inside it made Ray's socket paths too
        return                                   # long for AF_UNIX: 107 bytes); the controller removes it
    root = tempfile.mkdtemp(prefix="winclip-tests-")
    env = {"TMPDIR": root, "GRADIO_TEMP_DIR": str(Path(root) / "gradio"),  # subprocesses (servers, CLIs) inherit them
           "PYTEST_DEBUG_TEMPROOT": root,  # pytest's own tmp_path folders too
           "WINCLIP_TESTS_ROOT": root}  # and the workers of ``-n 2``
    # except torch.compile's cache (the int8 path's compiled steps), which stays where inductor keeps it by
    # default, across runs: in the private folder every run compiled afresh (+35 s of the "not slow" minute)
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    patched = mock.patch.dict(os.environ, env)  # the environment as it was comes back in pytest_unconfigure
    patched.start()
    tempfile.tempdir = root
    config.stash[_TEMP_ROOT] = (root, patched)


def pytest_unconfigure(config):
    root, patched = config.stash.get(_TEMP_ROOT, (None, None))
    tempfile.tempdir = None
    if patched is not None:
        patched.stop()
    if root and config.stash.get(_PASSED, False):
        shutil.rmtree(root, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_PASSED] = exitstatus == 0


def tiny_detector(config: WinClipConfig = WinClipConfig(), seed: int = 0, **kwargs) -> WinClip:
    return WinClip.from_pretrained(TINY_CONFIG, pretrained=None, config=config, seed=seed, **kwargs)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The int8 self-check's verdicts go to a per-run folder, and the CLI's default precision is fp32
    (CLI subprocesses inherit both): tests compare numbers across paths, and on a CPU without native
    bf16 ``auto`` would switch to int8 after its check. tests/test_int8.py tests ``auto`` itself."""
    saved = {k: os.environ.get(k) for k in ("WINCLIP_CACHE", "WINCLIP_PRECISION")}
    os.environ["WINCLIP_CACHE"] = str(tmp_path_factory.mktemp("winclip-cache"))
    os.environ["WINCLIP_PRECISION"] = "fp32"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def _tiny_shared() -> WinClip:
    return tiny_detector()


@pytest.fixture()
def tiny(_tiny_shared) -> WinClip:
    """The shared tiny detector (built once), its prompts and references reset after each test."""
    yield _tiny_shared
    _tiny_shared.set_prompts()
    _tiny_shared.set_references([])


@pytest.fixture()
def fresh() -> WinClip:
    return tiny_detector()


@pytest.fixture()
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_py_process(env: dict[str, str], timeout: float = 120, code: str | None = None):
    """``python app.py`` with ``env`` (GRADIO_SERVER_PORT/NAME added: a free loopback port) as a person starts
    it, or ``python -c code`` in the repository (code that changes something, then calls ``app.main()``);
    (process, its URL, a gradio_client Client) once it answers. The caller ends the process."""
    import subprocess
    import sys

    from gradio_client import Client

    port = free_port()
    env = {**env, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"}
    root = Path(__file__).resolve().parent.parent
    command, cwd = ([sys.executable, str(root / "app.py")], None) if code is None else (
        [sys.executable, "-c", code], root)
    server = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + timeout
    while True:
        try:
            return server, url, Client(url, verbose=False, ssl_verify=False)
        except Exception:  # noqa: BLE001 - server not up yet, bounded by the deadline
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise AssertionError("app.py did not start") from None
            time.sleep(0.5)


@contextlib.contextmanager
def serve(demo):
    """Launch a Blocks app in-process on a free loopback port, with the app's own queue settings."""
    import app

    demo.queue(default_concurrency_limit=app.CONCURRENCY, max_size=app.QUEUE_SIZE)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                max_file_size=app.MAX_FILE_SIZE, css=app.CSS)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def spy_on_encoding(monkeypatch, seconds: float = 0.0) -> list[int]:
    """The images of each ``WinClip.encode`` call from now on, each call made ``seconds`` longer."""
    calls, encode = [], WinClip.encode

    def spied(self, pixels, *args, **kwargs):
        calls.append(len(pixels))
        time.sleep(seconds)
        return encode(self, pixels, *args, **kwargs)

    monkeypatch.setattr(WinClip, "encode", spied)
    return calls


def spy_on_prompts(monkeypatch) -> list[int]:
    """The prompts of each ``WinClip.encode_prompts`` call from now on."""
    calls, encode = [], WinClip.encode_prompts

    def spied(self, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return encode(self, prompts, *args, **kwargs)

    monkeypatch.setattr(WinClip, "encode_prompts", spied)
    return calls


def started_as_app_py(monkeypatch, timeout: float = 120):
    """The demo as ``app.py`` makes it (``app.prepare``: background load, the examples prepared), with the tiny
    model in fp32 and without the process-wide allocator settings; returned once the load and the
    preparation are done."""
    import app

    monkeypatch.setattr(app, "configure_process", lambda device: False)
    demo, _ = app.prepare(["--model", TINY_CONFIG, "--pretrained", "none", "--precision", "fp32"])
    service, deadline = demo.winclip_service, time.monotonic() + timeout
    while (service.loading or service.preparing) and time.monotonic() < deadline:
        time.sleep(0.1)
    return demo
