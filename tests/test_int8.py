"""The CPU int8 path: its linear against exact integer arithmetic, the packed tower against fp32, the
auto policy (hardware mocked), and the self-check that keeps fp32 when int8 does not match it."""

import dataclasses
import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from winclip import hardware, precision_check
from winclip.kernels import Int8Linear, int8_unavailable
from winclip.hardware import CpuInfo, choose_runtime
from winclip.methods import musc_precision

from conftest import AMD_ZEN4, TINY_CONFIG, tiny_detector

pytestmark = pytest.mark.skipif(bool(hardware.int8_available()), reason=hardware.int8_available() or "int8 available")

AMD_AVX2 = CpuInfo("AMD EPYC 7B13", frozenset({"avx2", "fma"}), 2)


@pytest.mark.parametrize("weight_max", [63, 127])
def test_int8_linear_is_the_integer_arithmetic_it_claims(weight_max):
    """Per-token activation scales, per-channel weight scales, bias/GELU/residual in float: equal to
    exact integer maths. 8-bit weights only where the CPU has VNNI: without it the kernel's 16-bit
    pair sums saturate (measured here: 10% error), which is why the tower uses 7-bit weights there."""
    if weight_max == 127 and not {"avx512_vnni", "avx_vnni"} & hardware.cpu_info().flags:
        pytest.skip("8-bit weights are used only on CPUs with VNNI")
    torch.manual_seed(0)
    x, w, b = torch.randn(37, 64) * 3, torch.randn(48, 64) * 0.05, torch.randn(48) * 0.1
    x[:, 5] *= 10  # an outlier channel
    lin = Int8Linear(w, b, weight_max)
    s = x.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(x / s)
    wq = torch.round(w / lin.scale[:, None])
    exact = (q @ wq.T) * lin.scale * s + b  # what the int8 path computes, in float
    got = lin(x.clone())
    assert_close(got, exact, atol=1e-4, rtol=1e-4)
    ref = F.linear(x, w, b)
    assert float((got - ref).norm() / ref.norm()) < 0.05  # and close to fp32
    residual = torch.randn(37, 48)
    assert_close(lin(x.clone(), residual=residual.clone()), got + residual, atol=1e-5, rtol=1e-5)
    assert_close(lin(x.clone(), gelu=True), F.gelu(got), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_weight_bits_follow_the_instruction_set(monkeypatch):
    from winclip.kernels import Int8Tower

    visual = tiny_detector().backbone.visual
    monkeypatch.setattr(hardware, "cpu_info", lambda: AMD_AVX2)
    assert Int8Tower(visual).weight_bits == 7
    monkeypatch.setattr(hardware, "cpu_info", lambda: CpuInfo("Xeon", frozenset({"avx2", "avx512_vnni"}), 2))
    assert Int8Tower(visual).weight_bits == 8


def test_packed_int8_tower_is_close_to_fp32_and_switches_back_exactly(pixels):
    det = tiny_detector()
    ref = det.score(det.encode(pixels), det.prototypes)
    det.backbone.use_int8(True)
    low = det.score(det.encode(pixels), det.prototypes)
    assert float((low.image_scores - ref.image_scores).abs().max()) < 0.01
    assert precision_check.spearman(ref.grid_maps, low.grid_maps) > 0.95
    assert not torch.equal(low.grid_maps, ref.grid_maps)  # it did run another path
    det.backbone.use_int8(False)
    assert torch.equal(det.score(det.encode(pixels), det.prototypes).grid_maps, ref.grid_maps)


def test_int8_where_it_cannot_run_says_why():
    det = tiny_detector()
    visual = det.backbone.visual
    assert "CPU path" in int8_unavailable(visual, torch.float32, torch.device("cuda"))
    assert "fp32" in int8_unavailable(visual, torch.bfloat16, torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU path"):
        choose_runtime("cuda", "int8", info=AMD_AVX2, cuda_available=True)
    assert choose_runtime("cpu", "int8", info=AMD_AVX2, cuda_available=False).precision == "int8"


def test_auto_makes_int8_a_candidate_only_where_it_can_run(monkeypatch):
    runtime = choose_runtime("auto", "auto", info=AMD_AVX2, cuda_available=False)
    assert (runtime.precision, runtime.candidate) == ("fp32", "int8") and "until int8 passes" in runtime.reason
    monkeypatch.setattr(hardware, "int8_available", lambda: "no oneDNN int8 here")
    runtime = choose_runtime("auto", "auto", info=AMD_AVX2, cuda_available=False)
    assert (runtime.precision, runtime.candidate) == ("fp32", "") and "no oneDNN int8 here" in runtime.reason
    with pytest.raises(ValueError, match="no oneDNN int8 here"):
        choose_runtime("cpu", "int8", info=AMD_AVX2, cuda_available=False)


def _broken(self, q):  # a reduced path that is fast and wrong (eager or compiled float steps alike)
    return torch.zeros(q.shape[0], len(self.scale))


def test_self_check_keeps_fp32_when_the_reduced_path_is_broken(monkeypatch, pixels):
    det = tiny_detector()
    monkeypatch.setattr(Int8Linear, "matmul", _broken)
    candidate = choose_runtime("auto", "auto", info=AMD_AVX2, cuda_available=False)
    runtime, result = precision_check.resolve_candidate(det, candidate, use_cache=False)
    assert runtime.precision == "fp32" and not result.passed and "int8 stays off" in runtime.reason
    assert result.max_score_diff > precision_check.MAX_SCORE_DIFF or result.min_spearman < precision_check.MIN_SPEARMAN
    assert det.backbone.int8 is None  # the answers stay fp32
    assert torch.equal(det.score(det.encode(pixels), det.prototypes).grid_maps,
                       tiny_detector().score(tiny_detector().encode(pixels), det.prototypes).grid_maps)


def test_self_check_switches_when_int8_matches_and_remembers_the_verdict(monkeypatch, tmp_path):
    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    monkeypatch.setenv("WINCLIP_INT8_COMPILE", "0")  # the stand-in below replaces the eager steps
    det = tiny_detector()

    def exact(self, x, gelu=False, residual=None):  # stands for an int8 path that matches fp32 closely
        y = x @ self.weight_float.T + self.bias
        return F.gelu(y) if gelu else (y + residual if residual is not None else y)

    original_init = Int8Linear.__init__

    def init(self, weight, bias, weight_max=127):
        original_init(self, weight, bias, weight_max)
        self.weight_float = weight.detach().float()

    monkeypatch.setattr(Int8Linear, "__init__", init)
    monkeypatch.setattr(Int8Linear, "__call__", exact)
    # the stand-in is no faster than fp32 (nor is int8 on the tiny model): the speed condition is tested in
    # tests/test_precision.py, the switch and its memory here
    monkeypatch.setattr(precision_check, "MAX_TIME_RATIO", float("inf"))
    candidate = choose_runtime("auto", "auto", info=AMD_AVX2, cuda_available=False)
    runtime, result = precision_check.resolve_candidate(det, candidate)
    assert runtime.precision == "int8" and result.passed and not result.cached and det.backbone.int8 is not None
    assert result.max_score_diff < 1e-5 and result.min_spearman > 0.999
    stored = json.loads((tmp_path / "int8-check.json").read_text())
    assert list(stored) == [precision_check.cache_key(det)]
    det.source = dataclasses.replace(det.source, runtime=runtime)
    assert musc_precision(det) == "fp32" and "MuSc fp32" in runtime.reason  # MuSc keeps fp32 under auto
    # a second start recalls it without scoring anything
    det2 = tiny_detector()
    monkeypatch.setattr(precision_check, "compare", lambda *a, **k: pytest.fail("check repeated"))
    runtime, result = precision_check.resolve_candidate(det2, candidate)
    assert runtime.precision == "int8" and result.cached and "cached" in runtime.reason
    # other weights are another verdict
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    det2.source = det2.source.__class__(**{**det2.source.__dict__, "pretrained": str(weights)})
    assert precision_check.cache_key(det2) != precision_check.cache_key(det)
    (tmp_path / "int8-check.json").write_text("{not json")  # a damaged cache: checked again, then rewritten
    monkeypatch.setattr(precision_check, "compare", lambda *a, **k: precision_check.CheckResult(True, 0.0, 1.0, 3, 0.1))
    runtime, result = precision_check.resolve_candidate(tiny_detector(), candidate)
    assert runtime.precision == "int8" and not result.cached
    assert json.loads((tmp_path / "int8-check.json").read_text())  # rewritten whole


def test_cli_auto_runs_the_check_and_reports_it(tmp_path, monkeypatch, capsys):
    from winclip import cli
    from winclip.synthetic import make_part

    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "cpu_info", lambda: AMD_AVX2)
    monkeypatch.setattr(Int8Linear, "matmul", _broken)
    make_part(1, 120).image.save(tmp_path / "q.png")
    args = ["predict", "--image", str(tmp_path / "q.png"), "--model", TINY_CONFIG, "--pretrained", "none", "--json",
            "--precision", "auto"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["precision"] == "fp32" and "self-check failed" in out["why"] and out["kernels"].startswith("float32")
    assert "checking int8 against fp32" in captured.err and "note: fp32: int8 self-check failed" in captured.err


def test_service_checks_in_the_background_and_answers_meanwhile(monkeypatch, tmp_path):
    """The model answers in fp32 at once; the check runs after the load; a broken int8 leaves fp32."""
    import threading

    from winclip.service import DetectionService, DetectOptions, Settings
    from winclip.synthetic import make_part

    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "cpu_info", lambda: AMD_AVX2)
    gate = threading.Event()
    original = precision_check.compare

    def gated(detector, precision="int8", step=lambda work: work()):
        gate.wait(30)
        return original(detector, precision, step)

    monkeypatch.setattr(precision_check, "compare", gated)
    monkeypatch.setattr(Int8Linear, "matmul", _broken)
    service = DetectionService(Settings(TINY_CONFIG, None, "auto", "auto"))
    assert service.load()
    assert service.checking and "checking int8 against fp32" in service.status()
    result = service.detect(make_part(3, 120, "spot").image, [], DetectOptions(object_name="washer"))
    assert 0 <= result.score <= 1  # answered (fp32) while the check waits
    gate.set()
    service.int8_check.join(60)
    assert not service.checking
    status = service.status()
    assert "· fp32 (" in status and "self-check failed" in status and "checking" not in status
    assert service.detector.backbone.int8 is None


def test_the_background_check_waits_for_a_quiet_moment(monkeypatch, tmp_path):
    """Each of the check's image pairs takes the model only once no click has held it for ``quiet_s``."""
    import threading

    from winclip.service import DetectionService, DetectOptions, Settings
    from winclip.synthetic import make_part

    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "cpu_info", lambda: AMD_AVX2)
    gate, started = threading.Event(), []

    def compare(detector, precision="int8", step=lambda work: work()):  # the pairs' timing is tested, not the check
        gate.wait(30)
        for _ in range(3):
            step(lambda: started.append(time.monotonic()))
        return precision_check.CheckResult(False, 1.0, 0.0, 3, 0.1, precision=precision)

    monkeypatch.setattr(precision_check, "compare", compare)
    service = DetectionService(Settings(TINY_CONFIG, None, "auto", "auto"))
    service.quiet_s = 1.0
    assert service.load() and service.checking
    service.detect(make_part(3, 120, "spot").image, [], DetectOptions(object_name="washer"))
    answered = time.monotonic()  # (the click let go of the model a little earlier, before drawing)
    gate.set()
    service.int8_check.join(30)
    assert len(started) == 3 and started[0] - answered >= 0.8, (started, answered)
    assert "self-check failed" in service.status()


