"""Every reduced precision earns its place: auto's bf16/fp16/int8 candidate is used only after its
self-check against fp32, and MuSc only after a check on MuSc's own scores (tiny model, real code paths)."""

import contextlib
import csv
import json
import time
from dataclasses import replace

import pytest
import torch

from winclip import cli, hardware, precision_check
from winclip.hardware import choose_runtime
from winclip.methods import musc_precision
from winclip.synthetic import make_part

from conftest import TINY_CONFIG, tiny_detector
from conftest import AMD_ZEN4, INTEL_AMX, INTEL_HIDDEN_AMX


def failing(precision, method):
    return lambda *a, **k: precision_check.CheckResult(False, 0.05, 0.9, 3, 0.1, precision=precision, method=method)


def passing(precision, method):
    return lambda *a, **k: precision_check.CheckResult(True, 0.001, 0.999, 3, 0.1, precision=precision, method=method)


def test_bf16_candidate_is_used_only_after_its_check(monkeypatch, tmp_path):
    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    runtime = choose_runtime("auto", "auto", info=INTEL_AMX, cuda_available=False)
    assert (runtime.precision, runtime.candidate) == ("fp32", "bf16")
    det = tiny_detector()
    monkeypatch.setattr(precision_check, "compare", failing("bf16", "winclip"))
    new, result = precision_check.resolve_candidate(det, runtime)
    det.source = replace(det.source, runtime=new)
    assert (new.precision, musc_precision(det)) == ("fp32", "fp32") and not result.passed and "bf16 stays off" in new.reason
    assert det.backbone.precision == "fp32" and det.backbone.visual.conv1.weight.dtype is torch.float32

    det = tiny_detector()
    monkeypatch.setattr(precision_check, "compare", passing("bf16", "winclip"))
    new, result = precision_check.resolve_candidate(det, runtime, use_cache=False)
    det.source = replace(det.source, runtime=new)
    assert (new.precision, musc_precision(det)) == ("bf16", "fp32") and "MuSc fp32" in new.reason
    assert det.backbone.precision == "bf16" and det.backbone.visual.conv1.weight.dtype is torch.bfloat16
    assert det.backbone.model.visual.conv1.weight.dtype is torch.float32  # the fp32 tower is kept (MuSc, checks)


def test_a_bf16_cpu_without_amx_checks_int8_first_and_bf16_when_int8_fails(monkeypatch, tmp_path):
    if hardware.int8_available():
        pytest.skip(hardware.int8_available())
    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    runtime = choose_runtime("auto", "auto", info=AMD_ZEN4, cuda_available=False)
    checked = []

    def compare(det, precision, *a, **k):  # stand-in verdicts: int8 fails, bf16 passes (real checks: below)
        checked.append(precision)
        return (failing if precision == "int8" else passing)(precision, "winclip")()

    monkeypatch.setattr(precision_check, "compare", compare)
    det = tiny_detector()
    det.source = replace(det.source, runtime=runtime)
    assert precision_check.cached_result(det) is None  # nothing checked yet: pending
    new, result = precision_check.resolve_candidate(det, runtime)
    assert checked == ["int8", "bf16"] and new.precision == "bf16" and result.precision == "bf16"
    assert "int8 stays off" in new.reason and det.backbone.precision == "bf16"
    assert precision_check.cached_result(det).precision == "bf16"  # both verdicts cached: the fallback's counts
    det = tiny_detector()
    new, _ = precision_check.resolve_candidate(det, runtime)  # from the cache: no check runs again
    assert checked == ["int8", "bf16"] and new.precision == "bf16"

    monkeypatch.setattr(precision_check, "compare", lambda det, precision, *a, **k: checked.append(precision) or
                        passing(precision, "winclip")())
    new, _ = precision_check.resolve_candidate(tiny_detector(), runtime, use_cache=False)
    assert checked[2:] == ["int8"] and new.precision == "int8" and "bf16" not in new.reason  # int8 passes: kept


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_the_real_checks_compare_the_candidate_with_fp32(monkeypatch, tmp_path, precision):
    """No stand-ins: both checks run the tiny model in fp32 and the candidate and measure the difference."""
    if precision == "int8" and hardware.int8_available():
        pytest.skip(hardware.int8_available())
    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    monkeypatch.setenv("WINCLIP_INT8_COMPILE", "0")
    det = tiny_detector()
    zero_shot = precision_check.compare(det, precision)
    musc = precision_check.compare_musc(det, precision)
    assert (zero_shot.images, musc.images) == (3, 8) and (zero_shot.method, musc.method) == ("winclip", "musc")
    for r in (zero_shot, musc):
        assert 0 < r.max_score_diff < 0.5 and -1 <= r.min_spearman <= 1  # bf16 moved something, measurably
    accurate = zero_shot.max_score_diff <= 0.01 and zero_shot.min_spearman >= 0.99
    # the zero-shot check also timed its passes and, on the CPU, asks the candidate to be faster than fp32
    assert zero_shot.speed_gated and zero_shot.fp32_seconds > 0 and zero_shot.candidate_seconds > 0
    assert zero_shot.passed == (accurate and zero_shot.candidate_seconds <= 0.9 * zero_shot.fp32_seconds)
    assert musc.passed == (musc.max_score_diff <= 0.01 and musc.min_spearman >= 0.99)  # MuSc: accuracy only
    assert det.backbone.precision == "fp32"  # the checks changed their own thread's passes only
    fp32 = precision_check.compare(det, "fp32")
    assert fp32.passed and fp32.max_score_diff == 0.0  # fp32 against itself: the check can tell equal