def test_a_stopping_server_does_not_wait_for_the_checks_compiling(monkeypatch, tmp_path):
    """The check quantises and compiles without the model's lock (up to ~45 s from scratch): a stop then
    says background work is still running (app.py leaves without the interpreter's shutdown, which this
    work ended with SIGABRT) instead of waiting for it; the check takes no step afterwards."""
    import threading

    from winclip.service import DetectionService, Settings

    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "cpu_info", lambda: AMD_AVX2)
    compiling, compiled, steps = threading.Event(), threading.Event(), []

    def compare(detector, precision="int8", step=lambda work: work()):
        compiling.set()
        compiled.wait(30)  # as ``backbone.prepare``: no lock held
        step(lambda: steps.append(precision))
        return precision_check.CheckResult(True, 0.0, 1.0, 3, 0.1, precision=precision)

    monkeypatch.setattr(precision_check, "compare", compare)
    service = DetectionService(Settings(TINY_CONFIG, None, "auto", "auto"))
    service.quiet_s = 0.0
    assert service.load() and compiling.wait(30)
    start = time.monotonic()
    assert not service.stop_background(timeout=30, grace=0.3)
    assert time.monotonic() - start < 5
    compiled.set()
    service.int8_check.join(30)
    assert not service.int8_check.is_alive() and steps == [] and not service.checking
    assert service.detector.backbone.int8 is None  # no verdict: fp32, and the next start checks again
    assert service.stop_background(timeout=30, grace=0.3)


def test_a_check_not_yet_begun_does_not_begin_once_the_server_stops(monkeypatch, tmp_path):
    """The check waits for the examples' preparation; a stop meanwhile: it never begins its compiling."""
    from winclip.service import DetectionService, Settings

    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "cpu_info", lambda: AMD_AVX2)
    calls = []
    monkeypatch.setattr(precision_check, "compare", lambda *a, **k: calls.append(a))
    service = DetectionService(Settings(TINY_CONFIG, None, "auto", "auto"))
    service.preparing = "3 examples"  # as prepare_in_background sets it before the load ends
    assert service.load() and service.checking
    assert service.stop_background(timeout=30, grace=5)  # the check stopped waiting and ended
    assert not service.int8_check.is_alive() and calls == [] and not service.checking


STOPPED_WHILE_COMPILING = """
import os, torch
from pathlib import Path
import app
from winclip import hardware, precision_check
from winclip.hardware import CpuInfo

hardware.cpu_info = lambda: CpuInfo("AMD EPYC 7B13", frozenset({"avx2", "fma"}), 2)  # auto checks int8


def compare(detector, precision="int8", step=lambda work: work()):  # as its quantising and compiling: native
    Path(os.environ["COMPILING"]).touch()                           # code, no lock held, for a long while
    a = torch.randn(1024, 1024)
    while True:
        a @ a


precision_check.compare = compare
app.main()
"""