def delay_passes_in(monkeypatch, det, slow: set[str], seconds: float = 0.15) -> None:
    """Every image pass the check runs in a precision of ``slow`` takes ``seconds`` longer: a machine where
    that precision is slower than the others (the tiny model's own timings are too close to tell apart)."""
    backbone, active, encode = det.backbone, [], det.encode
    original = backbone.precision_for_this_thread

    @contextlib.contextmanager
    def tracked(precision):
        active.append(precision)
        try:
            with original(precision):
                yield
        finally:
            active.pop()

    def encode_delayed(pixels, *args, **kwargs):
        if active and active[-1] in slow:
            time.sleep(seconds)
        return encode(pixels, *args, **kwargs)

    monkeypatch.setattr(backbone, "precision_for_this_thread", tracked)
    monkeypatch.setattr(det, "encode", encode_delayed)


@pytest.mark.parametrize("slow", ["bf16", "fp32"])
def test_on_the_cpu_a_candidate_that_matches_fp32_is_used_only_if_it_is_faster(monkeypatch, tmp_path, slow):
    """The real check on the tiny model, with one side's passes 150 ms slower: bf16 agrees with fp32 either
    way, and is switched on only where it is the faster one. (With 40 ms, a bf16 pass of the tiny model
    took 18 ms against fp32's 5 ms with another test process beside it: bf16 was then not the faster.)"""
    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    det = tiny_detector()
    delay_passes_in(monkeypatch, det, {slow})
    runtime = choose_runtime("auto", "auto", info=INTEL_AMX, cuda_available=False)
    new, result = precision_check.resolve_candidate(det, runtime, use_cache=False)
    assert result.max_score_diff <= 0.01 and result.min_spearman >= 0.99 and result.speed_gated
    if slow == "bf16":
        assert result.candidate_seconds > result.fp32_seconds + 0.03 and not result.passed
        assert new.precision == "fp32" and det.backbone.precision == "fp32"
        assert "not faster than fp32 on this machine, so bf16 stays off" in new.reason
    else:
        assert result.fp32_seconds > result.candidate_seconds + 0.03 and result.passed
        assert new.precision == "bf16" and det.backbone.precision == "bf16"
        assert "per image against fp32's" in new.reason and "(<= 0.9x)" in new.reason