def test_a_server_stopped_while_autos_check_compiles_exits_cleanly(tmp_path):
    """SIGTERM (or Ctrl+C) while auto's check compiled, as on a first start: the process ended by SIGABRT
    ("terminate called without an active exception", native code running as the interpreter shut down),
    leaving the app's output folder behind. Now it exits 0 once the exit handlers have run."""
    import os
    import signal

    from gradio_client import handle_file

    from conftest import app_py_process
    from winclip.synthetic import make_part

    temp, compiling = tmp_path / "tmp", tmp_path / "compiling"
    temp.mkdir()
    server, _, client = app_py_process(dict(os.environ, WINCLIP_MODEL=TINY_CONFIG, WINCLIP_PRETRAINED="none",
                                       WINCLIP_PRECISION="auto", WINCLIP_CACHE=str(tmp_path / "cache"),
                                       TMPDIR=str(temp), GRADIO_TEMP_DIR=str(temp / "gradio"),
                                       COMPILING=str(compiling)), code=STOPPED_WHILE_COMPILING)
    try:
        deadline = time.monotonic() + 120
        while not compiling.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert compiling.exists(), "auto's check never began"
        query = tmp_path / "q.png"
        make_part(1, 64).image.save(query)
        assert "This click took" in client.predict(handle_file(str(query)), [], api_name="/detect")[1]
        (folder,) = temp.glob("winclip-outputs-*")  # the click's images
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        assert not folder.exists()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)


def test_service_on_a_bf16_cpu_without_amx_falls_back_to_bf16_when_int8_fails(monkeypatch, tmp_path):
    """AVX512-BF16 without AMX: int8 is checked first; when it fails, bf16's check decides; the panel says so."""
    import threading

    from winclip.service import DetectionService, Settings

    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "cpu_info", lambda: AMD_ZEN4)
    gate, original, checked = threading.Event(), precision_check.compare, []

    def gated(detector, precision="int8", step=lambda work: work()):
        gate.wait(30)
        checked.append(precision)
        if precision == "bf16":  # bf16's own check, passing (its real check is tested in test_precision.py)
            return precision_check.CheckResult(True, 0.001, 0.999, 3, 0.1, precision="bf16")
        return original(detector, precision, step)  # int8's real check, on a broken int8 path

    monkeypatch.setattr(precision_check, "compare", gated)
    monkeypatch.setattr(Int8Linear, "matmul", _broken)
    service = DetectionService(Settings(TINY_CONFIG, None, "auto", "auto"))
    assert service.load()
    assert "checking int8 (then bf16 if it fails) against fp32" in service.status()
    gate.set()
    service.int8_check.join(60)
    status = service.status()
    assert checked == ["int8", "bf16"] and "· bf16 (" in status and "so int8 stays off" in status
    assert service.detector.backbone.precision == "bf16"


def test_the_check_changes_precision_for_its_own_thread_only(pixels):
    """While the self-check runs its int8 pass, a request served by another thread stays fp32."""
    import threading

    det = tiny_detector()
    ref = det.score(det.encode(pixels), det.prototypes).grid_maps
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def check_thread():
        with det.backbone.precision_for_this_thread("int8"):
            seen["int8"] = det.score(det.encode(pixels), det.prototypes).grid_maps
            inside.set()
            done.wait(30)

    worker = threading.Thread(target=check_thread)
    worker.start()
    assert inside.wait(30)
    other = det.score(det.encode(pixels), det.prototypes).grid_maps  # this thread, during the int8 block
    done.set()
    worker.join(30)
    assert torch.equal(other, ref) and not torch.equal(seen["int8"], ref)
    assert det.backbone.int8 is None and det.backbone.active_int8() is None


def test_a_batch_run_keeps_the_precision_it_started_in(monkeypatch, tmp_path):
    """One precision per batch run: a check that passes while a run is streaming switches the server at once,
    and the run's remaining rows are still scored in fp32 (the run's precision), equal to an fp32 run, also
    when another thread asks for them (the rows stream from a thread of their own)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from winclip.service import DetectionService, DetectOptions, Settings

    from corpus import labelled_zip

    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "cpu_info", lambda: AMD_AVX2)
    release = threading.Event()

    def passing(detector, precision="int8", step=lambda work: work()):
        release.wait(30)
        return precision_check.CheckResult(True, 0.0, 1.0, 3, 0.1)

    monkeypatch.setattr(precision_check, "compare", passing)
    archive = labelled_zip(tmp_path / "w.zip")
    service = DetectionService(Settings(TINY_CONFIG, None, "auto", "auto"))
    assert service.load() and service.checking
    _, run = service.batch([str(archive)], [], DetectOptions(), tmp_path / "o", batch_size=1)
    rows = [next(run)]  # the run has started, in fp32
    release.set()  # the check passes now, mid-run
    service.int8_check.join(30)
    assert not service.int8_check.is_alive() and service.detector.backbone.int8 is not None  # switched at once
    with ThreadPoolExecutor(1) as other:  # the rest asked for from another thread, as Gradio moves a generator
        rows += other.submit(lambda: [r for r in run if hasattr(r, "score")]).result()
    reference = DetectionService(Settings(TINY_CONFIG, None, "auto", "fp32"))
    assert reference.load()
    _, fp32_run = reference.batch([str(archive)], [], DetectOptions(), tmp_path / "r", batch_size=1)
    expected = {r.file: r.score for r in fp32_run if hasattr(r, "score")}
    assert len(rows) == len(expected) > 2 and all(r.score == expected[r.file] for r in rows)
    summary = json.loads((tmp_path / "o" / "results" / "summary.json").read_text())
    assert summary["settings"]["precision"] == "fp32"
    int8_run = list(service.batch([str(archive)], [], DetectOptions(), tmp_path / "n", batch_size=1)[1])
    assert max(abs(r.score - expected[r.file]) for r in int8_run if getattr(r, "score", None) is not None) > 0  # int8
    assert "· int8 (" in service.status() and "kernels: int8: oneDNN qlinear" in service.status()


def test_rational_erf_and_gelu_match_torch_to_float_precision():
    from winclip.kernels.int8_epilogue import erf_rational, gelu_rational

    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)) * 4
    assert float((gelu_rational(x) - F.gelu(x)).abs().max()) < 2e-6  # measured 1.4e-6
    assert float((erf_rational(x) - torch.erf(x)).abs().max()) < 1e-6
    edges = torch.tensor([-1e4, -4.0, 0.0, 4.0, 1e4])
    assert_close(gelu_rational(edges), F.gelu(edges))


@pytest.mark.slow
def test_the_eager_and_fused_float_steps_quantise_alike(monkeypatch):
    """quantize_rows (what the compiled steps use) and Int8Linear's in-place eager steps give the same
    bytes and scales; the compiled steps match their own uncompiled definitions."""
    from winclip.kernels import int8_epilogue
    from winclip.kernels.int8_epilogue import EAGER_REFERENCE, quantize_rows

    torch.manual_seed(0)
    x = torch.randn(37, 64) * 3
    x[:, 5] *= 10
    lin = Int8Linear(torch.randn(48, 64) * 0.05, torch.randn(48) * 0.1, 63)
    seen = {}
    original = Int8Linear.matmul

    def spy(self, q):
        seen["q"] = q.clone()
        return original(self, q)

    q, s = quantize_rows(x)
    monkeypatch.setattr(Int8Linear, "matmul", spy)
    lin(x.clone())
    monkeypatch.undo()
    assert torch.equal(seen["q"], q) and q.dtype == torch.uint8
    ep, why = int8_epilogue.for_widths(64, 256, 1e-5, 4)
    if ep is None:
        pytest.skip(f"torch.compile does not run here: {why}")
    with torch.inference_mode():
        y, yh, r, w, b = (torch.randn(37, 64), torch.randn(37, 256) * 3, torch.randn(37, 64), torch.rand(64) + 0.5,
                          torch.randn(64))
        bh = torch.randn(256)
        # 11 windows of 7 tokens, 4 heads: the Q/K/V matmul's output, its row scales, the bias
        windows, window_s, b3 = torch.randn(11, 7, 3 * 64) * 2, torch.rand(11, 7, 1), torch.randn(3 * 64)
        cases = {"ln_quant": (x, w, b, 1e-5), "quant": (x,), "dequant": (y, s, b),
                 "dequant_residual_ln_quant": (y, s, b, r, w, b, 1e-5), "dequant_gelu_quant": (yh, s, bh),
                 "dequant_residual": (y, s, b, r), "window_attention_quant": (windows, window_s, b3, 4),
                 "window_cls_attention_quant": (windows, window_s, b3, 4)}
        assert set(cases) == {f.name for f in dataclasses.fields(EAGER_REFERENCE)}  # every step is compared
        for name, args in cases.items():
            got, want = getattr(ep, name)(*args), getattr(EAGER_REFERENCE, name)(*args)
            for g, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                if g.dtype == torch.uint8:  # a value on a rounding edge may land one step over
                    assert int((g.int() - e.int()).abs().max()) <= 1, name
                    assert float((g != e).float().mean()) < 0.01, name
                else:
                    assert_close(g, e, atol=1e-5, rtol=1e-5, msg=name)


def test_packed_int8_tower_compiled_matches_eager(monkeypatch, pixels):
    det = tiny_detector()
    det.backbone.use_int8(True)
    if det.backbone.int8.epilogues is None:
        pytest.skip(f"torch.compile does not run here: {det.backbone.int8.eager_because}")
    assert "float steps compiled" in det.backbone.kernel_path()
    ep, calls = det.backbone.int8.epilogues, []

    def counted(name):
        def call(y, s, bias, heads):
            calls.append((name, tuple(y.shape)))
            return getattr(ep, name)(y, s, bias, heads)
        return call

    names = ("window_attention_quant", "window_cls_attention_quant")
    det.backbone.int8.epilogues = dataclasses.replace(ep, **{n: counted(n) for n in names})
    fused = det.score(det.encode(pixels), det.prototypes)
    n_blocks, n_scales = det.backbone.n_blocks, len(det.config.window_scales)
    # every window group of every block takes the fused attention; the last block only the class token's
    assert [n for n, _ in calls].count("window_cls_attention_quant") == n_scales
    assert len(calls) >= n_blocks * n_scales
    monkeypatch.setenv("WINCLIP_INT8_COMPILE", "0")
    eager = tiny_detector()
    eager.backbone.use_int8(True)
    assert "float steps eager (WINCLIP_INT8_COMPILE=0)" in eager.backbone.kernel_path()
    ref = eager.score(eager.encode(pixels), eager.prototypes)
    assert float((fused.image_scores - ref.image_scores).abs().max()) < 1e-3
    assert precision_check.spearman(ref.grid_maps, fused.grid_maps) > 0.999


@pytest.mark.parametrize("n_queries", [7, 1])
def test_window_attention_is_the_attention_of_the_packed_path(n_queries):
    """The fused steps' window attention (sums of broadcast products, heads side by side) equals the
    eager path's batched-matmul attention, for every token or the class token only."""
    from winclip.kernels.packed import attend
    from winclip.kernels.int8_epilogue import window_attention

    qkv = torch.randn(11, 7, 3 * 64, generator=torch.Generator().manual_seed(0)) * 2  # 11 windows, 4 heads
    want = attend(qkv.view(11, 7, 3, 4, 16), first_query_only=n_queries == 1)  # (n, H, Lq, hd)
    got = window_attention(qkv, 4, n_queries)  # (n * Lq, D)
    assert got.shape == (11 * n_queries, 64)
    assert_close(got, want.transpose(1, 2).reshape(-1, 64), atol=1e-5, rtol=1e-5)