def test_a_cpu_whose_bf16_and_int8_are_slower_than_fp32_stays_in_fp32_and_says_why(monkeypatch, tmp_path):
    """An Intel Xeon whose AMX the hypervisor hides has AVX512-BF16, so ``auto`` checks int8 and then bf16;
    measured there, a bf16 query took 1.66x as long as in fp32. Real checks, both reduced precisions delayed: neither
    is switched on, and the reason names both verdicts."""
    if hardware.int8_available():
        pytest.skip(hardware.int8_available())
    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path))
    monkeypatch.setenv("WINCLIP_INT8_COMPILE", "0")
    det = tiny_detector()
    delay_passes_in(monkeypatch, det, {"int8", "bf16"})
    runtime = choose_runtime("auto", "auto", info=INTEL_HIDDEN_AMX, cuda_available=False)
    assert (runtime.candidate, runtime.fallback) == ("int8", "bf16")
    new, result = precision_check.resolve_candidate(det, runtime)
    assert new.precision == "fp32" and det.backbone.precision == "fp32" and result.precision == "bf16"
    assert "bf16 stays off" in new.reason and "int8 stays off" in new.reason
    assert new.reason.count("not faster than fp32 on this machine") == 2
    det.source = replace(det.source, runtime=runtime)
    assert not precision_check.cached_result(det).passed  # remembered: a later start stays in fp32 unchecked


def test_the_cli_says_when_it_checks_a_fallback_and_names_both_verdicts(monkeypatch, tmp_path, capsys):
    if hardware.int8_available():
        pytest.skip(hardware.int8_available())
    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "cpu_info", lambda: INTEL_HIDDEN_AMX)
    monkeypatch.setattr(precision_check, "compare", lambda det, precision, *a, **k: failing(precision, "winclip")())
    make_part(1, 120).image.save(tmp_path / "q.png")
    assert cli.main(["predict", "--image", str(tmp_path / "q.png"), "--model", TINY_CONFIG, "--pretrained", "none",
                     "--json", "--precision", "auto"]) == 0
    err = capsys.readouterr().err
    assert "checking int8 (then bf16 if it fails) against fp32" in err
    note = next(line for line in err.splitlines() if line.startswith("note: "))
    assert note.startswith("note: fp32: int8 self-check failed") and "so bf16 stays off" in note, note
    assert note.index("int8 stays off") < note.index("bf16 self-check failed")  # in the order they were checked


def write_set(folder, n=8):
    folder.mkdir()
    for i in range(n):
        make_part(40 + i, 120, "crack" if i in (2, 5) else "none").image.save(folder / f"part_{i}.png")


def inspect(folder, out, precision):
    args = ["inspect", "--images", str(folder), "--method", "musc", "--model", TINY_CONFIG, "--pretrained", "none",
            "--device", "cpu", "--precision", precision, "--out", str(out), "--json"]
    assert cli.main(args) == 0
    with open(out / "results.csv", newline="") as fh:
        scores = {r["file"]: float(r["score"]) for r in csv.DictReader(fh)}
    return scores, json.loads((out / "summary.json").read_text())["settings"]


def test_musc_under_auto_gives_the_fp32_scores(monkeypatch, tmp_path, capsys):
    """auto's candidate passed (WinCLIP runs bf16), MuSc's backbone pass stays fp32: its set-relative
    scores are those of --precision fp32."""
    monkeypatch.setenv("WINCLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "cpu_info", lambda: INTEL_AMX)  # auto's candidate: bf16
    monkeypatch.setattr(precision_check, "compare", passing("bf16", "winclip"))
    write_set(tmp_path / "set")
    fp32, fp32_settings = inspect(tmp_path / "set", tmp_path / "fp32", "fp32")
    auto, auto_settings = inspect(tmp_path / "set", tmp_path / "auto", "auto")
    bf16, _ = inspect(tmp_path / "set", tmp_path / "bf16", "bf16")  # asked for explicitly: used as asked
    capsys.readouterr()
    assert fp32.keys() == auto.keys() and len(fp32) == 8
    assert max(abs(fp32[f] - auto[f]) for f in fp32) < 1e-6
    assert max(abs(fp32[f] - bf16[f]) for f in fp32) > 1e-4  # bf16 would have moved them
    assert auto_settings["precision"] == "fp32" and auto_settings["checked"] and not fp32_settings["checked"]
    assert "bf16 (image tower)" in auto_settings["why"] and "MuSc fp32" in auto_settings["why"]