def test_when_compiling_fails_the_eager_steps_run_and_say_why(monkeypatch, pixels):
    from winclip.kernels import int8_epilogue

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(int8_epilogue, "_probed", {})
    monkeypatch.setattr(int8_epilogue, "_compiled", None)
    monkeypatch.setattr(torch, "compile", no_compiler)
    det = tiny_detector()
    ref = det.score(det.encode(pixels), det.prototypes)
    det.backbone.use_int8(True)
    assert det.backbone.int8.epilogues is None
    assert "float steps eager (torch.compile failed (RuntimeError: InvalidCxxCompiler" in det.backbone.kernel_path()
    low = det.score(det.encode(pixels), det.prototypes)
    assert float((low.image_scores - ref.image_scores).abs().max()) < 0.01


def test_the_check_compiles_before_it_takes_the_lock():
    """Quantising the weights and compiling the float steps take seconds: done before the first
    ``step`` (which holds the app's inference lock), not inside it."""
    det = tiny_detector()
    seen = []

    def step(work):
        seen.append(det.backbone._int8_weights is not None)
        work()

    result = precision_check.compare(det, "int8", step)
    assert seen and all(seen) and result.images == len(seen)


def test_predict_keeps_the_float_steps_eager_and_says_so(tmp_path, capsys):
    """One prediction is a few passes: compiling (6-34 s) would cost more than it saves."""
    from winclip import cli
    from winclip.synthetic import make_part

    make_part(2, 120).image.save(tmp_path / "q.png")
    assert cli.main(["predict", "--image", str(tmp_path / "q.png"), "--model", TINY_CONFIG, "--pretrained", "none",
                     "--json", "--precision", "int8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["precision"] == "int8"
    assert "float steps eager (not compiled for a few passes" in out["kernels"]


def test_a_preparation_asked_for_during_the_load_runs_before_the_precision_check(monkeypatch, tmp_path):
    """A fresh start under auto with a candidate: the examples asked for during the load are prepared first,
    in the precision the model answers in, and the check (quantising, compiling, comparing) comes after,
    its status saying so. The first clicks after a start no longer share the CPU with the check (real model,
    a click on an example as soon as the model was up, 2-core EPYC: 12.1 s, 24.7 s before)."""
    import time

    from winclip import hosting
    from winclip.service import DetectionService, Settings

    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "cpu_info", lambda: AMD_AVX2)
    events, statuses, load = [], [], hosting.WinClip.from_pretrained

    def compare(detector, precision="int8", step=lambda work: work()):  # the order is tested here, not the check
        events.append(f"check {precision}")
        return precision_check.CheckResult(False, 1.0, 0.0, 3, 0.1, precision=precision)

    def slow_load(*args, **kwargs):  # the preparation is asked for while the model loads, as app.py does
        time.sleep(1.0)
        return load(*args, **kwargs)

    monkeypatch.setattr(precision_check, "compare", compare)
    monkeypatch.setattr(hosting.WinClip, "from_pretrained", slow_load)
    service = DetectionService(Settings(TINY_CONFIG, None, "auto", "auto"))

    def steps():
        for i in range(3):
            events.append(f"step {i} in {service.detector.backbone.precision}")
            statuses.append(service.status())
            time.sleep(0.2)
            yield i

    service.start_loading()
    service.prepare_in_background(steps, "three steps").join(60)
    service.int8_check.join(60)
    assert events == ["step 0 in fp32", "step 1 in fp32", "step 2 in fp32", "check int8"], events
    assert "checking int8 against fp32 in the background after preparing three steps" in statuses[-1]
    assert "three steps prepared" in service.status() and not service.checking
